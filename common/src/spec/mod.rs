//! The `kiln.yml` pipeline file.
//!
//! [`parse`] turns the text of a pipeline file into a validated [`Pipeline`]:
//! a DAG of stages whose `needs` are resolved to indices. Every problem is a
//! [`SpecError`] that names the file, the line and column, what is wrong and
//! what to change.
//!
//! # Layout
//! The text goes through three passes, each in its own module:
//! - `yaml`: text to a tree of nodes that know their line and column
//!   (saphyr), plus the repeated keys the tree itself cannot hold.
//! - `schema`: the tree to a draft, one table of known keys per mapping;
//!   every wrong key, type or value stops here, pointing at its node.
//! - `validate`: the draft to a [`Pipeline`]: required keys, `needs` resolved
//!   to indices, cycles, defaults applied.
//!
//! `values` reads single values for `schema`, `container` the docker
//! settings (`executor`, `pull`, `resources`, `network`), `delivery` the
//! delivery keys of a stage, `triggers` the pipeline's `triggers:`,
//! `services` a stage's `services:`, `cache` its `cache:`, `retention` the
//! pipeline's `retention:`;
//! `suggest` is a small helper. Durations are read by [`crate::duration`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

pub use delivery::{
    Approval, Condition, Gate, MaxRegression, Monitor, MonitorSource, OnBreach, OnMissing, Op,
    Select,
};
pub use params::{MAX_PARAM_BYTES, MAX_PARAMS, Param, ParamKind, resolve as resolve_params};
pub use services::{DEFAULT_HEALTH_TIMEOUT, MAX_SERVICES};
pub use strategy::{DEFAULT_PAUSE, Strategy, StrategyKind};
pub use triggers::{
    DEFAULT_DATA_EVERY, DataTrigger, MAX_SCHEDULES, MIN_DATA_INTERVAL, MergeRequestTrigger,
    PushTrigger, Triggers,
};

mod cache;
mod container;
mod delivery;
mod matrix;
mod params;
mod retention;
mod schema;
mod services;
mod strategy;
mod suggest;
mod triggers;
mod validate;
mod values;
mod yaml;

#[cfg(test)]
mod tests;

/// Stage timeout when neither the stage nor `defaults` sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// Re-dispatches after a lost agent or an infrastructure failure when neither
/// the stage nor `defaults` sets `retries`.
pub const DEFAULT_RETRIES: u32 = 1;

/// The agent label that says how an agent runs stages (`docker` or
/// `process`): every agent advertises it, and a stage's `executor:` key
/// requires it.
pub const EXECUTOR_LABEL: &str = "executor";

// Input limits. Each is far beyond what a real pipeline needs and keeps a
// hostile or broken file (a generated one, a paste gone wrong) from costing
// the coordinator, which parses every registered file, more than a moment.

/// Largest pipeline file [`parse`] accepts, checked before any parsing.
pub const MAX_FILE_BYTES: usize = 1024 * 1024;
/// Most stages one pipeline may have.
pub const MAX_STAGES: usize = 500;
/// Most `commands` one stage may have.
pub const MAX_COMMANDS: usize = 100;
/// Longest single command, in bytes (a `|` block counts as one command).
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Longest pipeline, stage or environment name; also the longest label name
/// or value ([`crate::labels::MAX_LABEL_LEN`]) and secret name.
pub const MAX_NAME_LEN: usize = 64;

/// A validated pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct Pipeline {
    /// The `pipeline:` name; lowercase letters, digits, `.`, `_` and `-`.
    pub name: String,
    /// In file order; `Stage::needs` indexes into this list.
    pub stages: Vec<Stage>,
    /// `triggers:` what starts runs besides `kiln run`.
    pub triggers: Triggers,
    /// `timeout:` at the top level: how long a whole run may take before
    /// what still runs is stopped and the run fails.
    pub timeout: Option<Duration>,
    /// `retention:` how many finished runs `kiln gc` keeps; `None` keeps
    /// them all (their artifacts still go after `--artifact-keep-days`).
    pub retention: Option<Retention>,
    /// `params:` the values a run is started with, in file order.
    pub params: Vec<Param>,
    /// `env:` at the top level (already merged into every stage's `env`,
    /// under the stage's own values).
    pub env: BTreeMap<String, String>,
}

