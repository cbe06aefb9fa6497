//! Progressive delivery (`strategy:`): a candidate release takes part of
//! the traffic in steps, and the controller analyses it between steps.
//!
//! The controller decides every move; the user's deploy script only acts
//! on what it is given (`KILN_TRAFFIC_WEIGHT`, `KILN_TRAFFIC_MODE`):
//!
//! 1. The environment stage of the pipeline's run deploys the candidate at
//!    the first step's weight. When it succeeds, the candidate becomes a
//!    `rolling_out` release (the previous one stays live) and the
//!    environment records the rollout, `analysing` until the pause ends.
//! 2. Each analysis round (the strategy's rules, sampled like a monitor's)
//!    is recorded; `failure_limit` breaches in a row abort.
//! 3. When the pause is over, the controller queues a run of the
//!    environment stage alone at the next weight, with the candidate's
//!    exact artifacts and image (`deploying`); at the last step (100) the
//!    candidate goes live and the previous release is superseded.
//! 4. An abort (a breach, a failed step, `kiln rollout abort`) queues a run
//!    that deploys the previous release again at 100% (`restoring`); when
//!    it succeeds the candidate is `aborted` with the values that decided
//!    it. A restore that fails freezes the environment.
//!
//! The rollout lives on its environment record, written with every
//! change, so a restarted coordinator resumes it: an analysis restarts for
//! what is left of its pause, and a step's run is recovered like any run.
//!
//! The run that made the candidate waits for all of this: its environment
//! stage stays `rolling_out` (so the stages after it and the run itself
//! wait) until the rollout ends, and each end is queued
//! ([`RolloutEnded`]) for the run book: promoted, the stage succeeds;
//! aborted, it fails with the abort's reason.

use kiln_common::ids::{EnvKey, RunId};
use kiln_common::spec::{self, Strategy, StrategyKind};

use super::monitor::{self, Observation};
use super::{DeliveryController, RollbackStart};
use crate::engine::MonitorRequest;
use crate::error::ApiError;
use crate::store::{
    AnalysisRound, MAX_ROUNDS, MonitorSampleRecord, Op, ReleaseRecord, ReleaseState, RollbackPlan,
    RolloutKind, RolloutOutcome, RolloutPhase, RolloutRecord, RolloutStep,
};

/// What `kiln rollout` asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RolloutCommand {
    Status,
    /// Skip the remaining pauses and steps: the candidate takes all
    /// traffic next.
    Promote,
    /// Put the previous release back at 100%.
    Abort {
        user: String,
    },
}

/// A rollout ended: the run book ends the `rolling_out` environment
/// stage of the run that made its candidate.
#[derive(Debug, PartialEq)]
pub(crate) struct RolloutEnded {
    pub(crate) run: RunId,
    /// The environment stage's name.
    pub(crate) stage: String,
    pub(crate) promoted: bool,
    /// What the stage's message says: the decision and the values behind it.
    pub(crate) message: String,
}

impl DeliveryController {
    /// Whether a release made with `strategy` in `environment` is rolled
    /// out: only over a live release (a first one, or a one-step canary,
    /// goes live at once), and one rollout at a time.
    pub(crate) fn rollout_applies(&self, environment: &EnvKey, strategy: &Strategy) -> bool {
        self.environments.live(environment).is_some()
            && strategy.steps.len() > 1
            && self.environments.rollout(environment).is_none()
    }

