//! The delivery controller: gates, releases, environments, monitors and
//! rollbacks — decided here, by the coordinator, from metrics it parsed
//! itself; never by an agent.
//!
//! It owns its own state (environments, releases, breach counts: see
//! [`environments`]) and nothing of the run book's. The event loop lends it
//! a read-only [`RunView`] of the run in question and applies what it
//! decides: every change to delivery state comes back as store ops for the
//! loop's batch, and every change a decision makes to a run (a gate passes
//! or fails) comes back as a verdict for the run book to carry out through
//! its one transition function. Monitors to start, alerts to send and
//! releases to sign are queued here and drained by the runner.
//!
//! - A `gate:` stage never reaches an agent: when it becomes ready the
//!   controller checks thresholds and the champion (the live release of
//!   `compare_to` in the run's own pipeline) and records every check with
//!   the values that decided it ([`gates`]).
//! - An `environment:` stage that succeeds creates a release and makes it
//!   live; the previous live release is superseded.
//! - A rollback is planned here (which release, with which exact
//!   artifacts) and run by the run book as a run of one environment stage:
//!   no retraining, no gates.
//! - A monitor sample is judged here ([`monitor`]); at `failure_limit`
//!   consecutive breaches the controller asks for a rollback or freezes.
//!
//! **Architecture Invariant:** promotion and rollback are decided only from
//! values the coordinator parsed from content-addressed artifacts or sampled
//! itself; nothing an agent says about them is trusted.

mod alerts;
mod environments;
mod gates;
mod models;
#[cfg(test)]
mod models_tests;
pub(crate) mod monitor;
pub(crate) mod rollout;
#[cfg(test)]
mod rollout_tests;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use kiln_common::ids::{EnvKey, RunId};
use kiln_common::spec::{self, Approval, OnBreach};

use super::MonitorRequest;
use super::runs::RunView;
use crate::delivery::alerts::Alert;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::{
    EnvironmentRecord, GateDecision, MonitorSampleRecord, Op, Promotion, ReleaseRecord,
    ReleaseState, RollbackPlan, Selection, StageArtifact,
};
use environments::{Environments, Watch};

pub(crate) use gates::parse_metrics;
pub(super) use models::{PromoteRequest, PromoteStart};

/// What the run book asks of the delivery controller; the event loop
/// routes these after each event (and between dispatch rounds), so the DAG
/// code never calls into delivery.
#[derive(Debug)]
pub(crate) enum DeliveryEvent {
    /// An environment stage succeeded: its release goes live (or, in a
    /// rollback run, the restored one does).
    Deployed(kiln_common::ids::StageKey),
    /// A gate stage is ready to be decided.
    GateReady(kiln_common::ids::StageKey),
    /// A rollback run ended without success.
    RollbackFailed(RollbackPlan),
}

/// How a decided gate moves its stage; the run book applies it.
#[derive(Debug, PartialEq)]
pub(super) enum GateVerdict {
    Passed(String),
    Failed(String),
    /// Passed its checks; a person decides (`kiln approve`).
    AwaitingApproval(String),
}

/// What a monitor sample asks for.
#[derive(Debug)]
pub(super) enum Breach {
    /// Nothing to do (healthy, counted, or not live any more).
    Quiet,
    /// The limit was reached and the stage says `on_breach: rollback`:
    /// the loop starts a rollback of `environment` with this reason (and,
    /// with `retrain`, a new run of the pipeline once it succeeded).
    RollBack {
        environment: EnvKey,
        release: u64,
        reason: String,
        retrain: bool,
    },
    /// The limit was reached and the environment is now frozen.
    Frozen(Vec<Op>),
}

/// A pipeline to run again on its newest commit after a rollback
/// (`on_breach: [rollback, retrain]`); the runner resolves the commit off
/// the loop and starts the run like a trigger would.
#[derive(Debug, PartialEq)]
pub(crate) struct Retrain {
    pub(crate) pipeline: String,
    /// The run's `triggered_by`: starts with [`RETRAIN`].
    pub(crate) triggered_by: String,
}

