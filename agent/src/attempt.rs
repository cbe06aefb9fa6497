//! What every layer says about one stage attempt: which one it is
//! ([`AttemptKey`]) and how it ended ([`Report`]). Plain data.

use kiln_proto::v1::{Artifact, Outcome};

pub(crate) use kiln_common::ids::AttemptKey;

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
