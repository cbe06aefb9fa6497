//! `retention:` — how much of a pipeline's history the coordinator keeps:
//! `retention: {keep: {runs: 20, days: 30}}` keeps a finished run while it
//! is among the newest `runs` finished runs of its pipeline or finished
//! within `days`; older ones go, with their stage records, logs and the
//! artifacts nothing else references, when `kiln gc` runs. Runs that made
//! a release, and everything a release references, are kept forever.

use saphyr::Scalar;

use super::schema::{Field, Path, read_fields, set};
use super::yaml::Node;
use super::{Problem, Retention};

#[derive(Default)]
struct KeepDraft {
    runs: Option<u32>,
    days: Option<u32>,
}

#[rustfmt::skip]
const RETENTION_FIELDS: &[Field<KeepDraft>] = &[
    ("keep", |k, v, path| read_keep(k, v, path)),
];

#[rustfmt::skip]
const KEEP_FIELDS: &[Field<KeepDraft>] = &[
    ("runs", |k, v, path| set(&mut k.runs, count(v, path).map(Some))),
    ("days", |k, v, path| set(&mut k.days, count(v, path).map(Some))),
];

/// `retention: {keep: {runs, days}}`.
pub(super) fn read(value: Node<'_>, path: &Path<'_>) -> Result<Retention, Problem> {
    let mut keep = KeepDraft::default();
    read_fields(
        &mut keep,
        value,
        RETENTION_FIELDS,
        &path.to_string(),
        " in `retention`",
    )?;
    if keep.runs.is_none() && keep.days.is_none() {
        return Err(Problem::new(
            value.position(),
            "`retention` keeps nothing in particular; say what to keep, like \
             `retention: {keep: {runs: 20, days: 30}}`",
        ));
    }
    Ok(Retention {
        runs: keep.runs,
        days: keep.days,
    })
}

fn read_keep(keep: &mut KeepDraft, value: Node<'_>, path: &Path<'_>) -> Result<(), Problem> {
    read_fields(
        keep,
        value,
        KEEP_FIELDS,
        &path.to_string(),
        " in `keep` of `retention`",
    )
}

/// A whole number from 1 up.
fn count(value: Node<'_>, path: &Path<'_>) -> Result<u32, Problem> {
    match value.scalar() {
        Some(Scalar::Integer(n)) if n >= 1 => u32::try_from(n).map_err(|_| too_big(value, path)),
        _ => Err(Problem::new(
            value.position(),
            format!(
                "{path} must be a whole number from 1 up; found {}",
                value.describe()
            ),
        )),
    }
}

fn too_big(value: Node<'_>, path: &Path<'_>) -> Problem {
    Problem::new(value.position(), format!("{path} is too large"))
}
