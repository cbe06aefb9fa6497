//! `cache:` — directories kept between runs under a key: restored before
//! the stage when an earlier run saved that key, saved after it succeeds
//! when it was not there. `shared: true` also keeps them in the
//! coordinator's blob store, so every agent gets them.

use super::schema::{Field, Path, read_fields, set};
use super::values;
use super::yaml::Node;
use super::{Cache, Problem};
use crate::cache_key::CacheKey;

#[derive(Default)]
struct CacheDraft {
    key: Option<CacheKey>,
    paths: Vec<String>,
    shared: bool,
}

#[rustfmt::skip]
const CACHE_FIELDS: &[Field<CacheDraft>] = &[
    ("key", |c, v, path| set(&mut c.key, key(v, path).map(Some))),
    ("paths", |c, v, path| set(&mut c.paths, values::artifact_paths(v, path))),
    ("shared", |c, v, path| set(&mut c.shared, values::flag(v, path))),
];

/// `cache: {key, paths, shared}` of stage `stage`.
pub(super) fn read(value: Node<'_>, path: &Path<'_>, stage: &str) -> Result<Cache, Problem> {
    let what = path.to_string();
    let place = format!(" in `cache` of stage `{stage}`");
    let mut draft = CacheDraft::default();
    read_fields(&mut draft, value, CACHE_FIELDS, &what, &place)?;
    let Some(key) = draft.key else {
        return Err(Problem::new(
            value.position(),
            format!(
                "{what} has no `key`; add one like `key: \"pip-{{{{ hash('requirements.txt') }}}}\"`"
            ),
        ));
    };
    if draft.paths.is_empty() {
        return Err(Problem::new(
            value.position(),
            format!(
                "{what} has no `paths`; list the directories to keep, like `paths: [.cache/pip]`"
            ),
        ));
    }
    Ok(Cache {
        key,
        paths: draft.paths,
        shared: draft.shared,
    })
}

fn key(value: Node<'_>, path: &Path<'_>) -> Result<CacheKey, Problem> {
    let Some(text) = value.string() else {
        return Err(Problem::new(
            value.position(),
            format!(
                "{path} must be a key like `pip-{{{{ hash('requirements.txt') }}}}`; found {}",
                value.describe()
            ),
        ));
    };
    CacheKey::parse(text)
        .map_err(|why| Problem::new(value.position(), format!("bad {path}: {why}")))
}