    /// A release of an environment stage with a `strategy:` is made and
    /// [`Self::rollout_applies`]: its rollout begins at the first step
    /// (which the stage just deployed). Returns the writes.
    pub(super) fn begin_rollout(
        &mut self,
        mut release: ReleaseRecord,
        strategy: &Strategy,
        now: u64,
    ) -> Vec<Op> {
        let environment = release.environment.clone();
        let previous = self.environments.live(&environment).unwrap_or_default();
        release.state = ReleaseState::RollingOut;
        release.monitor_until_ms = None;
        let candidate = release.id;
        self.metrics.release_created(&environment);
        let mut ops = vec![self.environments.put(release)];
        let rollout = RolloutRecord {
            kind: match strategy.kind {
                StrategyKind::Canary => RolloutKind::Canary,
                StrategyKind::Shadow => RolloutKind::Shadow,
            },
            candidate,
            previous,
            steps: strategy.steps.clone(),
            step: 0,
            phase: RolloutPhase::Deploying,
            promote_requested: false,
            started_ms: now,
            rounds: Vec::new(),
            outcome: None,
            reason: None,
            finished_ms: None,
        };
        tracing::info!(%environment, candidate, previous, steps = ?strategy.steps, "rollout started");
        ops.extend(self.step_deployed(&environment, rollout, Some(strategy), None, now));
        ops
    }

    /// A run of a rollout ended (`plan.rollout` is set): a step deployed
    /// (or not), or the previous release restored (or not). `stage` is the
    /// environment stage's spec when it succeeded.
    pub(crate) fn rollout_run_ended(
        &mut self,
        plan: &RollbackPlan,
        succeeded: bool,
        stage: Option<&spec::Stage>,
        now: u64,
    ) -> Vec<Op> {
        let Some(step) = &plan.rollout else {
            return Vec::new();
        };
        let environment = &plan.environment;
        let Some(mut rollout) = self.environments.rollout(environment).cloned() else {
            tracing::warn!(%environment, "a rollout run ended after its rollout did");
            return Vec::new();
        };
        if step.restore {
            return self.restore_ended(environment, rollout, succeeded, now);
        }
        if rollout.candidate != plan.to || rollout.phase != RolloutPhase::Deploying {
            tracing::warn!(%environment, release = plan.to, "a step run of another rollout ended; ignored");
            return Vec::new();
        }
        if !succeeded {
            tracing::warn!(%environment, candidate = rollout.candidate, "a rollout step failed to deploy; aborting");
            rollout.reason.get_or_insert_with(|| {
                format!(
                    "the deploy of step {} ({}%) failed",
                    step.step + 1,
                    step.weight
                )
            });
            return self.restore(environment, rollout, now);
        }
        if rollout.reason.is_some() {
            // Aborted while the step deployed: restore now.
            return self.restore(environment, rollout, now);
        }
        rollout.step = step.step;
        self.step_deployed(
            environment,
            rollout,
            stage.and_then(|s| s.strategy.as_ref()),
            stage.and_then(|s| s.monitor.as_ref()),
            now,
        )
    }

    /// The current step of `rollout` is deployed: at 100% the candidate
    /// goes live; before, the analysis begins (or, asked to promote, the
    /// pause is skipped).
    fn step_deployed(
        &mut self,
        environment: &EnvKey,
        mut rollout: RolloutRecord,
        strategy: Option<&Strategy>,
        monitor: Option<&spec::Monitor>,
        now: u64,
    ) -> Vec<Op> {
        if rollout.weight() >= 100 {
            return self.promoted(environment, rollout, monitor, now);
        }
        let pause_ms = strategy.map_or(0, |s| s.pause.as_millis() as u64);
        let until_ms = if rollout.promote_requested {
            now
        } else {
            now + pause_ms
        };
        rollout.phase = RolloutPhase::Analysing { until_ms };
        tracing::info!(%environment, candidate = rollout.candidate, step = rollout.step + 1, weight = rollout.weight(), "rollout step deployed; analysing");
        if let Some(analysis) = strategy.and_then(|s| s.analysis.as_ref())
            && until_ms > now
        {
            self.watch(MonitorRequest {
                release: rollout.candidate,
                environment: environment.clone(),
                monitor: analysis.clone(),
                until_ms,
            });
        }
        self.environments
            .set_rollout(environment, Some(rollout))
            .into_iter()
            .collect()
    }

