//! The loop's side of progressive delivery: the delivery controller
//! decides every step of a rollout (see `delivery/rollout.rs`); here its
//! queued runs are started through the run book, its pauses are timed by
//! the loop's tick, a candidate's samples reach its analysis, and
//! `kiln rollout` commands arrive. The run that made the candidate waits:
//! its environment stage is `rolling_out` until the rollout ends.

use kiln_common::ids::{EnvKey, StageKey};
use kiln_common::spec;
use kiln_proto::v1 as pb;

use super::delivery::monitor::Observation;
use super::delivery::rollout::RolloutCommand;
use super::{Engine, MonitorRequest};
use crate::error::ApiError;
use crate::store::StageState;

impl Engine {
    /// Starts the runs the controller queued (a step, a restore); one that
    /// cannot start goes back to the controller, which may queue another.
    /// Also ends the `rolling_out` stages of rollouts that ended, and
    /// says in the others where their rollout is.
    pub(super) fn start_rollout_runs(&mut self) {
        loop {
            self.end_rolled_out_stages();
            let starts = self.delivery.take_rollout_runs();
            if starts.is_empty() {
                self.show_rollout_progress();
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

    /// An environment stage of a pipeline's (or a promote's) run whose
    /// command succeeded, with a `strategy:` that rolls out here (a live
    /// release to replace, more than one step): instead of succeeding, the
    /// stage becomes `rolling_out` and the stages after it wait until the
    /// rollout ends. Its attempt is over (the agent is done, its log
    /// complete). `false`: the stage settles as usual.
    pub(super) fn hold_for_rollout(&mut self, key: StageKey, exit_code: Option<i32>) -> bool {
        let Some(active) = self.runs.get(&key.run) else {
            return false;
        };
        if active.record.rollback.is_some() {
            return false;
        }
        let stage = &active.spec.parsed.stages[key.idx as usize];
        let (Some(name), Some(strategy)) = (&stage.environment, &stage.strategy) else {
            return false;
        };
        let environment = EnvKey::of_pipeline(&active.record.pipeline, name);
        if !self.delivery.rollout_applies(&environment, strategy) {
            return false;
        }
        let message = format!(
            "rolling out to `{environment}`: step 1 of {} ({}%) deployed; the stages after it \
             wait for the rollout (`kiln rollout status {environment}`)",
            strategy.steps.len(),
            strategy.steps[0]
        );
        if !self.move_stage(key, StageState::RollingOut) {
            return false;
        }
        tracing::info!(stage = %key, %environment, "environment stage deployed the first step; rolling out");
        if let Some(stage) = self.stage_mut(key) {
            stage.exit_code = exit_code;
            stage.message = message;
        }
        self.end_followers(key);
        true
    }

    /// Rollouts that ended end the `rolling_out` stage of the run that
    /// made their candidate (a run that was stopped meanwhile has none).
    fn end_rolled_out_stages(&mut self) {
        for ended in self.delivery.take_rollouts_ended() {
            let Some(key) = self.rolling_out_stage(ended.run, &ended.stage) else {
                continue;
            };
            tracing::info!(stage = %key, promoted = ended.promoted, "the rollout a stage waited for ended");
            self.end_rollout_stage(key, ended.promoted, ended.message);
        }
    }

    /// The stage `name` of the unfinished run `run`, if it is `rolling_out`.
    fn rolling_out_stage(&self, run: kiln_common::ids::RunId, name: &str) -> Option<StageKey> {
        let active = self.runs.get(&run)?;
        let idx = active.spec.parsed.stage_idx(name)?;
        (active.stages[idx].state == StageState::RollingOut).then_some(StageKey {
            run,
            idx: idx as u32,
        })
    }

    /// A `rolling_out` stage's message says where its rollout is.
    fn show_rollout_progress(&mut self) {
        for (run, name, progress) in self.delivery.rollouts_by_run() {
            let Some(key) = self.rolling_out_stage(run, &name) else {
                continue;
            };
            if self
                .stage(key)
                .is_some_and(|stage| stage.message != progress)
            {
                if let Some(stage) = self.stage_mut(key) {
                    stage.message = progress;
                }
                self.save_stage(key);
            }
        }
    }

    /// After a restart: a `rolling_out` stage whose rollout is no longer
    /// in progress ends as its release did. A safety net: a rollout's end
    /// and its stage's are written in the same batch.
    fn end_orphaned_rollout_stages(&mut self) {
        let in_progress: Vec<_> = self
            .delivery
            .rollouts_by_run()
            .into_iter()
            .map(|(run, name, _)| (run, name))
            .collect();
        let orphans: Vec<(StageKey, String)> = self
            .runs
            .values()
            .flat_map(|active| {
                active
                    .stages
                    .iter()
                    .filter(|stage| stage.state == StageState::RollingOut)
                    .map(|stage| (stage.key, stage.name.clone()))
            })
            .filter(|(key, name)| !in_progress.contains(&(key.run, name.clone())))
            .collect();
        for (key, name) in orphans {
            let (promoted, message) = self.delivery.rollout_outcome_of_run(key.run, &name);
            tracing::warn!(stage = %key, promoted, "a rolling-out stage's rollout is over; ending the stage");
            self.end_rollout_stage(key, promoted, message);
        }
    }

    /// The run `run` is being stopped: a rollout of the release it made is
    /// aborted (the previous release goes back to 100%).
    pub(super) fn abort_rollout_of_run(&mut self, run: kiln_common::ids::RunId, why: &str) {
        let now = self.clock.now_ms();
        let ops = self.delivery.abort_rollout_of_run(run, why, now);
        for op in ops {
            self.write(op);
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
        self.end_orphaned_rollout_stages();
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
