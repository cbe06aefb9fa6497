//! `include:`, merge keys and `extends:` (see `compose`).

use super::*;

/// Parses a pipeline file `kiln.yml` with these included files.
fn parse_files(root: &str, included: &[(&str, &str)]) -> Result<Pipeline, SpecError> {
    let mut sources = Sources::new("ci/kiln.yml", &trim_indent(root));
    for (path, text) in included {
        sources
            .included
            .insert((*path).to_owned(), trim_indent(text));
    }
    parse_sources(&sources)
}

#[test]
fn merge_keys_copy_an_anchored_mapping_under_the_stages_own_keys() {
    let pipeline = parse_ok(
        "
        pipeline: p
        .defaults: &defaults
          image: busybox
          env: { A: '1', B: '2' }
          timeout: 5m
        stages:
          build:
            <<: *defaults
            env: { C: '3' }
            commands: [make]
          test:
            <<: [*defaults, { retries: 3, timeout: 9m }]
            commands: [make test]
        ",
    );
    let build = &pipeline.stages[0];
    assert_eq!(build.image.as_deref(), Some("busybox"));
    assert_eq!(build.timeout, Duration::from_secs(300));
    // A merge key is shallow: the stage's own `env` replaces the anchor's.
    assert_eq!(build.env, BTreeMap::from([("C".into(), "3".into())]));
    let test = &pipeline.stages[1];
    assert_eq!(test.retries, 3);
    // The first mapping of the list wins.
    assert_eq!(test.timeout, Duration::from_secs(300));
}

#[test]
fn a_merge_key_needs_mappings() {
    check(
        "
        pipeline: p
        stages:
          build:
            <<: [plain]
            commands: [make]
        ",
        "kiln.yml:4:10: `<<` merges mappings: give it an alias of a mapping (`<<: *defaults`) or a list of them",
    );
}

#[test]
fn extends_deep_merges_templates_and_hidden_templates_never_run() {
    let pipeline = parse_ok(
        "
        pipeline: p
        stages:
          .base:
            image: busybox
            env: { A: '1', B: '2' }
            agent: { labels: { pool: gpu } }
          .slow:
            extends: .base
            timeout: 2h
          train:
            extends: [.slow]
            env: { B: 'two' }
            commands: [train]
          lint:
            extends: train
            commands: [lint]
        ",
    );
    let names: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["train", "lint"]);
    let train = &pipeline.stages[0];
    assert_eq!(train.image.as_deref(), Some("busybox"));
    assert_eq!(train.timeout, Duration::from_secs(7200));
    assert_eq!(
        train.env,
        BTreeMap::from([("A".into(), "1".into()), ("B".into(), "two".into())])
    );
    assert_eq!(
        train.agent_labels.get("pool").map(String::as_str),
        Some("gpu")
    );
    // Lists are replaced, not appended.
    assert_eq!(pipeline.stages[1].commands, ["lint"]);
}

#[test]
fn extends_errors_point_at_the_name() {
    check(
        "
        pipeline: p
        stages:
          .base: { image: busybox }
          build:
            extends: .bsae
            commands: [make]
        ",
        "kiln.yml:5:14: stage `build` extends `.bsae`, which is no stage or template here (did you mean `.base`?); templates are stages whose name starts with `.`",
    );
    check(
        "
        pipeline: p
        stages:
          .a: { extends: .b }
          .b: { extends: .a }
          build: { extends: .a, commands: [make] }
        ",
        "kiln.yml:4:18: `extends:` cycle: build -> .a -> .b -> .a; a template cannot extend itself",
    );
}

#[test]
fn a_mistake_from_a_template_is_blamed_where_it_is_written() {
    check(
        "
        pipeline: p
        stages:
          .base:
            timeout: soon
          build: { extends: .base, commands: [make] }
        ",
        "kiln.yml:4:14: bad duration `soon` for `timeout` in stage `build`; use a number with a unit: 500ms, 30s, 15m, 2h",
    );
}

#[test]
fn include_merges_files_under_the_including_one() {
    let pipeline = parse_files(
        "
        include: [common.yml, /shared/templates.yml]
        pipeline: p
        defaults: { timeout: 7m }
        stages:
          build:
            extends: .docker
            commands: [make]
        ",
        &[
            (
                "ci/common.yml",
                "
                defaults: { image: busybox, timeout: 1m }
                stages:
                  lint: { commands: [lint] }
                ",
            ),
            (
                "shared/templates.yml",
                "
                stages:
                  .docker: { image: alpine, env: { T: '1' } }
                ",
            ),
        ],
    )
    .unwrap();
    let names: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["lint", "build"]);
    assert_eq!(pipeline.stages[0].image.as_deref(), Some("busybox"));
    assert_eq!(pipeline.stages[0].timeout, Duration::from_secs(420));
    assert_eq!(pipeline.stages[1].image.as_deref(), Some("alpine"));
    assert_eq!(
        pipeline.stages[1].env.get("T").map(String::as_str),
        Some("1")
    );
}

#[test]
fn an_error_in_an_included_file_names_that_file() {
    let error = parse_files(
        "
        include: common.yml
        pipeline: p
        stages:
          build: { commands: [make] }
        ",
        &[(
            "ci/common.yml",
            "
            stages:
              lint:
                comands: [lint]
            ",
        )],
    )
    .unwrap_err();
    let text = error.to_string();
    assert!(
        text.starts_with("ci/common.yml:3:5: unknown key `comands` in stage `lint`;")
            && text.ends_with("(did you mean `commands`?)"),
        "{text}"
    );
    let syntax = parse_files(
        "
        include: common.yml
        pipeline: p
        stages: { build: { commands: [make] } }
        ",
        &[("ci/common.yml", "stages: [\n")],
    )
    .unwrap_err();
    assert_eq!(syntax.file, "ci/common.yml", "{syntax}");
}

#[test]
fn missing_and_cyclic_includes_are_refused_at_the_include() {
    let missing = parse_files(
        "
        pipeline: p
        include: [nope.yml]
        stages: { build: { commands: [make] } }
        ",
        &[],
    )
    .unwrap_err();
    assert_eq!(
        missing.to_string(),
        "ci/kiln.yml:2:11: `ci/nope.yml` (included from ci/kiln.yml) is not in the repository at this commit; commit it or fix the path"
    );
    let cycle = parse_files(
        "
        pipeline: p
        include: a.yml
        stages: { build: { commands: [make] } }
        ",
        &[
            ("ci/a.yml", "include: b.yml\n"),
            ("ci/b.yml", "include: /ci/kiln.yml\n"),
        ],
    )
    .unwrap_err();
    assert_eq!(
        cycle.to_string(),
        "ci/b.yml:1:10: include cycle: ci/kiln.yml -> ci/a.yml -> ci/b.yml -> ci/kiln.yml; remove one of these includes"
    );
    let outside = parse_files(
        "
        pipeline: p
        include: ../../etc/passwd
        stages: { build: { commands: [make] } }
        ",
        &[],
    )
    .unwrap_err();
    assert!(
        outside.message.contains("outside the repository"),
        "{outside}"
    );
}

#[test]
fn a_stored_bundle_parses_like_its_files() {
    let mut sources = Sources::new(
        "kiln.yml",
        "include: t.yml\npipeline: p\nstages: { b: { extends: .t } }\n",
    );
    sources.included.insert(
        "t.yml".into(),
        "stages: { .t: { commands: [make] } }\n".into(),
    );
    let bundled = parse("kiln.yml", &sources.bundle()).unwrap();
    assert_eq!(bundled, parse_sources(&sources).unwrap());
    assert_eq!(bundled.stages[0].commands, ["make"]);
}