    /// The last step deployed: the candidate is live, the previous release
    /// superseded, and the candidate watched by its own `monitor:`.
    fn promoted(
        &mut self,
        environment: &EnvKey,
        mut rollout: RolloutRecord,
        monitor: Option<&spec::Monitor>,
        now: u64,
    ) -> Vec<Op> {
        let Some(mut candidate) = self.environments.release(rollout.candidate).cloned() else {
            return Vec::new();
        };
        rollout.phase = RolloutPhase::Ended;
        rollout.outcome = Some(RolloutOutcome::Promoted);
        rollout.finished_ms = Some(now);
        rollout.reason.get_or_insert_with(|| {
            format!(
                "passed {} step(s) of analysis; release {} takes all traffic",
                rollout.steps.len() - 1,
                rollout.candidate
            )
        });
        tracing::info!(%environment, candidate = candidate.id, "rollout promoted");
        self.rollouts_ended.push(RolloutEnded {
            run: candidate.run,
            stage: candidate.stage.clone(),
            promoted: true,
            message: format!(
                "rolled out to `{environment}`: {}",
                rollout.reason.as_deref().unwrap_or_default()
            ),
        });
        candidate.state = ReleaseState::Live;
        candidate.monitor_until_ms = monitor.map(|m| now + m.window.as_millis() as u64);
        candidate.rollout = Some(rollout);
        let watch = monitor
            .zip(candidate.monitor_until_ms)
            .map(|(monitor, until_ms)| MonitorRequest {
                release: candidate.id,
                environment: environment.clone(),
                monitor: monitor.clone(),
                until_ms,
            });
        let mut ops: Vec<Op> = self
            .environments
            .set_rollout(environment, None)
            .into_iter()
            .collect();
        ops.extend(
            self.environments
                .make_live(candidate, ReleaseState::Superseded, None),
        );
        if let Some(watch) = watch {
            self.watch(watch);
        }
        ops
    }

    /// Aborts `rollout` for `reason`: the previous release is deployed
    /// again at 100% — at once, or, while a step's run is still
    /// deploying, once that run ended (restoring meanwhile would race it
    /// for the router; [`Self::rollout_run_ended`] restores).
    fn abort(
        &mut self,
        environment: &EnvKey,
        mut rollout: RolloutRecord,
        reason: String,
        now: u64,
    ) -> Vec<Op> {
        tracing::warn!(%environment, candidate = rollout.candidate, %reason, "rollout aborted");
        rollout.reason = Some(reason);
        let queued = self
            .rollout_runs
            .iter()
            .position(|start| start.plan.environment == *environment);
        match queued {
            // Not handed to the run book yet: it never runs.
            Some(at) => {
                self.rollout_runs.remove(at);
            }
            None if rollout.phase == RolloutPhase::Deploying => {
                return self
                    .environments
                    .set_rollout(environment, Some(rollout))
                    .into_iter()
                    .collect();
            }
            None => {}
        }
        self.restore(environment, rollout, now)
    }

    /// Queues the run that deploys the previous release at 100%.
    fn restore(&mut self, environment: &EnvKey, mut rollout: RolloutRecord, now: u64) -> Vec<Op> {
        rollout.phase = RolloutPhase::Restoring;
        match self.rollout_run(environment, &rollout, true) {
            Ok(start) => self.rollout_runs.push(start),
            Err(error) => return self.restore_ended_badly(environment, rollout, &error, now),
        }
        self.environments
            .set_rollout(environment, Some(rollout))
            .into_iter()
            .collect()
    }

    /// The previous release's restore ended.
    fn restore_ended(
        &mut self,
        environment: &EnvKey,
        rollout: RolloutRecord,
        succeeded: bool,
        now: u64,
    ) -> Vec<Op> {
        if !succeeded {
            return self.restore_ended_badly(
                environment,
                rollout,
                "the deploy of the previous release failed",
                now,
            );
        }
        self.end_aborted(environment, rollout, RolloutOutcome::Aborted, now)
    }

