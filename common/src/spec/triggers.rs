//! `triggers:` — what starts a run besides `kiln run`: a push webhook, a
//! cron schedule, a watched data directory. The types say what the file
//! asked for; `crate::triggers` has the rules that apply them.

use std::path::{Component, Path as FsPath, PathBuf};
use std::time::Duration;

use super::schema::{Field, Path, read_fields, set};
use super::values;
use super::yaml::Node;
use super::{Position, Problem};
use crate::triggers::schedule::Schedule;
use crate::triggers::webhook;

/// `data.every` when the file leaves it out.
pub const DEFAULT_DATA_EVERY: Duration = Duration::from_secs(60);
/// The shortest `data.every` and `data.settle`: digesting a dataset more
/// often than this would keep the coordinator's disk busy for nothing.
pub const MIN_DATA_INTERVAL: Duration = Duration::from_secs(1);

/// Most cron expressions one `schedule:` may list; each costs the
/// coordinator a check at parse time and a timer.
pub const MAX_SCHEDULES: usize = 20;

/// A pipeline's `triggers:`; the default (nothing set) when the file has
/// none.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Triggers {
    /// `push:` runs the pushed commit when a signed webhook arrives.
    pub push: Option<PushTrigger>,
    /// `schedule:` one cron expression or a list of them (five fields,
    /// UTC; see [`crate::triggers::schedule`]); empty when not set.
    pub schedule: Vec<Schedule>,
    /// `data:` runs when a directory's content changes and settles.
    pub data: Option<DataTrigger>,
    /// `tag: ["v*"]`: a pushed tag matching one of these patterns runs the
    /// tagged commit (webhook).
    pub tag: Option<Vec<String>>,
    /// `merge_request:` a merge (pull) request opened, reopened or updated
    /// runs its head commit (webhook).
    pub merge_request: Option<MergeRequestTrigger>,
    /// `secret: NAME`: the kiln secret holding the webhook key for every
    /// forge event (`push.secret` may name it for pushes alone).
    pub secret: Option<String>,
}

impl Triggers {
    /// The kiln secret a delivery is verified with: `push.secret`, else
    /// `secret`. `None` when no forge event is configured.
    pub fn webhook_secret(&self) -> Option<&str> {
        self.push
            .as_ref()
            .map(|push| push.secret.as_str())
            .or(self.secret.as_deref())
    }
}

/// `merge_request:` (`true`, or `{ branches: [main] }` to run only the
/// requests into those target branches).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeRequestTrigger {
    /// Target-branch patterns; `None`: every request.
    pub branches: Option<Vec<String>>,
}

impl MergeRequestTrigger {
    pub fn accepts(&self, target_branch: &str) -> bool {
        self.branches.as_ref().is_none_or(|patterns| {
            patterns
                .iter()
                .any(|pattern| webhook::branch_matches(pattern, target_branch))
        })
    }
}

/// `push: { branches: [...], secret: NAME }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushTrigger {
    /// Branch names or patterns (`*` matches any run of characters, `/`
    /// included), never empty. `None` when the file leaves `branches` out:
    /// then only the branch the pipeline was registered from is built,
    /// which the file cannot know; see [`PushTrigger::accepts`].
    pub branches: Option<Vec<String>>,
    /// The name of the kiln secret holding the webhook's HMAC key
    /// ([`super::is_secret_name`]).
    pub secret: String,
}

impl PushTrigger {
    /// Whether a push to `branch` starts a run of a pipeline registered from
    /// `registered_branch`.
    pub fn accepts(&self, branch: &str, registered_branch: &str) -> bool {
        match &self.branches {
            Some(patterns) => patterns
                .iter()
                .any(|pattern| webhook::branch_matches(pattern, branch)),
            None => branch == registered_branch,
        }
    }
}

/// `data: { watch, every, settle, into }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataTrigger {
    /// An absolute directory on the coordinator's host, without `..`.
    pub watch: PathBuf,
    /// How often the coordinator digests `watch` (default
    /// [`DEFAULT_DATA_EVERY`], at least [`MIN_DATA_INTERVAL`]).
    pub every: Duration,
    /// How long new content must stay unchanged before a run starts
    /// (default `every`, so two polls in a row must agree; at least
    /// [`MIN_DATA_INTERVAL`]).
    pub settle: Duration,
    /// Workspace-relative path where the stages find the dataset; default
    /// `data/<last component of watch>`.
    pub into: String,
}