/// `retention: {keep: {runs: N, days: D}}`: a finished run is kept while it
/// is among its pipeline's newest `runs` finished runs or finished within
/// `days` (at least one is set); runs that made a release always are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub runs: Option<u32>,
    pub days: Option<u32>,
}

/// One stage, with the pipeline's `defaults` already applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    /// Unique within the pipeline; same characters as the pipeline name.
    pub name: String,
    /// Indices into `Pipeline::stages`, in the order the file lists them.
    pub needs: Vec<usize>,
    /// Run in order as one `sh -e` script.
    pub commands: Vec<String>,
    /// Extra environment variables for the commands; numbers and booleans
    /// are kept as the text the file spells them with.
    pub env: BTreeMap<String, String>,
    /// `secrets: [NAME, ..]`: kiln secrets the stage receives as environment
    /// variables of the same name, in file order. Each name passes
    /// [`is_secret_name`], appears once, and is not also a key of `env`; a
    /// gate has none.
    pub secrets: Vec<String>,
    /// How long the stage may run before it is stopped and failed.
    pub timeout: Duration,
    /// New attempts allowed, for the causes in `retry_when`.
    pub retries: u32,
    /// `retries: {when: [...]}`: which endings earn a new attempt.
    pub retry_when: RetryWhen,
    /// `allow_failure: true`: a failure (or time-out) of this stage lets
    /// the stages after it run and does not fail the run.
    pub allow_failure: bool,
    /// `agent: { labels: {..} }`: an agent must carry all of them. A stage's
    /// `executor: KIND` is here too, as [`EXECUTOR_LABEL`]`=KIND`.
    pub agent_labels: BTreeMap<String, String>,
    /// Container image for the docker executor.
    pub image: Option<String>,
    /// Container settings for the docker executor (`pull`, `resources`,
    /// `network`); the process executor ignores them.
    pub container: ContainerSettings,
    /// `artifacts:` workspace-relative paths packed and uploaded after the
    /// stage, and restored in the workspaces of the stages that need it.
    pub artifacts: Vec<String>,
    /// `artifacts: {when: always}`: upload after a failure too.
    pub artifacts_always: bool,
    /// `metrics:` a flat JSON file of numbers the coordinator reads.
    pub metrics: Option<String>,
    /// `environment:` success creates a release there.
    pub environment: Option<String>,
    /// `endpoint:` where that release is served: recorded on the release
    /// and given as `KILN_ENDPOINT` to this stage and to the stages that
    /// need it (an acceptance stage asks the deployed model itself).
    pub endpoint: Option<String>,
    /// `model:` what that release is a version of (`NAME@N`); the
    /// coordinator numbers the versions and moves the aliases.
    pub model: Option<String>,
    /// `gate:` evaluated by the coordinator; such a stage has no commands.
    pub gate: Option<Gate>,
    /// `monitor:` watches the release this stage makes.
    pub monitor: Option<Monitor>,
    /// `strategy:` how its release replaces the live one (canary steps or
    /// a shadow); `None`: all at once.
    pub strategy: Option<Strategy>,
    /// For a cell of a `matrix:` (`train[lr=0.1]`): the stage as written
    /// (`train`).
    pub cell_of: Option<String>,
    /// `services:` containers started beside this (docker) stage, in file
    /// order; names are unique within the stage.
    pub services: Vec<Service>,
    /// `cache:` directories restored before the stage and saved after it.
    pub cache: Option<Cache>,
}

/// A stage's `cache:`.
#[derive(Clone, Debug, PartialEq)]
pub struct Cache {
    /// Rendered by the agent in the stage's directory.
    pub key: crate::cache_key::CacheKey,
    /// Directories (or files) relative to the stage's directory.
    pub paths: Vec<String>,
    /// Also kept in the coordinator's blob store for every agent.
    pub shared: bool,
}

/// One of a docker stage's `services:`: a container on the attempt's own
/// network, reachable from the stage by `name`.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    /// Its host name on the attempt's network: a DNS label.
    pub name: String,
    pub image: String,
    pub env: BTreeMap<String, String>,
    /// Arguments replacing the image's command; empty keeps the image's.
    pub command: Vec<String>,
    /// A shell command run inside the service until it succeeds; `None`:
    /// the service is ready once it runs.
    pub health: Option<String>,
    /// How long the service may take to become ready.
    pub health_timeout: Duration,
}