    /// The previous release could not be put back: freeze, and say so.
    fn restore_ended_badly(
        &mut self,
        environment: &EnvKey,
        rollout: RolloutRecord,
        why: &str,
        now: u64,
    ) -> Vec<Op> {
        let reason = format!(
            "the rollout of release {} in `{environment}` was aborted ({}), and restoring release {} \
             at 100% failed: {why}; `{environment}` is frozen — check the router, then `kiln rollback` \
             or deploy again and `kiln env unfreeze`",
            rollout.candidate,
            rollout.reason.as_deref().unwrap_or("no reason"),
            rollout.previous
        );
        let labels = super::alerts::environment_labels(environment, rollout.candidate);
        self.raise(
            "KilnRolloutRestoreFailed",
            "critical",
            &labels,
            reason.clone(),
        );
        let mut ops = self.end_aborted(environment, rollout, RolloutOutcome::RestoreFailed, now);
        ops.extend(self.environments.freeze(environment, reason));
        ops
    }

    fn end_aborted(
        &mut self,
        environment: &EnvKey,
        mut rollout: RolloutRecord,
        outcome: RolloutOutcome,
        now: u64,
    ) -> Vec<Op> {
        rollout.phase = RolloutPhase::Ended;
        rollout.outcome = Some(outcome);
        rollout.finished_ms = Some(now);
        let reason = rollout.reason.clone().unwrap_or_default();
        if outcome == RolloutOutcome::Aborted {
            let labels = super::alerts::environment_labels(environment, rollout.candidate);
            let summary = format!(
                "rollout of release {} in `{environment}` aborted at step {} ({}%): {reason}; \
                 release {} is back at 100%",
                rollout.candidate,
                rollout.step + 1,
                rollout.weight(),
                rollout.previous
            );
            self.raise("KilnRolloutAborted", "warning", &labels, summary);
        }
        let mut ops: Vec<Op> = self
            .environments
            .set_rollout(environment, None)
            .into_iter()
            .collect();
        if let Some(mut candidate) = self.environments.release(rollout.candidate).cloned() {
            let restored = match outcome {
                RolloutOutcome::RestoreFailed => format!(
                    "restoring release {} failed and `{environment}` is frozen",
                    rollout.previous
                ),
                _ => format!("release {} is back at 100%", rollout.previous),
            };
            self.rollouts_ended.push(RolloutEnded {
                run: candidate.run,
                stage: candidate.stage.clone(),
                promoted: false,
                message: format!(
                    "rollout to `{environment}` aborted at step {} of {} ({}%): {reason}; {restored}",
                    rollout.step + 1,
                    rollout.steps.len(),
                    rollout.weight()
                ),
            });
            candidate.state = ReleaseState::Aborted;
            candidate.reason = Some(reason);
            candidate.rollout = Some(rollout);
            ops.push(self.environments.put(candidate));
        }
        ops
    }

    /// The run that deploys the rollout's current step (or, `restore`,
    /// the previous release at 100%), with the exact artifacts and image
    /// of the release it deploys.
    fn rollout_run(
        &self,
        environment: &EnvKey,
        rollout: &RolloutRecord,
        restore: bool,
    ) -> Result<RollbackStart, String> {
        let (from, to) = if restore {
            (rollout.candidate, rollout.previous)
        } else {
            (rollout.previous, rollout.candidate)
        };
        let target = self
            .environments
            .release(to)
            .cloned()
            .ok_or_else(|| format!("release {to} is not known"))?;
        let weight = if restore { 100 } else { rollout.weight() };
        let reason = if restore {
            format!(
                "restore release {to} at 100% after the aborted rollout of release {from}: {}",
                rollout.reason.as_deref().unwrap_or("aborted")
            )
        } else {
            format!(
                "rollout of release {to}: step {} of {} ({weight}%)",
                rollout.step + 1,
                rollout.steps.len()
            )
        };
        Ok(RollbackStart {
            plan: RollbackPlan {
                environment: environment.clone(),
                from,
                to,
                stage: target.stage.clone(),
                inputs: target.redeploy_inputs(),
                reason,
                retrain: false,
                rollout: Some(RolloutStep {
                    step: rollout.step,
                    weight,
                    restore,
                    steps: rollout.steps.len(),
                    model: target.model.clone(),
                }),
            },
            target,
        })
    }