#[rustfmt::skip]
const TRIGGERS_FIELDS: &[Field<Triggers>] = &[
    ("push", |t, v, path| set(&mut t.push, push(v, path).map(Some))),
    ("schedule", |t, v, path| set(&mut t.schedule, schedule(v, path))),
    ("data", |t, v, path| set(&mut t.data, data(v, path).map(Some))),
    ("tag", |t, v, path| set(&mut t.tag, branches(v, path).map(Some))),
    ("merge_request", |t, v, path| set(&mut t.merge_request, merge_request(v, path).map(Some))),
    ("secret", |t, v, path| set(&mut t.secret, values::secret_name(v, path).map(Some))),
];

/// `triggers:`; nothing under it means no triggers.
pub(super) fn read(value: Node<'_>, path: &Path<'_>) -> Result<Triggers, Problem> {
    let mut triggers = Triggers::default();
    if !value.is_null() {
        read_fields(
            &mut triggers,
            value,
            TRIGGERS_FIELDS,
            &path.to_string(),
            " in `triggers`",
        )?;
        let shared = triggers.secret.clone();
        if let Some(push) = triggers.push.as_mut().filter(|push| push.secret.is_empty()) {
            let Some(secret) = shared else {
                let at = value
                    .entries()
                    .unwrap_or_default()
                    .into_iter()
                    .find(|(key, _)| key.string() == Some("push"))
                    .map_or(value.position(), |(_, push)| push.position());
                return Err(Problem::new(
                    at,
                    "`push` in `triggers` needs `secret: NAME`: the kiln secret that holds the webhook's \
                     key, so that only the forge can start runs",
                ));
            };
            push.secret = secret;
        }
        if (triggers.tag.is_some() || triggers.merge_request.is_some())
            && triggers.webhook_secret().is_none()
        {
            return Err(Problem::new(
                value.position(),
                "`tag` and `merge_request` in `triggers` need `secret: NAME` in `triggers`: the kiln \
                 secret that holds the webhook's key, so that only the forge can start runs",
            ));
        }
    }
    Ok(triggers)
}

/// `merge_request: true` or `{ branches: [...] }`.
fn merge_request(value: Node<'_>, path: &Path<'_>) -> Result<MergeRequestTrigger, Problem> {
    if let Some(on) = value.scalar().and_then(|scalar| scalar.as_bool()) {
        if !on {
            return Err(Problem::new(
                value.position(),
                format!("{path} is false; leave it out instead"),
            ));
        }
        return Ok(MergeRequestTrigger::default());
    }
    let mut trigger = MergeRequestTrigger::default();
    #[rustfmt::skip]
    const FIELDS: &[Field<MergeRequestTrigger>] = &[
        ("branches", |m, v, path| set(&mut m.branches, branches(v, path).map(Some))),
    ];
    read_fields(
        &mut trigger,
        value,
        FIELDS,
        &path.to_string(),
        " in `merge_request` of `triggers`",
    )?;
    Ok(trigger)
}

#[derive(Default)]
struct PushDraft {
    branches: Option<Vec<String>>,
    secret: Option<String>,
}

#[rustfmt::skip]
const PUSH_FIELDS: &[Field<PushDraft>] = &[
    ("branches", |p, v, path| set(&mut p.branches, branches(v, path).map(Some))),
    ("secret", |p, v, path| set(&mut p.secret, values::secret_name(v, path).map(Some))),
];

fn push(value: Node<'_>, path: &Path<'_>) -> Result<PushTrigger, Problem> {
    let mut draft = PushDraft::default();
    read_fields(
        &mut draft,
        value,
        PUSH_FIELDS,
        &path.to_string(),
        " in `push` of `triggers`",
    )?;
    // Empty: `triggers.secret` stands in, or `read` says it is missing.
    Ok(PushTrigger {
        branches: draft.branches,
        secret: draft.secret.unwrap_or_default(),
    })
}

