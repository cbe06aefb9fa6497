//! Kiln's agent: runs on a build machine, keeps one gRPC stream open to the
//! coordinator, runs the stage attempts it is assigned, and streams their
//! logs and outcomes back until the coordinator has stored them.
//!
//! The binary `kiln-agent` turns flags into a [`Config`] and calls [`run`];
//! `kiln demo` and the end-to-end tests embed agents the same way.
//!
//! # Layout
//!
//! - `supervisor`: the main loop. One task owns all state and reacts to
//!   coordinator messages, stage events, timers and shutdown (drain, hand
//!   back, await acks, close).
//! - `connection`: the stream itself: `Hello` first, `Welcome` back,
//!   heartbeats, HTTP/2 pings, reconnect backoff.
//! - `stages`: every attempt the agent holds, and how `Welcome`, `Ack` and
//!   `Cancel` change them; `outbox`: one attempt's sequence-numbered log
//!   lines and `StageFinished`, kept until acknowledged. Both are plain data,
//!   tested without a network.
//! - `stage`: one attempt from start to end: workspace, executor, outcome.
//! - `workspace`: attempt directories and the per-repository clone cache.
//! - `executor`: the `Executor` seam; `executor::process` runs commands as
//!   host processes in their own process group, `executor::docker` in one
//!   container per attempt through the engine's API (bollard).
//! - `logs`: how output becomes lines and reaches the supervisor.
//! - [`transfer`]: blob upload (dedup) and resumable, verified download,
//!   shared with the CLI.
//!
//! # Work dir
//!
//! `work_dir/ws/<run>-<stage_idx>-<attempt>` holds one attempt (removed when
//! it ends, and all of `ws/` when the agent starts: a work dir belongs to one
//! agent process); `work_dir/cache/<sha256(repo) prefix>` holds a bare clone
//! per repository.
//!
//! # Guarantees
//!
//! - Log lines of an attempt are numbered from 0 and reach the coordinator
//!   without gaps or duplicates across reconnects, all before the attempt's
//!   `StageFinished`.
//! - No process of a stage outlives it: timeouts, cancels and shutdown signal
//!   the stage's whole process group, SIGTERM then SIGKILL. No container
//!   outlives it either: it is stopped the same way and removed whatever
//!   the outcome, and containers labelled with this agent's name that a
//!   crash left behind are removed when the agent starts.
//! - The agent advertises the label `executor=process|docker`, which a
//!   stage's `executor:` key selects.
//! - Memory stays bounded: an attempt with too many unacknowledged lines
//!   stops being read until the coordinator catches up.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

mod connection;
mod error;
mod executor;
mod logs;
mod outbox;
mod stage;
mod stages;
mod supervisor;
pub mod transfer;
mod workspace;

pub use error::Error;

/// Which executor runs stages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecutorKind {
    /// Host processes under `sh -e`.
    Process,
    /// One container per attempt on a Docker engine.
    Docker(DockerConfig),
}

impl ExecutorKind {
    /// The value of the `executor` label the agent advertises.
    pub fn label(&self) -> &'static str {
        match self {
            ExecutorKind::Process => "process",
            ExecutorKind::Docker(_) => "docker",
        }
    }
}

/// How the docker executor reaches its engine and what it may mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerConfig {
    /// The engine's address: `unix:///var/run/docker.sock` or
    /// `tcp://HOST:PORT` (plain HTTP).
    pub host: String,
    /// Host paths mounted into every stage container, at the same path.
    /// Nothing but the workspace is mounted unless the operator lists it
    /// here: the docker socket in particular gives a stage the whole host.
    pub allow_mounts: Vec<AllowedMount>,
}

/// One entry of [`DockerConfig::allow_mounts`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedMount {
    /// An absolute host path that exists when the agent starts.
    pub path: PathBuf,
    /// Read-only unless the operator asked for `PATH:rw`.
    pub read_only: bool,
}

impl std::str::FromStr for AllowedMount {
    type Err = String;

    /// `PATH` (read-only) or `PATH:rw`; `PATH:ro` is also accepted.
    fn from_str(text: &str) -> Result<Self, String> {
        let (path, read_only) = match text.rsplit_once(':') {
            Some((path, "rw")) => (path, false),
            Some((path, "ro")) => (path, true),
            _ => (text, true),
        };
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(format!(
                "mount `{text}` is not an absolute path; write e.g. /data/cache or /data/cache:rw"
            ));
        }
        Ok(AllowedMount { path, read_only })
    }
}

/// Everything the agent needs to start; the binary builds it from flags.
#[derive(Clone, Debug)]
pub struct Config {
    /// The coordinator's gRPC address, e.g. `http://127.0.0.1:7700` or
    /// `https://kiln.example:7700`.
    pub coordinator: String,
    /// CA file, client certificate and token for reaching the coordinator.
    pub client: kiln_common::channel::ClientOptions,
    /// Unique per machine: a second agent with the same name replaces the
    /// first at the coordinator.
    pub name: String,
    /// What stages may ask for to be placed here (`role=deploy`).
    pub labels: BTreeMap<String, String>,
    /// How many stages run at once.
    pub capacity: u32,
    /// Workspaces and the clone cache live here.
    pub work_dir: PathBuf,
    /// How stages run; also advertised as the label `executor=...`.
    pub executor: ExecutorKind,
    /// After shutdown is requested, running stages get this long to finish
    /// before they are handed back.
    pub drain_timeout: Duration,
}

/// Runs the agent until `shutdown` completes and its stages are finished or
/// handed back.
///
/// Unreachable coordinators are retried forever; only an unusable `config`
/// or work dir is an error.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    supervisor::run(config, shutdown).await?;
    Ok(())
}

/// Sleeps until `deadline`, or forever without one: a timer branch of a
/// `select!` that is switched off by passing `None`.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_mounts_are_absolute_and_read_only_by_default() {
        let mount = |text: &str| text.parse::<AllowedMount>();
        assert_eq!(
            mount("/data"),
            Ok(AllowedMount {
                path: "/data".into(),
                read_only: true
            })
        );
        assert!(!mount("/var/run/docker.sock:rw").unwrap().read_only);
        assert!(mount("/data:ro").unwrap().read_only);
        assert!(mount("data").unwrap_err().contains("absolute"));
    }
}
