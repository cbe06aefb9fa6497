//! The seam between "what a stage runs" and "how it runs": an [`Executor`]
//! gets a prepared workspace, the commands, their environment, a timeout and
//! a stop signal, streams the output into a [`LogSink`] and says how the
//! commands ended. [`process`] runs them as host processes, [`docker`] in a
//! container per attempt.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kiln_proto::v1::DockerOptions;

use crate::error::Error;
use crate::logs::LogSink;
use crate::stages::{AttemptKey, Stop, StopSignal};
use crate::{Config, ExecutorKind};

pub(crate) mod docker;
pub(crate) mod process;

/// One attempt's commands, ready to run.
pub(crate) struct Job {
    /// The attempt; containers are labelled with it.
    pub(crate) key: AttemptKey,
    /// The stage's name in the pipeline, for container labels.
    pub(crate) stage_name: String,
    /// Names files the executor keeps for the attempt: `<run>-<stage_idx>-<attempt>`.
    pub(crate) name: String,
    /// The attempt's checkout: what a container sees as `/workspace`.
    pub(crate) workspace: PathBuf,
    /// Where the commands run: `workspace`, or its `subdir`.
    pub(crate) dir: PathBuf,
    /// A directory outside the workspace for the executor's own files (the
    /// script), so the commands and their artifacts never see them.
    pub(crate) scratch: PathBuf,
    pub(crate) commands: Vec<String>,
    /// The pipeline's variables plus Kiln's (`KILN_RUN_ID`, `CI`, ...); the
    /// executor adds only what its host needs, such as `PATH`.
    pub(crate) env: BTreeMap<String, String>,
    /// The stage's secrets, also set as variables; no name is in `env`.
    /// Executors never log them or put them in a message: the values reach
    /// only the commands.
    pub(crate) secrets: BTreeMap<String, String>,
    /// `None` runs without a limit.
    pub(crate) timeout: Option<Duration>,
    /// The container image (pipeline default applied); "" when none is set.
    /// The process executor ignores it.
    pub(crate) image: String,
    /// Pull policy, limits and network of the container; the process
    /// executor ignores them.
    pub(crate) docker: DockerOptions,
}

/// What an executor reports: how the commands ended, and in what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ended {
    pub(crate) exit: Exit,
    /// The image the commands ran in, by digest; "" for host processes or
    /// when no container started.
    pub(crate) image_digest: String,
}

impl From<Exit> for Ended {
    fn from(exit: Exit) -> Self {
        Ended {
            exit,
            image_digest: String::new(),
        }
    }
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
    /// The kernel killed them at the container's memory limit (in bytes).
    OutOfMemory { limit_bytes: u64 },
    /// They could not start for a reason the pipeline must fix, such as an
    /// image no agent can get; says what to do. Retrying would not help.
    CannotStart(String),
}

pub(crate) trait Executor: Send + Sync {
    /// Runs `job` to its end. Every process it started is gone when the
    /// returned future completes, and soon after it is dropped.
    fn run<'a>(
        &'a self,
        job: Job,
        log: LogSink,
        stop: StopSignal,
    ) -> BoxFuture<'a, Result<Ended, Error>>;
}

/// The executor `config` asks for, ready to run stages. For docker that means
/// the engine answered and what a crash of this agent left there is gone.
pub(crate) async fn build(config: &Config) -> Result<Arc<dyn Executor>, Error> {
    Ok(match &config.executor {
        ExecutorKind::Process => Arc::new(process::ProcessExecutor::new(KILL_GRACE)),
        ExecutorKind::Docker(docker) => {
            Arc::new(docker::DockerExecutor::connect(&config.name, docker, KILL_GRACE).await?)
        }
    })
}

/// Between SIGTERM and SIGKILL: time for the commands to clean up.
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(5);

/// `5s` for whole seconds, `1500ms` otherwise: how Kiln's messages and
/// pipeline files write durations.
pub(crate) fn describe_duration(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}
