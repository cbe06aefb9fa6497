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
//! - `stage`: one attempt from start to end: workspace, inputs, executor,
//!   outputs, and what its `StageFinished` says.
//! - `workspace`: attempt directories and the per-repository clone cache.
//! - `executor::contract`: what an executor is given and gives back — the
//!   `Job` to run, a `LogSink`, a `StopSignal`, and how it `Ended`.
//!   `executor::process` runs commands as host processes in their own
//!   process group, `executor::docker` in one container per attempt through
//!   the engine's API (bollard); `executor::build` picks one from the config.
//! - `logs`: how output becomes masked lines of bounded length and reaches
//!   the supervisor.
//! - `attempt`: what names an attempt (`AttemptKey`) and what its end says
//!   (`Report`); `config`, `error`, `timer`: plain leaves; [`Metrics`]: what
//!   `--metrics ADDR` serves, updated by the supervisor and stage tasks.
//! - [`transfer`]: blob upload (dedup) and resumable, verified download,
//!   shared with the CLI.
//!
//! # Layers
//!
//! Imports point down only (an arrow reads "may import"); the test
//! `tests/layering.rs` checks every `crate::`, `super::` and `self::` path
//! against this picture.
//!
//! ```text
//!                      supervisor ───────────────► connection
//!             ┌────────────┼──────────────────┐
//!             ▼            ▼                  ▼
//!          stages        stage ──► workspace  executor::build
//!             │   │       │   └──► transfer       │
//!             ▼   │       │                       ▼
//!          outbox │       │              executor::{process, docker}
//!                 ▼       ▼                       │
//!            executor::contract ◄─────────────────┘
//!       (Job, LogSink, StopSignal, Ended/Exit, Executor)
//!                         │
//!                         ▼
//!                       logs
//!                         │
//!                         ▼
//!  attempt, config, error, metrics, timer: leaves, importing nothing of the crate
//! ```
//!
//! Every layer may also import the leaves. An executor imports the contract,
//! `logs` and the leaves, nothing else: it knows nothing of stages, reports
//! or the supervisor. Only the supervisor picks an executor
//! (`executor::build`); `stage` sees an `Arc<dyn Executor>`.
//!
//! # Work dir
//!
//! `work_dir/ws/<run>-<stage_idx>-<attempt>` holds one attempt (removed when
//! it ends, and all of `ws/` when the agent starts: a work dir belongs to one
//! agent process); `work_dir/cache/<sha256(repo) prefix>` holds a bare clone
//! per repository, and in it `kiln-workspace.git`, the `.git` each
//! workspace gets a copy of.
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

use std::future::Future;

mod attempt;
mod cache;
mod config;
mod connection;
mod error;
mod executor;
mod logs;
mod metrics;
mod outbox;
mod resources;
mod stage;
mod stages;
mod supervisor;
mod timer;
pub mod transfer;
mod workspace;

pub use config::{AllowedMount, Config, DockerConfig, ExecutorKind};
pub use error::Error;
pub use metrics::Metrics;
pub use resources::{detect_gpus, parse_gpus};

/// Runs the agent until `shutdown` completes and its stages are finished or
/// handed back.
///
/// Unreachable coordinators are retried forever; only an unusable `config`
/// or work dir is an error.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Metrics::new(config.executor.label());
    run_with_metrics(config, metrics, shutdown).await
}

/// [`run`], keeping `metrics` up to date (the binary serves them with
/// `--metrics ADDR`).
pub async fn run_with_metrics(
    config: Config,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    supervisor::run(config, metrics, shutdown).await?;
    Ok(())
}
