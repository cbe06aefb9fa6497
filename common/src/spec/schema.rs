//! The YAML tree to a [`Draft`]: the file's shape and every value checked,
//! nothing cross-referenced yet.
//!
//! Each mapping with fixed keys has a table of [`Field`]s: a key's name and
//! the function that reads its value. The table is both the parser and the
//! list of keys that an "unknown key" error offers, so supporting a new key is
//! one line in a table and one reader in `values`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::cache;
use super::container::{self, ContainerDraft};
use super::delivery::{self, DeliveryDraft};
use super::matrix::{self, MatrixDraft};
use super::params::{self, Param};
use super::retention;
use super::services;
use super::suggest::did_you_mean;
use super::triggers::{self, Triggers};
use super::values;
use super::yaml::{Document, Node};
use super::{Cache, EXECUTOR_LABEL, MAX_STAGES, Position, Problem, Retention, RetryWhen, Service};

/// The file as read, before `needs` are resolved and defaults applied.
pub(super) struct Draft {
    pub(super) name: String,
    pub(super) defaults: Defaults,
    pub(super) triggers: Triggers,
    pub(super) timeout: Option<Duration>,
    pub(super) retention: Option<Retention>,
    /// `params:` in file order.
    pub(super) params: Vec<Param>,
    /// `env:` at the top level: every stage's, under its own.
    pub(super) env: BTreeMap<String, String>,
    /// Never empty, in file order.
    pub(super) stages: Vec<StageDraft>,
}

/// The `defaults:` mapping; `None` where the file leaves a setting out.
#[derive(Default)]
pub(super) struct Defaults {
    pub(super) image: Option<String>,
    pub(super) timeout: Option<Duration>,
    pub(super) retries: Option<(u32, Option<RetryWhen>)>,
    pub(super) container: ContainerDraft,
}

