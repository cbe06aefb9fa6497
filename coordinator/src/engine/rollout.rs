//! The loop's side of progressive delivery: the delivery controller
//! decides every step of a rollout (see `delivery/rollout.rs`); here its
//! queued runs are started through the run book, its pauses are timed by
//! the loop's tick, a candidate's samples reach its analysis, and
//! `kiln rollout` commands arrive.

use kiln_common::ids::{EnvKey, StageKey};
use kiln_common::spec;
use kiln_proto::v1 as pb;

use super::delivery::monitor::Observation;
use super::delivery::rollout::RolloutCommand;
use super::{Engine, MonitorRequest};
use crate::error::ApiError;

impl Engine {
    /// Starts the runs the controller queued (a step, a restore); one that
    /// cannot start goes back to the controller, which may queue another.
    pub(super) fn start_rollout_runs(&mut self) {
        loop {
            let starts = self.delivery.take_rollout_runs();
            if starts.is_empty() {
                return;
            }
            for start in starts {
                let plan = start.plan.clone();
                if let Err(error) = self.start_rollback_run(start, "rollout".into()) {
                    let now = self.clock.now_ms();
                    let ops = self
                        .delivery
                        .rollout_run_not_started(&plan, &error.to_string(), now);
                    for op in ops {
                        self.write(op);
                    }
                }
            }
        }
    }

    /// Pauses that are over move their rollouts on.
    pub(super) fn rollout_tick(&mut self) {
        let now = self.clock.now_ms();
        for op in self.delivery.rollout_tick(now) {
            self.write(op);
        }
        self.start_rollout_runs();
    }

    /// A candidate's sample goes to its rollout's analysis; `false` when
    /// the release is not under analysis (a monitor's sample).
    pub(super) fn rollout_observe(&mut self, observation: &Observation) -> bool {
        let Some(candidate) = self
            .delivery
            .analysing(observation.release)
            .map(|rollout| rollout.candidate)
        else {
            return false;
        };
        let Some(analysis) = self.analysis_of(candidate) else {
            return true;
        };
        let now = self.clock.now_ms();
        let (sample, ops) = self.delivery.analyse(observation, &analysis, now);
        if let Some(sample) = sample {
            self.write(crate::store::Op::MonitorSample(sample));
        }
        for op in ops {
            self.write(op);
        }
        self.start_rollout_runs();
        true
    }

    /// The analysis rules of the `strategy:` a release was made with.
    fn analysis_of(&mut self, release: u64) -> Option<spec::Monitor> {
        let (pipeline, version, stage) = self
            .delivery
            .release(release)
            .map(|r| (r.pipeline.clone(), r.pipeline_version, r.stage.clone()))?;
        let spec = self.spec(&pipeline, version).ok()?;
        let idx = spec.parsed.stage_idx(&stage)?;
        spec.parsed.stages[idx].strategy.as_ref()?.analysis.clone()
    }

    /// After a restart: analyses start again for what is left of their
    /// pauses (a pause that ended while the coordinator was down moves on
    /// at the first tick); a step's run in flight was recovered like any
    /// run and reports its end as usual.
    pub(super) fn resume_rollouts(&mut self) {
        let now = self.clock.now_ms();
        for (environment, candidate, until_ms) in self.delivery.analyses_to_resume() {
            tracing::info!(%environment, candidate = candidate.id, "resuming a rollout's analysis");
            if until_ms <= now {
                continue;
            }
            if let Some(analysis) = self.analysis_of(candidate.id) {
                self.delivery.watch(MonitorRequest {
                    release: candidate.id,
                    environment,
                    monitor: analysis,
                    until_ms,
                });
            }
        }
    }

    /// `kiln rollout status|promote|abort ENV`.
    pub(super) fn rollout_command(
        &mut self,
        environment: &EnvKey,
        command: RolloutCommand,
    ) -> Result<pb::Rollout, ApiError> {
        let now = self.clock.now_ms();
        let (rollout, ops) = self.delivery.rollout_command(environment, &command, now)?;
        for op in ops {
            self.write(op);
        }
        self.start_rollout_runs();
        Ok(crate::views::rollout(environment, &rollout))
    }

    /// The traffic an environment stage of a pipeline's run deploys at:
    /// with a `strategy:` and a live release to replace, the first step's
    /// weight (`KILN_TRAFFIC_WEIGHT`, and `KILN_TRAFFIC_MODE`: `canary`,
    /// `shadow` for mirrored traffic only, `full`). A rollout's own runs
    /// carry theirs in the run's variables.
    pub(super) fn traffic_env(&self, key: StageKey) -> Vec<(String, String)> {
        let Some(active) = self.runs.get(&key.run) else {
            return Vec::new();
        };
        if active.record.rollback.is_some() {
            return Vec::new();
        }
        let stage = &active.spec.parsed.stages[key.idx as usize];
        let (Some(environment), Some(strategy)) = (&stage.environment, &stage.strategy) else {
            return Vec::new();
        };
        let live = self
            .delivery
            .has_live(&EnvKey::of_pipeline(&active.record.pipeline, environment));
        let weight = if live && strategy.steps.len() > 1 {
            strategy.steps[0]
        } else {
            100
        };
        vec![
            ("KILN_TRAFFIC_WEIGHT".to_owned(), weight.to_string()),
            (
                "KILN_TRAFFIC_MODE".to_owned(),
                spec::Strategy::traffic_mode(weight).to_owned(),
            ),
        ]
    }

    /// Why an environment stage of a pipeline's run may not deploy now:
    /// a rollout owns the environment until it ends.
    pub(super) fn rollout_blocks(&self, key: StageKey, environment: &str) -> Option<String> {
        let active = self.runs.get(&key.run)?;
        if active.record.rollback.is_some() {
            return None;
        }
        self.delivery
            .rollout_in_progress(&EnvKey::of_pipeline(&active.record.pipeline, environment))
    }
}
