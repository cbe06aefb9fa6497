//! The states of runs and stages, and the one table of legal stage moves.
//!
//! These are the coordinator's only state enums: the store persists them
//! (as their snake_case names), the views map them to the wire, and every
//! name shown to people comes from [`StageState::name`] / [`RunState::name`].

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RunState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunState {
    pub(crate) fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// ```text
/// pending ──▶ ready ──▶ assigned ──▶ running ──▶ succeeded | failed | timed_out | cancelled
///    │          │  ▲        │           │
///    │          │  └────────┴───────────┘  re-queued as a new attempt
///    │          ├──▶ awaiting_approval ──▶ succeeded | failed | cancelled   (gates)
/// assigned | running ──▶ rolling_out ──▶ succeeded | failed | cancelled     (`strategy:`)
///    └──────────┴──▶ skipped | cancelled | failed | succeeded               (no agent)
/// failed | timed_out | cancelled ──▶ ready        (retry)
/// skipped | cancelled ──▶ pending                 (a need is retried)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StageState {
    Pending,
    Ready,
    Assigned,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Skipped,
    /// A manual gate that passed its checks and waits for `kiln approve`.
    AwaitingApproval,
    /// An environment stage with a `strategy:` whose command deployed the
    /// first step: the stage (and so its dependents and the run) waits for
    /// the rollout to end. Promoted: it succeeds; aborted: it fails with
    /// the abort's reason. No agent holds it.
    RollingOut,
}

impl StageState {
    /// The one "finished" predicate: nothing will happen to the stage
    /// unless someone retries it.
    pub(crate) fn is_finished(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::TimedOut | Self::Cancelled | Self::Skipped
        )
    }

    /// Its attempt is over: no agent works on it and its log is complete
    /// (finished, or `rolling_out`, which waits for the coordinator only).
    pub(crate) fn attempt_over(self) -> bool {
        self.is_finished() || self == Self::RollingOut
    }

    /// On an agent: assigned or running.
    pub(crate) fn is_held(self) -> bool {
        matches!(self, Self::Assigned | Self::Running)
    }

    /// Whether a stage in this state may move to `next`.
    pub(crate) fn can_become(self, next: Self) -> bool {
        use StageState::*;
        match (self, next) {
            (Pending, Ready | Skipped | Cancelled) => true,
            // Gates and stages that fail before reaching an agent (a frozen
            // environment, secrets that cannot be opened) end from ready.
            (Ready, Assigned | AwaitingApproval | Succeeded | Failed | Skipped | Cancelled) => true,
            (Assigned, Running | Ready) => true,
            (Running, Ready) => true,
            (Assigned | Running, Succeeded | Failed | TimedOut | Cancelled) => true,
            (AwaitingApproval, Succeeded | Failed | Cancelled) => true,
            (Assigned | Running, RollingOut) => true,
            (RollingOut, Succeeded | Failed | Cancelled) => true,
            (Failed | TimedOut | Cancelled, Ready) => true,
            (Skipped | Cancelled, Pending) => true,
            _ => false,
        }
    }

    /// The name people and JSON see (`timed_out`, `awaiting_approval`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Ready => "ready",
            Self::Assigned => "assigned",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
            Self::Skipped => "skipped",
            Self::AwaitingApproval => "awaiting_approval",
            Self::RollingOut => "rolling_out",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StageState::{self, *};

    const ALL: [StageState; 11] = [
        Pending,
        Ready,
        Assigned,
        Running,
        Succeeded,
        Failed,
        TimedOut,
        Cancelled,
        Skipped,
        AwaitingApproval,
        RollingOut,
    ];

    #[test]
    fn succeeded_is_final_and_nothing_moves_to_itself() {
        for state in ALL {
            assert!(!Succeeded.can_become(state), "succeeded -> {state:?}");
            assert!(!state.can_become(state), "{state:?} -> itself");
        }
    }

    #[test]
    fn only_a_retry_leaves_a_finished_stage() {
        for from in ALL.into_iter().filter(|s| s.is_finished()) {
            for to in ALL {
                if from.can_become(to) {
                    assert!(
                        matches!(to, Ready | Pending),
                        "{from:?} -> {to:?} leaves a finished stage without a retry"
                    );
                }
            }
        }
    }

    #[test]
    fn a_stage_not_on_an_agent_cannot_time_out_or_start() {
        for from in [Pending, Ready, AwaitingApproval, Skipped, RollingOut] {
            assert!(!from.can_become(TimedOut), "{from:?}");
            assert!(!from.can_become(Running), "{from:?}");
        }
        assert!(!Pending.can_become(Assigned), "pending skips ready");
    }

    #[test]
    fn a_rolling_out_stage_waits_for_the_coordinator_alone() {
        assert!(!RollingOut.is_finished(), "its run does not finish");
        assert!(!RollingOut.is_held(), "no agent holds it");
        assert!(RollingOut.attempt_over(), "its agent is done");
        let leaves: Vec<StageState> = ALL
            .into_iter()
            .filter(|&to| RollingOut.can_become(to))
            .collect();
        assert_eq!(leaves, [Succeeded, Failed, Cancelled]);
        let enters: Vec<StageState> = ALL
            .into_iter()
            .filter(|from| from.can_become(RollingOut))
            .collect();
        assert_eq!(enters, [Assigned, Running], "only a deploy that ran");
    }

    #[test]
    fn names_are_the_stored_names() {
        for state in ALL {
            let stored = serde_json::to_string(&state).unwrap();
            assert_eq!(stored, format!("\"{}\"", state.name()));
        }
    }
}
