//! Routing between the run book and the delivery controller.
//!
//! The run book queues [`DeliveryEvent`]s (an environment stage deployed,
//! a gate ready, a rollback run failed); here the loop lends delivery a
//! read-only view of the run, writes the ops delivery returns, and applies
//! delivery's verdicts to the run book through its own functions
//! (`settle_stage`, `move_stage`, `start_rollback_run`). Neither side
//! touches the other's state.

use kiln_common::ids::{EnvKey, RunId, StageKey};
use kiln_common::spec;

use super::delivery::{Breach, DeliveryEvent, GateVerdict, monitor::Observation};
use super::{Engine, MonitorRequest};
use crate::error::ApiError;
use crate::store::{EnvironmentRecord, Op, StageState};

impl Engine {
    /// Routes the delivery events queued so far (and those that routing
    /// itself queues: a decided gate can finish a rollback run).
    pub(super) fn route_delivery(&mut self) {
        while !self.delivery_events.is_empty() {
            for event in std::mem::take(&mut self.delivery_events) {
                match event {
                    DeliveryEvent::Deployed(key) => self.deployed(key),
                    DeliveryEvent::GateReady(key) => self.gate_ready(key),
                    DeliveryEvent::RollbackFailed(plan) => {
                        let now = self.clock.now_ms();
                        let ops = self.delivery.rollback_ended(&plan, false, None, now);
                        self.write_all(ops);
                    }
                }
            }
            self.start_rollout_runs();
        }
        self.retry_parked_deploys();
    }

    fn write_all(&mut self, ops: Vec<Op>) {
        for op in ops {
            self.write(op);
        }
    }

    /// A ready gate: delivery decides, the run book moves the stage.
    fn gate_ready(&mut self, key: StageKey) {
        // Cancelled (or decided) since it was handed over.
        if !self
            .stage(key)
            .is_some_and(|stage| stage.state == StageState::Ready)
        {
            return;
        }
        let now = self.clock.now_ms();
        let Some(active) = self.runs.get(&key.run) else {
            return;
        };
        let Some((decision, verdict)) =
            self.delivery
                .decide_gate(&active.view(), key.idx as usize, now)
        else {
            return;
        };
        if let Some(stage) = self.stage_mut(key) {
            stage.gate = Some(decision);
            stage.started_ms = Some(now);
        }
        match verdict {
            GateVerdict::Failed(summary) => {
                self.settle_stage(key, StageState::Failed, None, summary);
            }
            GateVerdict::Passed(summary) => {
                self.settle_stage(key, StageState::Succeeded, None, summary);
            }
            GateVerdict::AwaitingApproval(message) => {
                if self.move_stage(key, StageState::AwaitingApproval)
                    && let Some(stage) = self.stage_mut(key)
                {
                    stage.message = message;
                }
            }
        }
    }

    /// An environment stage succeeded: delivery makes its release live;
    /// the release is signed once that is durable.
    fn deployed(&mut self, key: StageKey) {
        let now = self.clock.now_ms();
        // Borrowed field by field: the run may have retired in this burst.
        let Some(active) = self
            .runs
            .get(&key.run)
            .or_else(|| self.retired.get(&key.run))
        else {
            return;
        };
        let ops = self
            .delivery
            .deployed(&active.view(), key.idx as usize, now);
        self.write_all(ops);
        // A stage held for a rollout that did not begin (never expected:
        // both are decided in the same turn) must not wait forever.
        let holds = self
            .stage(key)
            .is_some_and(|stage| stage.state == StageState::RollingOut);
        let began = self
            .delivery
            .rollouts_by_run()
            .iter()
            .any(|(run, _, _)| *run == key.run);
        if holds && !began {
            tracing::error!(stage = %key, "a stage waited for a rollout that did not begin; it succeeds");
            self.end_rollout_stage(key, true, "deployed".into());
        }
        let signed = self.delivery.take_to_sign();
        if let Some(signer) = self.release_signer.clone()
            && !signed.is_empty()
        {
            self.after_commit(move || {
                for id in signed {
                    let _ = signer.send(id);
                }
            });
        }
    }