    /// Rollout runs to start; the loop hands each to the run book and
    /// says which started ([`Self::rollout_run_started`]).
    pub(crate) fn take_rollout_runs(&mut self) -> Vec<RollbackStart> {
        std::mem::take(&mut self.rollout_runs)
    }

    /// The run book could not start a rollout run: a step's aborts the
    /// rollout, a restore's freezes the environment.
    pub(crate) fn rollout_run_not_started(
        &mut self,
        plan: &RollbackPlan,
        error: &str,
        now: u64,
    ) -> Vec<Op> {
        let environment = &plan.environment;
        let Some(mut rollout) = self.environments.rollout(environment).cloned() else {
            return Vec::new();
        };
        if plan.rollout.as_ref().is_some_and(|step| step.restore) {
            return self.restore_ended_badly(environment, rollout, error, now);
        }
        tracing::warn!(%environment, candidate = rollout.candidate, error, "a rollout step could not start; aborting");
        rollout
            .reason
            .get_or_insert_with(|| format!("the next step could not start: {error}"));
        self.restore(environment, rollout, now)
    }

    /// Pauses that are over: the next step deploys.
    pub(crate) fn rollout_tick(&mut self, now: u64) -> Vec<Op> {
        let due: Vec<(EnvKey, RolloutRecord)> = self
            .environments
            .rollouts()
            .filter(|(_, rollout)| {
                matches!(rollout.phase, RolloutPhase::Analysing { until_ms } if until_ms <= now)
            })
            .map(|(key, rollout)| (key.clone(), rollout.clone()))
            .collect();
        let mut ops = Vec::new();
        for (environment, mut rollout) in due {
            rollout.step = if rollout.promote_requested {
                rollout.steps.len() - 1
            } else {
                (rollout.step + 1).min(rollout.steps.len() - 1)
            };
            rollout.phase = RolloutPhase::Deploying;
            tracing::info!(%environment, candidate = rollout.candidate, step = rollout.step + 1, weight = rollout.weight(), "rollout goes on");
            match self.rollout_run(&environment, &rollout, false) {
                Ok(start) => self.rollout_runs.push(start),
                Err(error) => {
                    rollout.reason = Some(error);
                    ops.extend(self.restore(&environment, rollout, now));
                    continue;
                }
            }
            ops.extend(self.environments.set_rollout(&environment, Some(rollout)));
        }
        ops
    }

    /// Whether `release` is a candidate under analysis now (its samples
    /// go to [`Self::analyse`], not to a monitor).
    pub(crate) fn analysing(&self, release: u64) -> Option<&RolloutRecord> {
        let release = self.environments.release(release)?;
        self.environments
            .rollout(&release.environment)
            .filter(|rollout| rollout.candidate == release.id)
            .filter(|rollout| matches!(rollout.phase, RolloutPhase::Analysing { .. }))
    }

    /// One analysis round of a candidate: recorded on the rollout (and as
    /// a sample for the metric history); `failure_limit` breaches in a row
    /// at this step abort the rollout.
    pub(crate) fn analyse(
        &mut self,
        observation: &Observation,
        analysis: &spec::Monitor,
        now: u64,
    ) -> (Option<MonitorSampleRecord>, Vec<Op>) {
        let Some(mut rollout) = self.analysing(observation.release).cloned() else {
            return (None, Vec::new());
        };
        let environment = observation.environment.clone();
        let (breached, observed) = monitor::judge(analysis, &observation.values);
        if let Ok(values) = &observation.values {
            let model = self.model_label(observation.release);
            self.metrics
                .monitor_sampled(&environment, observation.release, &model, values);
        }
        let round = AnalysisRound {
            step: rollout.step,
            at_ms: now,
            values: observation.values.clone().unwrap_or_default(),
            error: observation.values.as_ref().err().cloned(),
            breached,
        };
        let sample = MonitorSampleRecord {
            release: observation.release,
            at_ms: now,
            values: round.values.clone(),
            error: round.error.clone(),
            breached,
        };
        rollout.rounds.push(round);
        if rollout.rounds.len() > MAX_ROUNDS {
            rollout.rounds.remove(0);
        }
        let in_a_row = rollout
            .rounds
            .iter()
            .rev()
            .take_while(|round| round.step == rollout.step && round.breached)
            .count() as u32;
        if breached && in_a_row >= analysis.failure_limit {
            let reason = format!(
                "{in_a_row} analysis round(s) in a row breached at step {} ({}%): {observed}",
                rollout.step + 1,
                rollout.weight()
            );
            return (Some(sample), self.abort(&environment, rollout, reason, now));
        }
        let ops = self
            .environments
            .set_rollout(&environment, Some(rollout))
            .into_iter()
            .collect();
        (Some(sample), ops)
    }

