//! `cache:` of a stage: its key template, paths and `shared`.

use super::{check, parse_ok};

#[test]
fn a_cache_has_a_key_template_paths_and_maybe_shared() {
    let pipeline = parse_ok(
        r#"
        pipeline: cached
        stages:
          deps:
            commands: [pip download -r requirements.txt -d .cache/pip]
            cache: { key: "pip-{{ hash('requirements.txt') }}", paths: [.cache/pip], shared: true }
          plain: { commands: [make] }
        "#,
    );
    let cache = pipeline.stages[0].cache.as_ref().unwrap();
    assert_eq!(cache.key.as_str(), "pip-{{ hash('requirements.txt') }}");
    assert_eq!(cache.paths, [".cache/pip"]);
    assert!(cache.shared);
    assert_eq!(pipeline.stages[1].cache, None);
}

#[test]
fn bad_caches_are_refused_where_they_are_written() {
    let stage = |cache: &str| {
        format!(
            "
            pipeline: cached
            stages:
              deps:
                commands: [make]
                cache: {cache}
            "
        )
    };
    check(
        &stage("{ paths: [.cache] }"),
        "kiln.yml:5:12: `cache` in stage `deps` has no `key`; add one like \
         `key: \"pip-{{ hash('requirements.txt') }}\"`",
    );
    check(
        &stage("{ key: pip }"),
        "kiln.yml:5:12: `cache` in stage `deps` has no `paths`; list the directories to keep, \
         like `paths: [.cache/pip]`",
    );
    check(
        &stage("{ key: \"pip {{ hash('r.txt') }}\", paths: [.cache] }"),
        "kiln.yml:5:19: bad `key` in `cache` of stage `deps`: ` ` in the cache key; use \
         letters, digits, `.`, `_`, `-` and `{{ hash('FILE') }}` parts",
    );
    check(
        &stage("{ key: pip, paths: [.cache], ttl: 3d }"),
        "kiln.yml:5:41: unknown key `ttl` in `cache` of stage `deps`; expected one of: key, \
         paths, shared",
    );
}