/// How a retraining run's `triggered_by` begins. A release made by such a
/// run that is rolled back in turn does not retrain again: one retrain per
/// rollback, never a loop.
pub(crate) const RETRAIN: &str = "retrain after rollback";

/// A rollback the run book is to start: the plan it carries and the
/// release it restores.
pub(super) struct RollbackStart {
    pub(super) plan: RollbackPlan,
    pub(super) target: ReleaseRecord,
}

pub(super) struct DeliveryController {
    environments: Environments,
    metrics: Arc<Metrics>,
    /// Monitors to start; the runner drains these.
    monitor_requests: Vec<MonitorRequest>,
    /// Alerts to send; the runner drains these into the alerter.
    alerts: Vec<Alert>,
    /// Releases made live whose provenance is to be signed once durable.
    to_sign: Vec<u64>,
    /// Pipelines to run again after a rollback; the runner drains these.
    retrains: Vec<Retrain>,
    /// Runs of a rollout to start (a step, or the restore after an abort);
    /// the loop drains these through the run book.
    rollout_runs: Vec<RollbackStart>,
    /// Rollouts that ended since the loop last asked: the run book ends
    /// the `rolling_out` stage of the run that made each candidate.
    rollouts_ended: Vec<rollout::RolloutEnded>,
    /// User-set model aliases by (model, alias); see [`models`].
    aliases: std::collections::BTreeMap<(String, String), crate::store::ModelAliasRecord>,
}

