//! The one error type of the agent library.

use std::io;
use std::path::PathBuf;

/// What went wrong, phrased for the operator who reads the log: what failed
/// and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `Config::coordinator` is not a URL tonic can dial, or the TLS files
    /// or token of `Config::client` are unusable.
    #[error(transparent)]
    Endpoint(#[from] kiln_common::channel::ChannelError),
    /// `Config` asks for something the agent cannot do.
    #[error("invalid agent config: {0}")]
    Config(String),
    /// Dialing the coordinator failed; the agent retries with backoff.
    #[error(
        "cannot reach the coordinator at {address}: {detail}; check that it runs and the address is right"
    )]
    Connect { address: String, detail: String },
    /// The coordinator answered and refused the agent's token (revoked, or
    /// made by a coordinator whose data directory is gone); retried like
    /// `Connect`, since an operator may create the token meanwhile.
    #[error(
        "token refused by the coordinator at {address}: {detail}; give the agent a valid agent \
         token (`kiln token create NAME --role agent`, then KILN_AGENT_TOKEN or --token-file)"
    )]
    TokenRefused { address: String, detail: String },
    /// The coordinator answered, but not as `kiln.v1` says it must.
    #[error(
        "the coordinator broke the protocol: {0}; check that agent and coordinator versions match"
    )]
    Protocol(String),
    /// A directory under the work dir could not be created, read or removed.
    #[error("cannot use {path}: {source}; check that the agent's work dir is writable")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `Assign.source` is unusable as given.
    #[error("invalid source: {0}; fix the pipeline's repository settings")]
    Source(String),
    /// A git command failed while preparing a workspace.
    #[error(
        "git {action} failed for {repo}: {detail}; check that the repository and commit are reachable from this agent"
    )]
    Git {
        action: &'static str,
        repo: String,
        detail: String,
    },
    /// The stage's commands could not be started.
    #[error("cannot start the stage's commands: {0}; check that `sh` exists on this agent")]
    Spawn(#[source] io::Error),
    /// The docker executor cannot use its engine at start-up.
    #[error(
        "cannot use the docker engine at {host}: {detail}; start dockerd, point --docker-host at \
         it, or run the agent with --executor process"
    )]
    DockerConnect { host: String, detail: String },
    /// A call to the docker engine failed while running a stage.
    #[error(
        "docker {action} failed: {detail}; check that the docker engine runs and has room \
         (disk, memory) for the stage's container"
    )]
    Docker {
        action: &'static str,
        detail: String,
    },
    /// The stage reached a docker agent without an image to run in.
    #[error(
        "the stage names no image and this agent runs stages in docker; set `image:` on the \
         stage or under `defaults:` in kiln.yml, or give the stage `executor: process`"
    )]
    NoImage,
}

impl Error {
    pub(crate) fn work_dir(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Error::WorkDir { path, source }
    }

    /// Wraps a bollard error as [`Error::Docker`] for `action` ("create container").
    pub(crate) fn docker(action: &'static str) -> impl FnOnce(bollard::errors::Error) -> Self {
        move |err| Error::Docker {
            action,
            detail: one_line(&err.to_string()),
        }
    }
}

/// `text` with line breaks folded, so it fits a one-line message.
pub(crate) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