fn branches(value: Node<'_>, path: &Path<'_>) -> Result<Vec<String>, Problem> {
    const EXPECTED: &str = "a list of branch names or patterns, like `[main, \"release/*\"]`";
    let items = match (value.items(), value.string()) {
        (Some(items), _) => items,
        (None, Some(_)) => vec![value],
        (None, None) => return Err(wrong_type(value, path, EXPECTED)),
    };
    if items.is_empty() {
        return Err(Problem::new(
            value.position(),
            format!(
                "{path} is empty; list branches like `[main, \"release/*\"]`, write `[\"*\"]` \
                 for every branch, or leave `branches` out to build only the branch the \
                 pipeline is registered from"
            ),
        ));
    }
    let mut patterns: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let Some(pattern) = item.text() else {
            return Err(wrong_type(item, path, EXPECTED));
        };
        if let Err(why) = webhook::check_branch_pattern(pattern) {
            return Err(Problem::new(
                item.position(),
                format!("branch `{pattern}` in {path} {why}"),
            ));
        }
        if patterns.iter().any(|seen| seen == pattern) {
            return Err(Problem::new(
                item.position(),
                format!("branch `{pattern}` is listed twice in {path}; list it once"),
            ));
        }
        patterns.push(pattern.to_owned());
    }
    Ok(patterns)
}

/// `schedule: "0 3 * * *"` or a list of such strings.
fn schedule(value: Node<'_>, path: &Path<'_>) -> Result<Vec<Schedule>, Problem> {
    const EXPECTED: &str = "a cron expression like \"0 3 * * *\", or a list of them";
    let items = match (value.items(), value.string()) {
        (Some(items), _) => items,
        (None, Some(_)) => vec![value],
        (None, None) => return Err(wrong_type(value, path, EXPECTED)),
    };
    if items.is_empty() {
        return Err(Problem::new(
            value.position(),
            format!("{path} is empty; write a cron expression like \"0 3 * * *\""),
        ));
    }
    if let Some(extra) = items.get(MAX_SCHEDULES) {
        return Err(Problem::new(
            extra.position(),
            format!(
                "{path} lists {} cron expressions, more than the limit of {MAX_SCHEDULES}; \
                 combine them (`0 3,15 * * *` is 03:00 and 15:00)",
                items.len()
            ),
        ));
    }
    let mut schedules: Vec<Schedule> = Vec::with_capacity(items.len());
    for entry in items {
        // `{cron: "0 3 * * *", params: {EPOCHS: 50}}`: a schedule whose
        // runs get these parameter values.
        let (item, params) = match schedule_with_params(entry, path)? {
            Some((cron, params)) => (cron, Some(params)),
            None => (entry, None),
        };
        let Some(expression) = item.string() else {
            return Err(wrong_type(item, path, EXPECTED));
        };
        let mut schedule = Schedule::parse(expression).map_err(|why| {
            Problem::new(
                item.position(),
                format!(
                    "bad cron expression `{expression}` in {path}: {why}; write five fields \
                     in UTC, minute hour day-of-month month day-of-week, like \"0 3 * * *\""
                ),
            )
        })?;
        if schedules.iter().any(|seen| seen.expression() == expression) {
            return Err(Problem::new(
                item.position(),
                format!("cron expression `{expression}` is listed twice in {path}; list it once"),
            ));
        }
        if let Some((params, position)) = params {
            schedule.params = params;
            schedule.params_at = Some(position);
        }
        schedules.push(schedule);
    }
    Ok(schedules)
}

/// The `cron` and `params` of a `{cron, params}` schedule entry; `None`
/// for a plain cron string.
#[allow(clippy::type_complexity)]
fn schedule_with_params<'n>(
    entry: Node<'n>,
    path: &Path<'_>,
) -> Result<
    Option<(
        Node<'n>,
        (std::collections::BTreeMap<String, String>, Position),
    )>,
    Problem,
> {
    let Some(entries) = entry.entries() else {
        return Ok(None);
    };
    let (mut cron, mut params) = (None, None);
    for (key, value) in entries {
        match key.text() {
            Some("cron") => cron = Some(value),
            Some("params") => params = Some((values::env(value, path)?, value.position())),
            _ => {
                return Err(Problem::new(
                    key.position(),
                    format!(
                        "unknown key `{}` in a schedule of {path}; expected one of: cron, params",
                        key.text().unwrap_or_default()
                    ),
                ));
            }
        }
    }
    let cron = cron.ok_or_else(|| {
        Problem::new(
            entry.position(),
            format!("a schedule of {path} has no `cron`; write `{{cron: \"0 3 * * *\", params: {{...}}}}`"),
        )
    })?;
    Ok(Some((
        cron,
        params.unwrap_or_else(|| (Default::default(), entry.position())),
    )))
}