    /// `kiln rollout status|promote|abort`: the rollout in progress (or the
    /// last one that ended) and the writes the command made.
    pub(crate) fn rollout_command(
        &mut self,
        environment: &EnvKey,
        command: &RolloutCommand,
        now: u64,
    ) -> Result<(RolloutRecord, Vec<Op>), ApiError> {
        let Some(mut rollout) = self.environments.rollout(environment).cloned() else {
            if *command != RolloutCommand::Status {
                return Err(ApiError::FailedPrecondition(format!(
                    "no rollout is in progress in `{environment}`"
                )));
            }
            return self
                .environments
                .history(environment)
                .into_iter()
                .rev()
                .find_map(|release| release.rollout.clone())
                .map(|last| (last, Vec::new()))
                .ok_or_else(|| {
                    ApiError::NotFound(format!(
                        "`{environment}` has had no rollout; a `strategy:` on its stage makes one"
                    ))
                });
        };
        let ops = match command {
            RolloutCommand::Status => Vec::new(),
            RolloutCommand::Promote => {
                if rollout.phase == RolloutPhase::Restoring || rollout.reason.is_some() {
                    return Err(ApiError::FailedPrecondition(format!(
                        "the rollout of release {} in `{environment}` was aborted; it cannot be promoted",
                        rollout.candidate
                    )));
                }
                rollout.promote_requested = true;
                if let RolloutPhase::Analysing { until_ms } = &mut rollout.phase {
                    *until_ms = now;
                }
                tracing::info!(%environment, candidate = rollout.candidate, "rollout promote requested");
                let ops = self
                    .environments
                    .set_rollout(environment, Some(rollout.clone()))
                    .into_iter()
                    .collect();
                // Goes on at once rather than at the next tick.
                let mut ops: Vec<Op> = ops;
                ops.extend(self.rollout_tick(now));
                ops
            }
            RolloutCommand::Abort { user } => {
                if rollout.phase == RolloutPhase::Restoring {
                    return Err(ApiError::FailedPrecondition(format!(
                        "the rollout of release {} in `{environment}` is already being aborted",
                        rollout.candidate
                    )));
                }
                let reason = format!("aborted by {user}");
                let mut ops = Vec::new();
                if rollout.reason.is_none() {
                    ops = self.abort(environment, rollout, reason, now);
                }
                ops
            }
        };
        let rollout = self
            .environments
            .rollout(environment)
            .cloned()
            .or_else(|| {
                self.environments
                    .history(environment)
                    .into_iter()
                    .rev()
                    .find_map(|release| release.rollout.clone())
            })
            .ok_or_else(|| ApiError::Internal("a rollout vanished".into()))?;
        Ok((rollout, ops))
    }

    /// Rollouts under analysis after a restart: their analyses start again
    /// for what is left of the pause (given the strategy of each).
    pub(crate) fn analyses_to_resume(&self) -> Vec<(EnvKey, ReleaseRecord, u64)> {
        self.environments
            .rollouts()
            .filter_map(|(environment, rollout)| match rollout.phase {
                RolloutPhase::Analysing { until_ms } => Some((
                    environment.clone(),
                    self.environments.release(rollout.candidate)?.clone(),
                    until_ms,
                )),
                _ => None,
            })
            .collect()
    }