/// `retries: {max: N, when: [agent_lost, infra_error, timeout, failed]}` —
/// which endings of an attempt earn a new one. A plain `retries: N` retries
/// only for infrastructure causes: a lost agent or an agent-side failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryWhen {
    pub agent_lost: bool,
    pub infra_error: bool,
    pub timeout: bool,
    /// The commands failed (a non-zero exit).
    pub failed: bool,
}

impl Default for RetryWhen {
    fn default() -> Self {
        Self {
            agent_lost: true,
            infra_error: true,
            timeout: false,
            failed: false,
        }
    }
}

/// How a docker stage gets its image, what it may use, and its network.
/// `resources:` (`cpus`, `memory`, `gpus`) also places the stage, docker or
/// process: it goes only to an agent where that much is free.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContainerSettings {
    pub pull: PullPolicy,
    /// `None` = the agent's default limit.
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<i64>,
    pub gpus: GpuRequest,
    pub network: NetworkMode,
}

/// `resources: {gpus: ..}` — what a stage asks of an agent's GPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum GpuRequest {
    #[default]
    None,
    /// Any `n` free devices.
    Count(u32),
    /// These device indexes, all free.
    Devices(Vec<u32>),
    /// Every device of an agent that has at least one, all free.
    All,
}

/// `pull:` — when the docker executor may pull the stage's image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Use the local image; pull only when it is missing.
    #[default]
    IfMissing,
    Always,
    Never,
}

/// `network:` of a docker stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetworkMode {
    /// No network at all: the safe default for build and test stages.
    #[default]
    None,
    Bridge,
}

/// Where in a file something is, 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// Line, counting from 1.
    pub line: usize,
    /// Column in characters (not bytes), counting from 1.
    pub column: usize,
}

/// One clear error about a pipeline file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{}:{}: {message}", position.line, position.column)]
pub struct SpecError {
    /// The name `parse` was given for the file.
    pub file: String,
    /// The node the error is about.
    pub position: Position,
    /// Lowercase; says what is wrong and what to change.
    pub message: String,
}

/// A kiln secret's name: `[A-Z_][A-Z0-9_]*`, at most [`MAX_NAME_LEN`]
/// characters. Secrets become environment variables of the same name, so the
/// rule is a shell variable name's, in upper case.
pub fn is_secret_name(text: &str) -> bool {
    let mut chars = text.chars();
    text.len() <= MAX_NAME_LEN
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_uppercase() || c == '_')
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

impl Pipeline {
    /// Stage index by name.
    pub fn stage_idx(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|stage| stage.name == name)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Parses and validates the text of a pipeline file; `file` is the name used
/// in errors.
///
/// Stops at the first problem: each pass needs the previous one to have
/// succeeded (a cycle check over stages with unknown `needs` would only add
/// noise), so one precise error beats a list of knock-on ones.
pub fn parse(file: &str, text: &str) -> Result<Pipeline, SpecError> {
    let parsed = check_size(text)
        .and_then(|()| yaml::load(text))
        .and_then(|document| schema::read(&document))
        .and_then(validate::pipeline);
    parsed.map_err(|problem| SpecError {
        file: file.to_owned(),
        position: problem.position,
        message: problem.message,
    })
}

/// Refuses a file over [`MAX_FILE_BYTES`] before saphyr sees any of it.
fn check_size(text: &str) -> Result<(), Problem> {
    if text.len() <= MAX_FILE_BYTES {
        return Ok(());
    }
    Err(Problem::new(
        Position { line: 1, column: 1 },
        format!(
            "the file is {} bytes, more than the limit of {MAX_FILE_BYTES} bytes (1 MiB); \
             a pipeline file holds stages, not data: move large content into the repository",
            text.len()
        ),
    ))
}

/// An error before it is given the file name; every pass returns these.
#[derive(Debug)]
struct Problem {
    position: Position,
    message: String,
}

impl Problem {
    fn new(position: Position, message: impl Into<String>) -> Self {
        Self {
            position,
            message: message.into(),
        }
    }
}