#[derive(Default)]
struct DataDraft {
    watch: Option<PathBuf>,
    every: Option<Duration>,
    settle: Option<Duration>,
    into: Option<String>,
}

#[rustfmt::skip]
const DATA_FIELDS: &[Field<DataDraft>] = &[
    ("watch", |d, v, path| set(&mut d.watch, watch(v, path).map(Some))),
    ("every", |d, v, path| set(&mut d.every, interval(v, path).map(Some))),
    ("settle", |d, v, path| set(&mut d.settle, interval(v, path).map(Some))),
    ("into", |d, v, path| set(&mut d.into, into(v, path).map(Some))),
];

fn data(value: Node<'_>, path: &Path<'_>) -> Result<DataTrigger, Problem> {
    let mut draft = DataDraft::default();
    read_fields(
        &mut draft,
        value,
        DATA_FIELDS,
        &path.to_string(),
        " in `data` of `triggers`",
    )?;
    let Some(watch) = draft.watch else {
        return Err(Problem::new(
            value.position(),
            "`data` in `triggers` needs `watch: DIRECTORY`, an absolute path on the \
             coordinator's host",
        ));
    };
    let every = draft.every.unwrap_or(DEFAULT_DATA_EVERY);
    let into = match draft.into {
        Some(into) => into,
        None => default_into(&watch, value.position())?,
    };
    Ok(DataTrigger {
        watch,
        every,
        settle: draft.settle.unwrap_or(every),
        into,
    })
}

fn watch(value: Node<'_>, path: &Path<'_>) -> Result<PathBuf, Problem> {
    let Some(text) = value.string() else {
        return Err(wrong_type(
            value,
            path,
            "an absolute directory on the coordinator's host, like `/srv/data/raw`",
        ));
    };
    let bad = |why: &str| {
        Problem::new(
            value.position(),
            format!("{path} `{text}` {why}; write an absolute directory like `/srv/data/raw`"),
        )
    };
    let watch = FsPath::new(text);
    if !watch.is_absolute() {
        return Err(bad("is not absolute"));
    }
    if text.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    if watch
        .components()
        .any(|component| component == Component::ParentDir)
    {
        return Err(bad("contains `..`"));
    }
    if watch.file_name().is_none() {
        return Err(bad("is the root directory"));
    }
    Ok(watch.to_owned())
}

/// `every` and `settle`: durations of at least [`MIN_DATA_INTERVAL`].
fn interval(value: Node<'_>, path: &Path<'_>) -> Result<Duration, Problem> {
    let interval = values::timeout(value, path)?;
    if interval < MIN_DATA_INTERVAL {
        return Err(Problem::new(
            value.position(),
            format!("{path} must be at least 1s; polling a directory more often only adds load"),
        ));
    }
    Ok(interval)
}

fn into(value: Node<'_>, path: &Path<'_>) -> Result<String, Problem> {
    let Some(text) = value.string() else {
        return Err(wrong_type(value, path, "a workspace path like `data/raw`"));
    };
    crate::archive::check_artifact_path(text)
        .map_err(|why| Problem::new(value.position(), format!("`into` path `{text}` {why}")))?;
    Ok(text.to_owned())
}

/// `data/<last component of watch>`.
fn default_into(watch: &FsPath, position: Position) -> Result<String, Problem> {
    let name = watch.file_name().and_then(|name| name.to_str());
    let into = name.map(|name| format!("data/{name}"));
    match into {
        Some(into) if crate::archive::check_artifact_path(&into).is_ok() => Ok(into),
        _ => Err(Problem::new(
            position,
            "`data` in `triggers` cannot name its workspace path after `watch`; set `into: PATH`",
        )),
    }
}

fn wrong_type(value: Node<'_>, path: &Path<'_>, must_be: &str) -> Problem {
    Problem::new(
        value.position(),
        format!("{path} must be {must_be}; found {}", value.describe()),
    )
}
