//! The seam between "what a stage runs" and "how it runs", and all an
//! executor may know about the rest of the agent: it gets a [`Job`] (a
//! prepared workspace, the commands, their environment, a timeout), a
//! [`LogSink`] for the output and a [`StopSignal`], and says how the
//! commands [`Ended`]. Stages, reports and the supervisor are above this
//! line and out of an executor's sight (see the layering in `lib.rs`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use kiln_proto::v1::{DockerOptions, StageService};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::attempt::AttemptKey;
use crate::error::Error;
use crate::logs::LogSink;

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
    /// GPU devices the coordinator reserved for the stage: a container gets
    /// a device request for them, a host process `CUDA_VISIBLE_DEVICES`.
    pub(crate) gpus: Vec<u32>,
    /// `services:` the docker executor starts beside the container, on a
    /// network of the attempt's own; the process executor never gets any
    /// (the coordinator places such stages on docker agents only).
    pub(crate) services: Vec<StageService>,
}

/// What an executor reports: how the commands ended, and in what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ended {
    pub(crate) exit: Exit,
    /// The image the commands ran in, by digest; "" for host processes or
    /// when no container started.
    pub(crate) image_digest: String,
    /// When the commands started (the shell was spawned, the container
    /// started); `None` when they never did. Stages measure their
    /// preparation up to it.
    pub(crate) started_at: Option<Instant>,
}

impl From<Exit> for Ended {
    fn from(exit: Exit) -> Self {
        Ended {
            exit,
            image_digest: String::new(),
            started_at: None,
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

/// Why a running attempt is told to stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The coordinator sent `Cancel`; the attempt ends as cancelled.
    Cancel(String),
    /// The agent is shutting down; the attempt ends as handed back.
    HandBack,
    /// The attempt is no longer this agent's; nobody wants its outcome.
    Forget,
}

/// How system log lines announce a stop.
impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Cancel(reason) if reason.is_empty() => f.write_str("cancelled"),
            Stop::Cancel(reason) => write!(f, "cancelled ({reason})"),
            Stop::HandBack => f.write_str("the agent is shutting down"),
            Stop::Forget => f.write_str("the stage is no longer this agent's"),
        }
    }
}

/// The receiving end of a [`Stop`]: executors and checkouts watch it.
#[derive(Clone)]
pub(crate) struct StopSignal(watch::Receiver<Option<Stop>>);

/// The sending end, held by whoever owns the attempt (the stage table).
pub(crate) struct StopSender(watch::Sender<Option<Stop>>);

/// A new signal, not yet fired, and its sender. Dropping the sender fires
/// the signal as [`Stop::Forget`].
pub(crate) fn stop_signal() -> (StopSender, StopSignal) {
    let (tx, rx) = watch::channel(None);
    (StopSender(tx), StopSignal(rx))
}

impl StopSignal {
    /// Completes once a stop is requested (at once if it already was).
    pub(crate) async fn stopped(&mut self) -> Stop {
        match self.0.wait_for(Option::is_some).await {
            Ok(stop) => stop.clone().unwrap_or(Stop::Forget),
            // The owner dropped the attempt without a word: it is forgotten.
            Err(_) => Stop::Forget,
        }
    }

    /// The stop requested so far, if any.
    #[cfg(test)]
    pub(crate) fn requested(&self) -> Option<Stop> {
        self.0.borrow().clone()
    }
}

impl StopSender {
    /// Fires the signal. The first reason wins: a cancelled attempt that is
    /// later handed back still reports cancelled.
    pub(crate) fn stop(&self, stop: Stop) {
        self.0.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(stop);
            true
        });
    }
}

/// What a stage killed at its memory limit reports, and logs.
pub(crate) fn out_of_memory_message(limit_bytes: u64) -> String {
    format!(
        "ran out of memory: the kernel killed the commands at the container's limit of {}; \
         raise `resources.memory` in kiln.yml or make the commands use less",
        describe_bytes(limit_bytes)
    )
}

/// `16Mi`, `2Gi`, or plain bytes: how `resources.memory` is written.
fn describe_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    UNITS
        .iter()
        .find(|(_, size)| bytes >= *size && bytes.is_multiple_of(*size))
        .map(|(unit, size)| format!("{}{unit}", bytes / size))
        .unwrap_or_else(|| format!("{bytes} bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_read_like_pipeline_files() {
        assert_eq!(describe_bytes(16 << 20), "16Mi");
        assert_eq!(describe_bytes(2 << 30), "2Gi");
        assert_eq!(describe_bytes(1_000_000_000), "1000000000 bytes");
        assert_eq!(describe_bytes(1536 << 10), "1536Ki");
    }

    #[tokio::test]
    async fn the_first_stop_wins_and_a_dropped_sender_forgets() {
        let (sender, mut signal) = stop_signal();
        assert_eq!(signal.requested(), None);
        sender.stop(Stop::Cancel("user asked".into()));
        sender.stop(Stop::HandBack);
        assert_eq!(signal.stopped().await, Stop::Cancel("user asked".into()));
        let (sender, mut signal) = stop_signal();
        drop(sender);
        assert_eq!(signal.stopped().await, Stop::Forget);
    }
}
