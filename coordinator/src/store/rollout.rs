//! A progressive rollout's durable record (`strategy:` on an environment
//! stage): kept on its environment while it runs, so a restarted
//! coordinator carries on from it, and on the candidate release once it
//! ended, with every analysis round and the decision.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RolloutKind {
    Canary,
    Shadow,
}

/// Where a rollout is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RolloutPhase {
    /// The environment stage runs for step `step` (a run the coordinator
    /// started, or the pipeline's own run for the first step).
    Deploying,
    /// The step is deployed; the coordinator analyses the candidate until
    /// then, and goes on to the next step if nothing aborted it.
    Analysing { until_ms: u64 },
    /// Aborted: the previous release is being deployed again at 100%.
    Restoring,
    /// Over; `outcome` says how.
    Ended,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RolloutOutcome {
    /// The candidate took all traffic and is live.
    Promoted,
    /// The previous release was restored at 100%.
    Aborted,
    /// Aborted, but the previous release could not be deployed again: the
    /// environment is frozen.
    RestoreFailed,
}

/// One round of the analysis of a candidate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct AnalysisRound {
    /// The step (index into `steps`) it was taken at.
    pub(crate) step: usize,
    pub(crate) at_ms: u64,
    pub(crate) values: BTreeMap<String, Option<f64>>,
    /// Why the source could not be read, if it could not.
    pub(crate) error: Option<String>,
    pub(crate) breached: bool,
}

/// Rounds kept per rollout; the oldest go first, the breaching ones last.
pub(crate) const MAX_ROUNDS: usize = 200;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct RolloutRecord {
    pub(crate) kind: RolloutKind,
    /// The release being rolled out (not live until the last step).
    pub(crate) candidate: u64,
    /// The live release it replaces; restored at 100% on an abort.
    pub(crate) previous: u64,
    /// Traffic percent per step (0: mirrored only), the last 100.
    pub(crate) steps: Vec<u32>,
    /// The step deployed or being deployed.
    pub(crate) step: usize,
    pub(crate) phase: RolloutPhase,
    /// `kiln rollout promote`: the next step is the last.
    #[serde(default)]
    pub(crate) promote_requested: bool,
    pub(crate) started_ms: u64,
    pub(crate) rounds: Vec<AnalysisRound>,
    pub(crate) outcome: Option<RolloutOutcome>,
    /// Why it ended so, with the values that decided it.
    pub(crate) reason: Option<String>,
    pub(crate) finished_ms: Option<u64>,
}

impl RolloutRecord {
    /// Traffic percent of the current step.
    pub(crate) fn weight(&self) -> u32 {
        self.steps.get(self.step).copied().unwrap_or(100)
    }
}