impl DeliveryController {
    pub(super) fn load(
        environments: Vec<EnvironmentRecord>,
        releases: Vec<ReleaseRecord>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            environments: Environments::load(environments, releases),
            metrics,
            monitor_requests: Vec::new(),
            alerts: Vec::new(),
            to_sign: Vec::new(),
            retrains: Vec::new(),
            rollout_runs: Vec::new(),
            rollouts_ended: Vec::new(),
            aliases: Default::default(),
        }
    }

    pub(super) fn release(&self, id: u64) -> Option<&ReleaseRecord> {
        self.environments.release(id)
    }

    /// The live release of `environment`, itself.
    pub(super) fn live_release(&self, environment: &EnvKey) -> Option<&ReleaseRecord> {
        self.environments.champion(environment)
    }

    /// The live release of `environment`.
    #[cfg(test)]
    pub(super) fn live(&self, environment: &EnvKey) -> Option<u64> {
        self.environments.live(environment)
    }

    /// Releases of `environment`, oldest first.
    #[cfg(test)]
    pub(super) fn history(&self, environment: &EnvKey) -> Vec<&ReleaseRecord> {
        self.environments.history(environment)
    }

    /// Live releases whose watch window is still open at `now`: their
    /// monitors start again after a restart.
    pub(super) fn watched_at(&self, now: u64) -> Vec<ReleaseRecord> {
        self.environments.watched_at(now).cloned().collect()
    }

    /// Watches a release (again, after a restart); its breach count
    /// starts over.
    pub(super) fn watch(&mut self, request: MonitorRequest) {
        self.environments.start_watch(request.release);
        self.monitor_requests.push(request);
    }

    /// Whether a release is live in `environment`.
    pub(super) fn has_live(&self, environment: &EnvKey) -> bool {
        self.environments.live(environment).is_some()
    }

    /// Why `environment` refuses deployments now, if it does.
    pub(super) fn frozen(&self, environment: &EnvKey) -> Option<&str> {
        self.environments.frozen(environment)
    }

    /// Decides the gate stage `idx` of `run` on the spot: thresholds, then
    /// the champion (the live release of `compare_to` in the run's own
    /// pipeline; another pipeline's model is never compared). `None` when
    /// the stage is not a gate.
    pub(super) fn decide_gate(
        &mut self,
        run: &RunView<'_>,
        idx: usize,
        now: u64,
    ) -> Option<(GateDecision, GateVerdict)> {
        let gate = run.spec.stages.get(idx)?.gate.as_ref()?;
        let champion = gate.compare_to.as_ref().and_then(|env| {
            let champion = self
                .environments
                .champion(&EnvKey::of_pipeline(&run.record.pipeline, env))?;
            Some((env.as_str(), &champion.metrics))
        });
        // A best-of gate first picks among the stages it needs; its rules
        // are then checked on the winner's metrics alone.
        let selection = gate.select.as_ref().map(|select| {
            let candidates: Vec<(String, Option<f64>)> = run.spec.stages[idx]
                .needs
                .iter()
                .map(|&need| {
                    let stage = &run.stages[need];
                    let value = stage.metrics.get(&select.metric).copied().flatten();
                    (stage.name.clone(), value)
                })
                .collect();
            let winner = gates::select_winner(&candidates, select.highest);
            Selection {
                metric: select.metric.clone(),
                candidates,
                winner,
            }
        });
        let metrics = match &selection {
            Some(selection) => run.metrics_without(&selection.losers().collect::<Vec<_>>()),
            None => run.metrics(),
        };
        let mut decision = gates::decide(gate, &metrics, champion);
        decision.decided_ms = now;
        if let Some(selection) = &selection {
            let values: Vec<String> = selection
                .candidates
                .iter()
                .map(|(name, value)| match value {
                    Some(value) => format!("{name}={value:.4}"),
                    None => format!("{name}=missing"),
                })
                .collect();
            let how = if gate.select.as_ref().is_some_and(|s| s.highest) {
                "highest"
            } else {
                "lowest"
            };
            decision.summary = match &selection.winner {
                Some(winner) => format!(
                    "selected {winner} ({how} {} of {}); {}",
                    selection.metric,
                    values.join(", "),
                    decision.summary
                ),
                None => {
                    decision.passed = false;
                    format!(
                        "no stage it needs has a value of `{}` to select by ({})",
                        selection.metric,
                        values.join(", ")
                    )
                }
            };
        }
        decision.selection = selection;
        let summary = decision.summary.clone();
        let verdict = match (decision.passed, gate.approval) {
            (false, _) => {
                self.alert_gate_failed(run, idx, &summary);
                GateVerdict::Failed(summary)
            }
            (true, Approval::Manual) => {
                GateVerdict::AwaitingApproval(format!("{summary}; waiting for `kiln approve`"))
            }
            (true, Approval::Auto) => GateVerdict::Passed(summary),
        };
        self.metrics.gate_decided(match verdict {
            GateVerdict::Failed(_) => "failed",
            GateVerdict::AwaitingApproval(_) => "awaiting_approval",
            GateVerdict::Passed(_) => "passed",
        });
        Some((decision, verdict))
    }

    /// The environment stage `idx` of `run` succeeded: its release goes
    /// live (or, in a rollback run, the restored release does). Returns the
    /// writes.
    pub(super) fn deployed(&mut self, run: &RunView<'_>, idx: usize, now: u64) -> Vec<Op> {
        let Some(stage_spec) = run.spec.stages.get(idx) else {
            return Vec::new();
        };
        if let Some(plan) = &run.record.rollback {
            if plan.rollout.is_some() {
                return self.rollout_run_ended(plan, true, Some(stage_spec), now);
            }
            // The rollback run is at the restored release's pipeline
            // version: this is the `monitor:` it was released with.
            return self.rollback_ended(plan, true, stage_spec.monitor.as_ref(), now);
        }
        let Some(name) = stage_spec.environment.as_deref() else {
            return Vec::new();
        };
        let environment = EnvKey::of_pipeline(&run.record.pipeline, name);
        let id = self.environments.next_release_id();
        let stage = &run.stages[idx];
        let mut artifacts: Vec<StageArtifact> = run.inputs_of(idx);
        artifacts.extend(stage.outputs.iter().map(|artifact| StageArtifact {
            stage: stage.name.clone(),
            artifact: artifact.clone(),
        }));
        let monitor_until_ms = stage_spec
            .monitor
            .as_ref()
            .map(|m| now + m.window.as_millis() as u64);
        let release = ReleaseRecord {
            id,
            environment: environment.clone(),
            run: run.record.id,
            pipeline: run.record.pipeline.clone(),
            pipeline_version: run.record.pipeline_version,
            commit: run.record.commit.clone(),
            source_digest: run.record.source_digest.clone(),
            stage: stage.name.clone(),
            artifacts,
            // The environment stage's own image: what a rollback
            // re-deploys in.
            image_digest: stage.image_digest.clone(),
            metrics: run.metrics(),
            gates: run
                .stages
                .iter()
                .filter_map(|s| s.gate.clone().map(|gate| (s.name.clone(), gate)))
                .collect(),
            triggered_by: run.record.triggered_by.clone(),
            created_ms: now,
            state: ReleaseState::Live,
            reason: None,
            monitor_until_ms,
            restored_by_rollback: false,
            endpoint: stage_spec.endpoint.clone(),
            rollout: None,
            // A promote deploys the version it names; any other run's
            // release is the version that run trained.
            model: match &run.record.promote {
                Some(plan) => Some(plan.model.clone()),
                None => stage_spec
                    .model
                    .as_deref()
                    .map(|model| self.model_version(model, run.record.id)),
            },
            promotion: run.record.promote.as_ref().map(|plan| Promotion {
                by: plan.by.clone(),
                at_ms: plan.at_ms,
                from_release: plan.from_release,
            }),
        };
        // With a `strategy:` and a live release to replace, the release
        // takes part of the traffic first.
        if let Some(strategy) = &stage_spec.strategy
            && self.rollout_applies(&environment, strategy)
        {
            self.to_sign.push(id);
            return self.begin_rollout(release, strategy, now);
        }
        let ops = self.make_live(release, ReleaseState::Superseded, None);
        self.to_sign.push(id);
        if let (Some(monitor), Some(until_ms)) = (&stage_spec.monitor, monitor_until_ms) {
            self.watch(MonitorRequest {
                release: id,
                environment,
                monitor: monitor.clone(),
                until_ms,
            });
        }
        ops
    }

    fn make_live(
        &mut self,
        release: ReleaseRecord,
        previous_becomes: ReleaseState,
        reason: Option<String>,
    ) -> Vec<Op> {
        // A rollback's restore makes an old release live again: no new one.
        if !release.restored_by_rollback {
            self.metrics.release_created(&release.environment);
        }
        self.environments
            .make_live(release, previous_becomes, reason)
    }

    /// Plans a rollback of `environment` to `to` (default: the release of
    /// the same environment of the same pipeline that was live before the
    /// current one, never one already rolled back). `running` is a
    /// rollback run of this environment that has not finished, if any: one
    /// at a time.
    pub(super) fn plan_rollback(
        &self,
        environment: &EnvKey,
        to: Option<u64>,
        reason: String,
        running: Option<RunId>,
    ) -> Result<RollbackStart, ApiError> {
        if !self.environments.exists(environment) {
            return Err(ApiError::NotFound(format!(
                "environment `{environment}` has no releases"
            )));
        }
        let live = self.environments.live(environment).ok_or_else(|| {
            ApiError::FailedPrecondition(format!("nothing is live in `{environment}`"))
        })?;
        if let Some(rollout) = self.environments.rollout(environment) {
            return Err(ApiError::FailedPrecondition(format!(
                "release {} is being rolled out in `{environment}`; `kiln rollout abort` puts \
                 release {} back at 100%",
                rollout.candidate, rollout.previous
            )));
        }
        if let Some(running) = running {
            return Err(ApiError::FailedPrecondition(format!(
                "a rollback of `{environment}` is already running as run {running}"
            )));
        }
        let history = self.environments.history(environment);
        let target = match to {
            Some(id) => history
                .iter()
                .find(|release| release.id == id)
                .ok_or_else(|| {
                    ApiError::NotFound(format!("release {id} was never in `{environment}`"))
                })?,
            None => history
                .iter()
                .rev()
                .find(|release| {
                    release.id < live
                        && matches!(release.state, ReleaseState::Superseded | ReleaseState::Live)
                })
                .ok_or_else(|| {
                    ApiError::FailedPrecondition(format!(
                        "`{environment}` has no earlier release to roll back to; pass --to RELEASE"
                    ))
                })?,
        };
        if target.id == live {
            return Err(ApiError::FailedPrecondition(format!(
                "release {live} is already live in `{environment}`"
            )));
        }
        let plan = RollbackPlan {
            environment: environment.clone(),
            from: live,
            to: target.id,
            stage: target.stage.clone(),
            inputs: target.redeploy_inputs(),
            reason,
            retrain: false,
            rollout: None,
        };
        Ok(RollbackStart {
            plan,
            target: (*target).clone(),
        })
    }

    /// A rollback run ended: on success the restored release is live again,
    /// the replaced one is marked rolled back, and the restored one is
    /// watched again by its own `monitor:` (if it breaches too, the
    /// environment freezes: see [`Self::breach`]); with `plan.retrain` the
    /// pipeline is queued to run again. Returns the writes.
    pub(super) fn rollback_ended(
        &mut self,
        plan: &RollbackPlan,
        succeeded: bool,
        monitor: Option<&spec::Monitor>,
        now: u64,
    ) -> Vec<Op> {
        if plan.rollout.is_some() {
            return self.rollout_run_ended(plan, succeeded, None, now);
        }
        self.metrics.rollback_finished(&plan.environment, succeeded);
        if !succeeded {
            self.alert_rollback_failed(plan);
            return Vec::new();
        }
        let live = self.environments.live(&plan.environment);
        if live != Some(plan.from) {
            // Something else went live meanwhile: leave it, and say so.
            tracing::warn!(environment = %plan.environment, ?live, from = plan.from, "rollback finished after another release went live; not applied");
            self.alert_rollback_failed(plan);
            return Vec::new();
        }
        let Some(mut restored) = self.environments.release(plan.to).cloned() else {
            return Vec::new();
        };
        restored.state = ReleaseState::Live;
        restored.restored_by_rollback = true;
        restored.monitor_until_ms = monitor.map(|m| now + m.window.as_millis() as u64);
        let watch = monitor
            .zip(restored.monitor_until_ms)
            .map(|(monitor, until_ms)| MonitorRequest {
                release: restored.id,
                environment: restored.environment.clone(),
                monitor: monitor.clone(),
                until_ms,
            });
        let pipeline = restored.pipeline.clone();
        let ops = self.make_live(
            restored,
            ReleaseState::RolledBack,
            Some(plan.reason.clone()),
        );
        if let Some(watch) = watch {
            self.watch(watch);
        }
        self.alert_rolled_back(plan);
        if plan.retrain {
            tracing::info!(environment = %plan.environment, release = plan.to, "retraining after the rollback");
            self.retrains.push(Retrain {
                pipeline,
                triggered_by: format!(
                    "{RETRAIN} of release {} in `{}`",
                    plan.from, plan.environment
                ),
            });
        }
        ops
    }

    /// Judges one round of samples of a watched release against its
    /// stage's `monitor:`; at `failure_limit` consecutive breaches it
    /// raises an alert and asks for a rollback, or freezes. The round is
    /// kept as a sample (for the dashboard's chart) while the release is
    /// live.
    pub(super) fn observe(
        &mut self,
        observation: &monitor::Observation,
        monitor: &spec::Monitor,
        now: u64,
    ) -> (Option<MonitorSampleRecord>, Breach) {
        let monitor::Observation {
            release,
            environment,
            values,
        } = observation;
        let release = *release;
        let (breached, observed) = monitor::judge(monitor, values);
        let watch =
            self.environments
                .observe(environment, release, breached, monitor.failure_limit);
        if watch == Watch::Ignored {
            return (None, Breach::Quiet);
        }
        if let Ok(values) = values {
            let model = self.model_label(release);
            self.metrics
                .monitor_sampled(environment, release, &model, values);
        }
        let sample = MonitorSampleRecord {
            release,
            at_ms: now,
            values: values.clone().unwrap_or_default(),
            error: values.as_ref().err().cloned(),
            breached,
        };
        let count = match watch {
            Watch::Ignored | Watch::Counted(0) => return (Some(sample), Breach::Quiet),
            Watch::Counted(count) | Watch::Act(count) => count,
        };
        (
            Some(sample),
            self.breach(environment, release, monitor, count, &observed),
        )
    }

    /// A counted breach: at the limit, an alert and what `on_breach` says.
    fn breach(
        &mut self,
        environment: &EnvKey,
        release: u64,
        monitor: &spec::Monitor,
        count: u32,
        observed: &str,
    ) -> Breach {
        self.metrics.monitor_breach(environment);
        tracing::warn!(release, environment = %environment, count, limit = monitor.failure_limit, %observed, "monitor breach");
        if count < monitor.failure_limit {
            return Breach::Quiet;
        }
        let reason = format!(
            "{} consecutive breaches of release {release} in `{environment}`: {observed}",
            monitor.failure_limit
        );
        self.alert_breach(environment, release, &reason);
        let (restored, retrained) = self
            .environments
            .release(release)
            .map_or((false, false), |r| {
                (r.restored_by_rollback, r.triggered_by.starts_with(RETRAIN))
            });
        if restored {
            // The release a rollback brought back was healthy before; that
            // it breaches too points at what it is fed, which another
            // rollback would not fix.
            let reason = format!(
                "release {release} was restored by a rollback and breaches too ({observed}): \
                 the cause is likely the data, not the model; `{environment}` is frozen and \
                 nothing is rolled back further; check the inputs, then `kiln env unfreeze`"
            );
            self.alert_data_suspected(environment, release, &reason);
            return Breach::Frozen(
                self.environments
                    .freeze(environment, reason)
                    .into_iter()
                    .collect(),
            );
        }
        match monitor.on_breach {
            OnBreach::Rollback => Breach::RollBack {
                environment: environment.clone(),
                release,
                reason,
                retrain: monitor.retrain && !retrained,
            },
            OnBreach::Freeze => Breach::Frozen(
                self.environments
                    .freeze(environment, reason)
                    .into_iter()
                    .collect(),
            ),
        }
    }

    /// An automatic rollback could not start: say so loudly.
    pub(super) fn rollback_not_started(&mut self, environment: &EnvKey, release: u64, why: &str) {
        tracing::error!(%environment, release, error = why, "automatic rollback could not start");
        self.alert_rollback_not_started(environment, release, why);
    }

    /// `kiln env unfreeze`: the write and the environment as it now is.
    pub(super) fn unfreeze(
        &mut self,
        environment: &EnvKey,
    ) -> Result<(Op, EnvironmentRecord), ApiError> {
        let record = self.environments.unfreeze(environment)?;
        Ok((Op::Environment(record.clone()), record))
    }

    /// Monitors to start and alerts to send: work for the runner.
    pub(super) fn take_work(&mut self) -> (Vec<MonitorRequest>, Vec<Alert>) {
        (
            std::mem::take(&mut self.monitor_requests),
            std::mem::take(&mut self.alerts),
        )
    }

    /// Pipelines to run again after their rollback.
    pub(super) fn take_retrains(&mut self) -> Vec<Retrain> {
        std::mem::take(&mut self.retrains)
    }

    /// Releases made live since the last call, to be signed once durable.
    pub(super) fn take_to_sign(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.to_sign)
    }
}