    /// `kiln rollback` and the monitor's automatic rollback: delivery
    /// plans it, the run book runs it. `retrain`: the pipeline runs again
    /// once the rollback succeeded.
    pub(super) fn start_rollback(
        &mut self,
        environment: &EnvKey,
        to: Option<u64>,
        reason: String,
        triggered_by: String,
        retrain: bool,
    ) -> Result<RunId, ApiError> {
        let running = self
            .runs
            .values()
            .find(|run| {
                !run.record.state.is_finished()
                    && run
                        .record
                        .rollback
                        .as_ref()
                        .is_some_and(|plan| plan.environment == *environment)
            })
            .map(|run| run.record.id);
        let mut start = self
            .delivery
            .plan_rollback(environment, to, reason, running)?;
        start.plan.retrain = retrain;
        self.start_rollback_run(start, triggered_by)
    }

    /// A monitor sample: delivery judges it against the release's
    /// `monitor:` and may ask for a rollback or freeze the environment.
    pub(super) fn observe(&mut self, observation: Observation) {
        if self.rollout_observe(&observation) {
            return;
        }
        let Some(monitor) = self
            .delivery
            .release(observation.release)
            .map(|r| (r.pipeline.clone(), r.pipeline_version, r.stage.clone()))
            .and_then(|(pipeline, version, stage)| self.monitor_of(&pipeline, version, &stage))
        else {
            return;
        };
        let now = self.clock.now_ms();
        let (sample, breach) = self.delivery.observe(&observation, &monitor, now);
        if let Some(sample) = sample {
            self.write(Op::MonitorSample(sample));
        }
        match breach {
            Breach::Quiet => {}
            Breach::Frozen(ops) => self.write_all(ops),
            Breach::RollBack {
                environment,
                release,
                reason,
                retrain,
            } => {
                if let Err(error) =
                    self.start_rollback(&environment, None, reason, "monitor".into(), retrain)
                {
                    self.delivery
                        .rollback_not_started(&environment, release, &error.to_string());
                }
            }
        }
    }

    /// The `monitor:` of a stage of a pipeline version.
    pub(super) fn monitor_of(
        &mut self,
        pipeline: &str,
        version: u32,
        stage: &str,
    ) -> Option<spec::Monitor> {
        let spec = self.spec(pipeline, version).ok()?;
        let idx = spec.parsed.stage_idx(stage)?;
        spec.parsed.stages[idx].monitor.clone()
    }

    /// Watches the releases whose window is still open after a restart.
    pub(super) fn resume_monitors(&mut self) {
        let now = self.clock.now_ms();
        for release in self.delivery.watched_at(now) {
            if let Err(error) = self.spec(&release.pipeline, release.pipeline_version) {
                tracing::error!(release = release.id, %error, "the monitor of a live release cannot restart: its pipeline version does not parse");
                continue;
            }
            if let Some(monitor) =
                self.monitor_of(&release.pipeline, release.pipeline_version, &release.stage)
            {
                self.delivery.watch(MonitorRequest {
                    release: release.id,
                    environment: release.environment,
                    monitor,
                    until_ms: release.monitor_until_ms.unwrap_or_default(),
                });
            }
        }
    }

    pub(super) fn unfreeze(&mut self, environment: &EnvKey) -> Result<EnvironmentRecord, ApiError> {
        let (op, record) = self.delivery.unfreeze(environment)?;
        self.write(op);
        Ok(record)
    }

    /// Why an environment stage of `run` may not deploy to `environment`
    /// (of the run's pipeline) now.
    pub(super) fn frozen_reason(&self, run: RunId, environment: &str) -> Option<String> {
        let pipeline = &self.runs.get(&run)?.record.pipeline;
        self.delivery
            .frozen(&EnvKey::of_pipeline(pipeline, environment))
            .map(str::to_owned)
    }
}