/// One stage as written; `None` settings fall back to `defaults`.
#[derive(Clone)]
pub(super) struct StageDraft {
    pub(super) name: String,
    /// Where the stage's name is, which errors about the whole stage point at.
    pub(super) position: Position,
    pub(super) needs: Vec<Named>,
    pub(super) commands: Vec<String>,
    pub(super) env: BTreeMap<String, String>,
    /// `secrets:` and where the list is, which a gate's error points at.
    pub(super) secrets: Option<(Vec<String>, Position)>,
    pub(super) timeout: Option<Duration>,
    pub(super) retries: Option<(u32, Option<RetryWhen>)>,
    pub(super) allow_failure: bool,
    pub(super) image: Option<String>,
    pub(super) agent_labels: BTreeMap<String, String>,
    /// `executor:` as the agent label value it requires, and where it was
    /// written; already merged into `agent_labels`.
    pub(super) executor: Option<(&'static str, Position)>,
    pub(super) container: ContainerDraft,
    /// `artifacts:` paths, validated to stay inside the workspace.
    pub(super) artifacts: Vec<String>,
    /// `artifacts: {when: always}`.
    pub(super) artifacts_always: bool,
    /// `metrics`, `environment`, `gate`, `monitor`.
    pub(super) delivery: DeliveryDraft,
    /// `matrix:` as written; expanded into cells before `needs` resolve.
    pub(super) matrix: Option<MatrixDraft>,
    /// For a cell of a matrix: the stage it was expanded from.
    pub(super) cell_of: Option<String>,
    /// `services:` and where the list is, which a stage that cannot have
    /// them is blamed on.
    pub(super) services: Option<(Vec<Service>, Position)>,
    /// `cache:` as read.
    pub(super) cache: Option<Cache>,
}

/// A name and where it was written, so that a reference can be blamed.
#[derive(Clone)]
pub(super) struct Named {
    pub(super) name: String,
    pub(super) position: Position,
}

/// What a value is, for messages: "`timeout` in stage `build`".
pub(super) struct Path<'p> {
    pub(super) key: &'p str,
    /// " in stage `build`", or "" at the top level.
    pub(super) place: &'p str,
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`{}", self.key, self.place)
    }
}

/// One key a mapping accepts and how its value is read into `T`.
pub(super) type Field<T> = (
    &'static str,
    fn(&mut T, Node<'_>, &Path<'_>) -> Result<(), Problem>,
);

/// The top level of the file, while it is being read.
#[derive(Default)]
struct TopLevel {
    name: Option<String>,
    defaults: Defaults,
    triggers: Triggers,
    timeout: Option<Duration>,
    retention: Option<Retention>,
    params: Option<Vec<(Param, Position)>>,
    env: BTreeMap<String, String>,
    stages: Option<Vec<StageDraft>>,
}

// The tables are kept one key per line by hand: they read as the schema.
#[rustfmt::skip]
const TOP_LEVEL_FIELDS: &[Field<TopLevel>] = &[
    ("pipeline", |top, v, path| set(&mut top.name, values::name(v, path).map(Some))),
    ("defaults", |top, v, path| read_defaults(&mut top.defaults, v, path)),
    ("triggers", |top, v, path| set(&mut top.triggers, triggers::read(v, path))),
    ("on", |top, v, path| set(&mut top.triggers, triggers::read(v, path))),
    ("timeout", |top, v, path| set(&mut top.timeout, values::timeout(v, path).map(Some))),
    ("params", |top, v, path| set(&mut top.params, params::read(v, path).map(Some))),
    ("env", |top, v, path| set(&mut top.env, values::env(v, path))),
    ("stages", |top, v, path| set(&mut top.stages, read_stages(v, path).map(Some))),
    ("retention", |top, v, path| set(&mut top.retention, retention::read(v, path).map(Some))),
];

#[rustfmt::skip]
const DEFAULTS_FIELDS: &[Field<Defaults>] = &[
    ("image", |d, v, path| set(&mut d.image, values::image(v, path).map(Some))),
    ("timeout", |d, v, path| set(&mut d.timeout, values::timeout(v, path).map(Some))),
    ("retries", |d, v, path| set(&mut d.retries, values::retries(v, path).map(Some))),
    ("pull", |d, v, path| set(&mut d.container.pull, container::pull(v, path).map(Some))),
    ("resources", |d, v, path| read_resources(&mut d.container, v, path)),
    ("network", |d, v, path| set(&mut d.container.network, container::network(v, path).map(Some))),
];

#[rustfmt::skip]
const STAGE_FIELDS: &[Field<StageDraft>] = &[
    ("needs", |s, v, path| set(&mut s.needs, values::needs(v, path))),
    ("commands", |s, v, path| set(&mut s.commands, values::commands(v, path))),
    ("env", |s, v, path| set(&mut s.env, values::env(v, path))),
    ("secrets", |s, v, path| set(&mut s.secrets, values::secrets(v, path).map(|names| Some((names, v.position()))))),
    ("timeout", |s, v, path| set(&mut s.timeout, values::timeout(v, path).map(Some))),
    ("retries", |s, v, path| set(&mut s.retries, values::retries(v, path).map(Some))),
    ("allow_failure", |s, v, path| set(&mut s.allow_failure, values::flag(v, path))),
    ("matrix", |s, v, path| set(&mut s.matrix, matrix::read(v, path).map(Some))),
    ("image", |s, v, path| set(&mut s.image, values::image(v, path).map(Some))),
    ("agent", read_agent),
    ("executor", |s, v, path| set(&mut s.executor, container::executor(v, path).map(Some))),
    ("pull", |s, v, path| set(&mut s.container.pull, container::pull(v, path).map(Some))),
    ("resources", |s, v, path| read_resources(&mut s.container, v, path)),
    ("network", |s, v, path| set(&mut s.container.network, container::network(v, path).map(Some))),
    ("artifacts", read_artifacts),
    ("metrics", |s, v, path| set(&mut s.delivery.metrics, delivery::metrics(v, path).map(Some))),
    ("environment", |s, v, path| set(&mut s.delivery.environment, delivery::environment(v, path).map(Some))),
    ("endpoint", |s, v, path| set(&mut s.delivery.endpoint, delivery::endpoint(v, path).map(Some))),
    ("model", |s, v, path| set(&mut s.delivery.model, delivery::model(v, path).map(Some))),
    ("gate", |s, v, path| set(&mut s.delivery.gate, delivery::gate(v, path, &s.name.clone()).map(Some))),
    ("monitor", |s, v, path| set(&mut s.delivery.monitor, delivery::monitor(v, path, &s.name.clone()).map(Some))),
    ("strategy", |s, v, path| set(&mut s.delivery.strategy, super::strategy::read(v, path, &s.name.clone()).map(Some))),
    ("services", |s, v, path| set(&mut s.services, services::read(v, path, &s.name.clone()).map(Some))),
    ("cache", |s, v, path| set(&mut s.cache, cache::read(v, path, &s.name.clone()).map(Some))),
];

/// The long form `artifacts: {paths: [...], when: always}`.
#[rustfmt::skip]
const ARTIFACTS_FIELDS: &[Field<StageDraft>] = &[
    ("paths", |s, v, path| set(&mut s.artifacts, values::artifact_paths(v, path))),
    ("when", |s, v, path| set(&mut s.artifacts_always, values::artifacts_when(v, path))),
];

/// `agent:` only narrows where a stage runs, so it reads straight into the stage.
#[rustfmt::skip]
const AGENT_FIELDS: &[Field<StageDraft>] = &[
    ("labels", |s, v, path| set(&mut s.agent_labels, values::labels(v, path))),
];

/// `resources:` of a stage or of `defaults`; each limit falls back separately.
#[rustfmt::skip]
const RESOURCES_FIELDS: &[Field<ContainerDraft>] = &[
    ("memory", |c, v, path| set(&mut c.memory_bytes, container::memory(v, path).map(Some))),
    ("cpus", |c, v, path| set(&mut c.cpus, container::cpus(v, path).map(Some))),
    ("pids", |c, v, path| set(&mut c.pids, container::pids(v, path).map(Some))),
    ("gpus", |c, v, path| set(&mut c.gpus, container::gpus(v, path).map(Some))),
];

/// Reads the whole file into a [`Draft`], or the first problem in it.
pub(super) fn read(document: &Document<'_>) -> Result<Draft, Problem> {
    let Some(root) = document.root().filter(|root| !root.is_null()) else {
        return Err(Problem::new(
            Position { line: 1, column: 1 },
            "the file is empty; a pipeline needs at least `pipeline: NAME` and `stages:`",
        ));
    };
    if root.entries().is_none() {
        return Err(Problem::new(
            root.position(),
            format!(
                "the top level must be a mapping with `pipeline:` and `stages:`; found {}",
                root.describe()
            ),
        ));
    }
    let mut top = TopLevel::default();
    read_fields(&mut top, root, TOP_LEVEL_FIELDS, "the top level", "")?;
    let Some(name) = top.name else {
        return Err(Problem::new(
            root.position(),
            "the file has no `pipeline` name; add `pipeline: NAME` at the top",
        ));
    };
    let Some(stages) = top.stages else {
        return Err(no_stages(root.position()));
    };
    let params = top.params.unwrap_or_default();
    check_param_names(&params, &top.env, &stages)?;
    Ok(Draft {
        name,
        defaults: top.defaults,
        triggers: top.triggers,
        timeout: top.timeout,
        retention: top.retention,
        params: params.into_iter().map(|(param, _)| param).collect(),
        env: top.env,
        stages,
    })
}

/// A parameter reaches stages as the variable of its name, so nothing else
/// may set that variable: one value, the run's.
fn check_param_names(
    params: &[(Param, Position)],
    env: &BTreeMap<String, String>,
    stages: &[StageDraft],
) -> Result<(), Problem> {
    for (param, position) in params {
        let name = &param.name;
        let clash = if env.contains_key(name) {
            Some("the top-level `env`".to_owned())
        } else {
            stages.iter().find_map(|stage| {
                let secret = stage
                    .secrets
                    .as_ref()
                    .is_some_and(|(secrets, _)| secrets.contains(name));
                (stage.env.contains_key(name) || secret).then(|| format!("stage `{}`", stage.name))
            })
        };
        if let Some(place) = clash {
            return Err(Problem::new(
                *position,
                format!(
                    "`{name}` is a parameter and is also set in {place}; stages get the run's value of a parameter, so rename one of them"
                ),
            ));
        }
    }
    Ok(())
}

fn read_defaults(defaults: &mut Defaults, value: Node<'_>, path: &Path<'_>) -> Result<(), Problem> {
    read_fields(
        defaults,
        value,
        DEFAULTS_FIELDS,
        &path.to_string(),
        " in `defaults`",
    )
}

fn read_stages(value: Node<'_>, path: &Path<'_>) -> Result<Vec<StageDraft>, Problem> {
    if value.is_null() {
        return Err(no_stages(value.position()));
    }
    let entries = values::mapping(value, path, "a mapping from stage name to stage")?;
    if entries.is_empty() {
        return Err(no_stages(value.position()));
    }
    // Repeats are reported before anything else in the mapping, because the
    // tree holds only one of the two stages and reading it would blame the
    // wrong lines.
    if let Some((name, position)) = value.duplicate_key() {
        return Err(Problem::new(
            position,
            format!(
                "duplicate stage `{name}`; stage names must be unique, rename or remove this one"
            ),
        ));
    }
    if let Some((extra, _)) = entries.get(MAX_STAGES) {
        return Err(Problem::new(
            extra.position(),
            format!(
                "the pipeline has {} stages, more than the limit of {MAX_STAGES}; split it into \
                 several pipelines",
                entries.len()
            ),
        ));
    }
    entries
        .into_iter()
        .map(|(key, body)| read_stage(key, body))
        .collect()
}

fn read_stage(key: Node<'_>, body: Node<'_>) -> Result<StageDraft, Problem> {
    let name = values::stage_name(key)?;
    let mut stage = StageDraft {
        name,
        position: key.position(),
        needs: Vec::new(),
        commands: Vec::new(),
        env: BTreeMap::new(),
        secrets: None,
        timeout: None,
        retries: None,
        allow_failure: false,
        image: None,
        agent_labels: BTreeMap::new(),
        executor: None,
        container: ContainerDraft::default(),
        artifacts: Vec::new(),
        artifacts_always: false,
        delivery: DeliveryDraft::default(),
        matrix: None,
        cell_of: None,
        services: None,
        cache: None,
    };
    // `build:` with nothing under it is a stage without commands, not a type error.
    if !body.is_null() {
        let what = format!("stage `{}`", stage.name);
        let place = format!(" in stage `{}`", stage.name);
        read_fields(&mut stage, body, STAGE_FIELDS, &what, &place)?;
    }
    require_executor_label(&mut stage)?;
    check_secrets(&stage)?;
    check_delivery(&stage)?;
    if stage.commands.is_empty() && stage.delivery.gate.is_none() {
        return Err(Problem::new(
            stage.position,
            format!(
                "stage `{}` has no commands; add `commands: [...]`",
                stage.name
            ),
        ));
    }
    Ok(stage)
}

fn read_agent(stage: &mut StageDraft, value: Node<'_>, path: &Path<'_>) -> Result<(), Problem> {
    let place = format!(" in `agent` of stage `{}`", stage.name);
    read_fields(stage, value, AGENT_FIELDS, &path.to_string(), &place)
}

/// A secret arrives as the environment variable of its name, so `env` must
/// not set that variable too: one of the two would silently win.
fn check_secrets(stage: &StageDraft) -> Result<(), Problem> {
    let Some((names, at)) = &stage.secrets else {
        return Ok(());
    };
    match names.iter().find(|name| stage.env.contains_key(*name)) {
        Some(name) => Err(Problem::new(
            *at,
            format!(
                "stage `{}` sets `{name}` in `env` and also lists it in `secrets`; a secret \
                 becomes the variable of its name, so remove one of the two",
                stage.name
            ),
        )),
        None => Ok(()),
    }
}

/// A gate is evaluated by the coordinator: it runs nothing and makes
/// nothing. A monitor watches an environment's release.
fn check_delivery(stage: &StageDraft) -> Result<(), Problem> {
    let name = &stage.name;
    if let Some((_, at)) = &stage.delivery.gate {
        let extra = [
            (!stage.commands.is_empty(), "commands"),
            (stage.secrets.is_some(), "secrets"),
            (!stage.artifacts.is_empty(), "artifacts"),
            (stage.delivery.metrics.is_some(), "metrics"),
            (stage.delivery.environment.is_some(), "environment"),
            (stage.delivery.monitor.is_some(), "monitor"),
            (stage.delivery.strategy.is_some(), "strategy"),
            (stage.services.is_some(), "services"),
            (stage.cache.is_some(), "cache"),
            (stage.delivery.endpoint.is_some(), "endpoint"),
            (stage.delivery.model.is_some(), "model"),
        ];
        if let Some((_, key)) = extra.iter().find(|(present, _)| *present) {
            return Err(Problem::new(
                *at,
                format!(
                    "stage `{name}` is a gate, which the coordinator evaluates without running anything; remove `{key}` or make it a separate stage"
                ),
            ));
        }
    }
    if let Some((_, at)) = &stage.delivery.endpoint
        && stage.delivery.environment.is_none()
    {
        return Err(Problem::new(
            *at,
            format!(
                "stage `{name}` has an `endpoint` but no `environment`; an endpoint is where an environment stage's release is served"
            ),
        ));
    }
    if let Some((_, at)) = &stage.delivery.model
        && stage.delivery.environment.is_none()
    {
        return Err(Problem::new(
            *at,
            format!(
                "stage `{name}` has a `model` but no `environment`; `model` names what an environment stage releases"
            ),
        ));
    }
    if let Some((_, at)) = &stage.delivery.strategy
        && stage.delivery.environment.is_none()
    {
        return Err(Problem::new(
            *at,
            format!(
                "stage `{name}` has a `strategy` but no `environment`; a strategy says how an environment stage's release replaces the live one"
            ),
        ));
    }
    if let Some((_, at)) = &stage.delivery.monitor
        && stage.delivery.environment.is_none()
    {
        return Err(Problem::new(
            *at,
            format!(
                "stage `{name}` has a `monitor` but no `environment`; a monitor watches the release an environment stage makes"
            ),
        ));
    }
    Ok(())
}

/// `artifacts: [paths]`, or the mapping form with `when`.
fn read_artifacts(stage: &mut StageDraft, value: Node<'_>, path: &Path<'_>) -> Result<(), Problem> {
    if value.entries().is_none() {
        return set(&mut stage.artifacts, values::artifact_paths(value, path));
    }
    let place = format!(" in `artifacts` of stage `{}`", stage.name);
    read_fields(stage, value, ARTIFACTS_FIELDS, &path.to_string(), &place)
}

/// `resources: {memory, cpus, pids}`; its keys are named "`memory` in
/// `resources` of stage `build`".
fn read_resources(
    container: &mut ContainerDraft,
    value: Node<'_>,
    path: &Path<'_>,
) -> Result<(), Problem> {
    let owner = path.place.strip_prefix(" in").unwrap_or(path.place);
    let place = format!(" in `{}` of{owner}", path.key);
    read_fields(
        container,
        value,
        RESOURCES_FIELDS,
        &path.to_string(),
        &place,
    )
}

/// `executor: docker` is placement: it becomes the agent label
/// `executor=docker`, which agents advertise. A stage that also names that
/// label under `agent.labels` must not ask for something else there.
fn require_executor_label(stage: &mut StageDraft) -> Result<(), Problem> {
    let Some((kind, position)) = stage.executor else {
        return Ok(());
    };
    match stage.agent_labels.get(EXECUTOR_LABEL) {
        Some(label) if label != kind => Err(Problem::new(
            position,
            format!(
                "stage `{}` sets `executor: {kind}` but its `agent.labels` require \
                 `{EXECUTOR_LABEL}: {label}`; remove one of the two",
                stage.name
            ),
        )),
        _ => {
            stage
                .agent_labels
                .insert(EXECUTOR_LABEL.to_owned(), kind.to_owned());
            Ok(())
        }
    }
}

/// Reads a mapping whose keys must all come from `fields`. `what` names the
/// mapping ("stage `build`"), `place` is appended to its keys' names.
pub(super) fn read_fields<T>(
    target: &mut T,
    mapping: Node<'_>,
    fields: &[Field<T>],
    what: &str,
    place: &str,
) -> Result<(), Problem> {
    let entries = values::mapping(mapping, &what, "a mapping")?;
    if let Some((key, position)) = mapping.duplicate_key() {
        let place = place_or_top_level(place);
        return Err(Problem::new(
            position,
            format!("duplicate key `{key}`{place}; remove one of the two"),
        ));
    }
    for (key, value) in entries {
        let key_text = values::key(key, place)?;
        let Some((name, read)) = fields.iter().find(|(name, _)| *name == key_text) else {
            let names = fields.iter().map(|(name, _)| *name);
            let expected = names.clone().collect::<Vec<_>>().join(", ");
            let place = place_or_top_level(place);
            return Err(Problem::new(
                key.position(),
                format!(
                    "unknown key `{key_text}`{place}; expected one of: {expected}{}",
                    did_you_mean(key_text, names)
                ),
            ));
        };
        read(target, value, &Path { key: name, place })?;
    }
    Ok(())
}

/// Stores a value that was read, so that the tables above fit on a line each.
pub(super) fn set<T>(slot: &mut T, value: Result<T, Problem>) -> Result<(), Problem> {
    *slot = value?;
    Ok(())
}

/// Messages say "in stage `build`", and "at the top level" where `place` is "".
pub(super) fn place_or_top_level(place: &str) -> &str {
    if place.is_empty() {
        " at the top level"
    } else {
        place
    }
}

fn no_stages(position: Position) -> Problem {
    Problem::new(
        position,
        "the pipeline has no stages; add at least one under `stages:`",
    )
}
