//! What every layer says about one stage attempt: which one it is
//! ([`AttemptKey`]) and how it ended ([`Report`]). Plain data.

use std::fmt;

use kiln_proto::v1::{Artifact, Outcome, StageRef};

/// One attempt of one stage of one run: the coordinator's fencing token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct AttemptKey {
    pub(crate) run_id: u64,
    pub(crate) stage_idx: u32,
    pub(crate) attempt: u32,
}

impl AttemptKey {
    pub(crate) fn stage_ref(self) -> StageRef {
        StageRef {
            run_id: self.run_id,
            stage_idx: self.stage_idx,
            attempt: self.attempt,
        }
    }

    /// `<run>-<stage_idx>-<attempt>`: names the attempt's workspace.
    pub(crate) fn dir_name(self) -> String {
        format!("{}-{}-{}", self.run_id, self.stage_idx, self.attempt)
    }
}

impl From<&StageRef> for AttemptKey {
    fn from(stage: &StageRef) -> Self {
        AttemptKey {
            run_id: stage.run_id,
            stage_idx: stage.stage_idx,
            attempt: stage.attempt,
        }
    }
}

impl fmt::Display for AttemptKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "run {} stage {} attempt {}",
            self.run_id, self.stage_idx, self.attempt
        )
    }
}

/// How an attempt ended: what its `StageFinished` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Report {
    pub(crate) outcome: Outcome,
    /// The commands' exit code; -1 when they did not exit on their own.
    pub(crate) exit_code: i32,
    /// Why it ended that way, for people; empty on success.
    pub(crate) message: String,
    /// The image the commands ran in, by digest; "" without a container.
    pub(crate) image_digest: String,
    /// Artifacts uploaded after the commands.
    pub(crate) outputs: Vec<Artifact>,
}

impl Report {
    pub(crate) fn new(outcome: Outcome, exit_code: i32, message: impl Into<String>) -> Self {
        Report {
            outcome,
            exit_code,
            message: message.into(),
            image_digest: String::new(),
            outputs: Vec::new(),
        }
    }
}