    /// Rollouts that ended since the last call.
    pub(crate) fn take_rollouts_ended(&mut self) -> Vec<RolloutEnded> {
        std::mem::take(&mut self.rollouts_ended)
    }

    /// Rollouts in progress by the run that made their candidate: the run,
    /// its environment stage, and where the rollout is, in words.
    pub(crate) fn rollouts_by_run(&self) -> Vec<(RunId, String, String)> {
        self.environments
            .rollouts()
            .filter_map(|(environment, rollout)| {
                let candidate = self.environments.release(rollout.candidate)?;
                Some((
                    candidate.run,
                    candidate.stage.clone(),
                    progress(environment, rollout),
                ))
            })
            .collect()
    }

    /// The run `run` is stopped (cancelled, or past its `timeout:`) while
    /// the candidate it made is rolled out: the rollout is aborted, and
    /// the previous release restored at 100%. Returns the writes.
    pub(crate) fn abort_rollout_of_run(&mut self, run: RunId, why: &str, now: u64) -> Vec<Op> {
        let found = self
            .environments
            .rollouts()
            .find_map(|(environment, rollout)| {
                let candidate = self.environments.release(rollout.candidate)?;
                (candidate.run == run).then(|| (environment.clone(), rollout.clone()))
            });
        let Some((environment, rollout)) = found else {
            return Vec::new();
        };
        if rollout.phase == RolloutPhase::Restoring || rollout.reason.is_some() {
            return Vec::new();
        }
        let reason = format!("run {run} that made release {} {why}", rollout.candidate);
        self.abort(&environment, rollout, reason, now)
    }

    /// How the rollout of the release that run `run`'s stage `stage` made
    /// ended, for a `rolling_out` stage found after a restart whose
    /// rollout is no longer in progress: `(promoted, message)`.
    pub(crate) fn rollout_outcome_of_run(&self, run: RunId, stage: &str) -> (bool, String) {
        let release = self
            .environments
            .releases()
            .filter(|release| release.run == run && release.stage == stage)
            .last();
        match release {
            Some(release) if release.state == ReleaseState::Aborted => (
                false,
                format!(
                    "rollout of release {} aborted: {}",
                    release.id,
                    release.reason.as_deref().unwrap_or("no reason recorded")
                ),
            ),
            Some(release) => (
                true,
                format!(
                    "release {} was rolled out to `{}`",
                    release.id, release.environment
                ),
            ),
            None => (
                false,
                "the rollout this stage started has no record; retry the stage to deploy again"
                    .to_owned(),
            ),
        }
    }

    /// Why a run's environment stage may not deploy to `environment` now:
    /// a rollout there owns the router until it ends.
    pub(crate) fn rollout_in_progress(&self, environment: &EnvKey) -> Option<String> {
        let rollout = self.environments.rollout(environment)?;
        Some(format!(
            "release {} is being rolled out in `{environment}` (step {} of {}); wait for it, or \
             `kiln rollout promote|abort {}`",
            rollout.candidate,
            rollout.step + 1,
            rollout.steps.len(),
            environment
        ))
    }
}

/// Where `rollout` is, as a `rolling_out` stage's message says it.
fn progress(environment: &EnvKey, rollout: &RolloutRecord) -> String {
    let at = format!(
        "step {} of {} ({}%)",
        rollout.step + 1,
        rollout.steps.len(),
        rollout.weight()
    );
    let doing = match &rollout.phase {
        RolloutPhase::Deploying => format!("deploying {at}"),
        RolloutPhase::Analysing { .. } => format!("{at} deployed, analysing"),
        RolloutPhase::Restoring => format!(
            "aborted at {at} ({}); restoring release {} at 100%",
            rollout.reason.as_deref().unwrap_or("no reason"),
            rollout.previous
        ),
        RolloutPhase::Ended => "ended".to_owned(),
    };
    format!(
        "rolling out release {} to `{environment}`: {doing}; the stages after it wait for the \
         rollout (`kiln rollout status {environment}`)",
        rollout.candidate
    )
}
