//! The seam between "what a stage runs" and "how it runs": an [`Executor`]
//! gets a prepared workspace, the commands, their environment, a timeout and
//! a stop signal, streams the output into a [`LogSink`] and says how the
//! commands ended. [`process`] runs them as host processes; a Docker executor
//! fits the same trait.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::ExecutorKind;
use crate::error::Error;
use crate::logs::LogSink;
use crate::stages::{Stop, StopSignal};

pub(crate) mod process;

/// One attempt's commands, ready to run.
pub(crate) struct Job {
    /// Names files the executor keeps for the attempt: `<run>-<stage_idx>-<attempt>`.
    pub(crate) name: String,
    /// Where the commands run: the workspace, or its `subdir`.
    pub(crate) dir: PathBuf,
    /// A directory outside the workspace for the executor's own files (the
    /// script), so the commands and their artifacts never see them.
    pub(crate) scratch: PathBuf,
    pub(crate) commands: Vec<String>,
    /// The pipeline's variables plus Kiln's (`KILN_RUN_ID`, `CI`, ...); the
    /// executor adds only what its host needs, such as `PATH`.
    pub(crate) env: BTreeMap<String, String>,
    /// `None` runs without a limit.
    pub(crate) timeout: Option<Duration>,
}

/// How the commands ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// They exited on their own with this status code.
    Code(i32),
    /// A signal the executor did not send killed them.
    Signal(i32),
    /// They outran `Job::timeout` and were killed.
    TimedOut(Duration),
    /// The stop signal fired and they were killed.
    Stopped(Stop),
}

pub(crate) trait Executor: Send + Sync {
    /// Runs `job` to its end. Every process it started is gone when the
    /// returned future completes or is dropped.
    fn run<'a>(
        &'a self,
        job: Job,
        log: LogSink,
        stop: StopSignal,
    ) -> BoxFuture<'a, Result<Exit, Error>>;
}

/// The executor `kind` names.
pub(crate) fn build(kind: ExecutorKind) -> Arc<dyn Executor> {
    match kind {
        ExecutorKind::Process => Arc::new(process::ProcessExecutor::new(process::KILL_GRACE)),
    }
}

/// `5s` for whole seconds, `1500ms` otherwise: how Kiln's messages and
/// pipeline files write durations.
pub(crate) fn describe_duration(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}
