//! Counters and gauges the engine updates and `/metrics` renders in the
//! Prometheus text format. Plain atomics: the engine is the only writer.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::{RunState, StageState};

#[derive(Default)]
pub(crate) struct Metrics {
    active_runs: AtomicU64,
    ready_stages: AtomicU64,
    connected_agents: AtomicU64,
    runs_finished: [AtomicU64; 3],
    stages_finished: [AtomicU64; 5],
}

const RUN_OUTCOMES: [&str; 3] = ["succeeded", "failed", "cancelled"];
const STAGE_OUTCOMES: [&str; 5] = ["succeeded", "failed", "timed_out", "cancelled", "skipped"];

impl Metrics {
    pub(crate) fn set_engine_gauges(&self, active_runs: usize, ready: usize, agents: usize) {
        self.active_runs
            .store(active_runs as u64, Ordering::Relaxed);
        self.ready_stages.store(ready as u64, Ordering::Relaxed);
        self.connected_agents
            .store(agents as u64, Ordering::Relaxed);
    }

    pub(crate) fn run_finished(&self, state: RunState) {
        let slot = match state {
            RunState::Succeeded => 0,
            RunState::Failed => 1,
            RunState::Cancelled => 2,
            RunState::Queued | RunState::Running => return,
        };
        self.runs_finished[slot].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stage_finished(&self, state: StageState) {
        let slot = match state {
            StageState::Succeeded => 0,
            StageState::Failed => 1,
            StageState::TimedOut => 2,
            StageState::Cancelled => 3,
            StageState::Skipped => 4,
            _ => return,
        };
        self.stages_finished[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of everything above.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        let gauges = [
            (
                "kiln_active_runs",
                "Runs not finished yet.",
                &self.active_runs,
            ),
            (
                "kiln_ready_stages",
                "Stages waiting for an agent.",
                &self.ready_stages,
            ),
            (
                "kiln_connected_agents",
                "Agents with an open stream.",
                &self.connected_agents,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let counters = [
            (
                "kiln_runs_finished_total",
                "Runs finished, by final state.",
                &RUN_OUTCOMES[..],
                &self.runs_finished[..],
            ),
            (
                "kiln_stages_finished_total",
                "Stage attempts settled, by state.",
                &STAGE_OUTCOMES[..],
                &self.stages_finished[..],
            ),
        ];
        for (name, help, labels, values) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (label, value) in labels.iter().zip(values) {
                let _ = writeln!(
                    out,
                    "{name}{{state=\"{label}\"}} {}",
                    value.load(Ordering::Relaxed)
                );
            }
        }
        out
    }
}
