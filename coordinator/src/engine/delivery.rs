//! Delivery: metrics, gates, releases and rollbacks — decided here, by the
//! coordinator, from metrics it parsed itself; never by an agent.
//!
//! - A stage's `metrics:` file travels as an artifact; the engine reads the
//!   blob, checks it is a flat JSON object of numbers and stores the values
//!   on the stage.
//! - A `gate:` stage never reaches an agent: when it becomes ready the
//!   engine checks thresholds and the champion (the live release of
//!   `compare_to`) and records every check with the values that decided it.
//! - An `environment:` stage that succeeds creates a release and makes it
//!   live; the previous live release is superseded.
//! - A rollback is a run of one environment stage with the restored
//!   release's exact artifacts (by digest): no retraining, no gates.
//!
//! **Architecture Invariant:** promotion and rollback are decided only from
//! values the coordinator parsed from content-addressed artifacts or sampled
//! itself; nothing an agent says about them is trusted.

use std::collections::BTreeMap;

use kiln_common::ids::{EnvKey, RunId, StageKey};
use kiln_common::spec::{self, Approval, Gate, OnMissing};

use super::{ActiveRun, Engine, MonitorRequest};
use crate::error::ApiError;
use crate::store::{
    EnvironmentRecord, GateCheck, GateDecision, Op, ReleaseRecord, ReleaseState, RollbackPlan,
    RunRecord, RunState, StageArtifact, StageRecord, StageState,
};

/// What the run book asks of the delivery controller; the engine routes
/// these after each event (and between dispatch rounds), so the DAG code
/// never calls into delivery.
#[derive(Debug)]
pub(crate) enum DeliveryEvent {
    /// An environment stage succeeded: its release goes live (or, in a
    /// rollback run, the restored one does).
    Deployed(StageKey),
    /// A gate stage is ready to be decided.
    GateReady(StageKey),
    /// A rollback run ended without success.
    RollbackFailed(RollbackPlan),
}

impl Engine {
    /// Routes the delivery events queued so far.
    pub(super) fn route_delivery(&mut self) {
        while !self.delivery_events.is_empty() {
            for event in std::mem::take(&mut self.delivery_events) {
                match event {
                    DeliveryEvent::Deployed(key) => self.on_environment_stage_succeeded(key),
                    DeliveryEvent::GateReady(key) => self.evaluate_gate(key),
                    DeliveryEvent::RollbackFailed(plan) => self.finish_rollback(&plan, false),
                }
            }
        }
    }

    /// A run of the run book, unfinished or lately finished: delivery
    /// events may arrive after the run retired in the same burst.
    fn run_of(&self, run: RunId) -> Option<&ActiveRun> {
        self.runs.get(&run).or_else(|| self.retired.get(&run))
    }

    /// The spec of a stage of an active run.
    pub(super) fn stage_spec(&self, key: StageKey) -> Option<&spec::Stage> {
        self.run_of(key.run)?
            .spec
            .parsed
            .stages
            .get(key.idx as usize)
    }

    /// Every metric of the run so far; later stages win on a name clash.
    fn run_metrics(&self, run: RunId) -> BTreeMap<String, Option<f64>> {
        let mut metrics = BTreeMap::new();
        if let Some(active) = self.run_of(run) {
            for stage in &active.stages {
                metrics.extend(stage.metrics.clone());
            }
        }
        metrics
    }

    /// Decides a ready gate stage on the spot.
    pub(super) fn evaluate_gate(&mut self, key: StageKey) {
        // Cancelled (or decided) since it was handed over.
        if !self
            .stage(key)
            .is_some_and(|stage| stage.state == StageState::Ready)
        {
            return;
        }
        let Some(gate) = self.stage_spec(key).and_then(|stage| stage.gate.clone()) else {
            return;
        };
        let metrics = self.run_metrics(key.run);
        // The champion is the live release of the run's own pipeline's
        // environment; another pipeline's model is never compared.
        let pipeline = self
            .runs
            .get(&key.run)
            .map(|run| run.record.pipeline.clone());
        let champion = gate
            .compare_to
            .as_ref()
            .zip(pipeline)
            .and_then(|(env, pipeline)| {
                let champion = self
                    .delivery
                    .champion(&EnvKey::of_pipeline(&pipeline, env))?;
                Some((env.clone(), champion.clone()))
            });
        let now = self.clock.now_ms();
        let mut decision = decide(
            &gate,
            &metrics,
            champion.as_ref().map(|(env, r)| (env.as_str(), &r.metrics)),
        );
        decision.decided_ms = now;
        self.metrics.gate_decided(if !decision.passed {
            "failed"
        } else if gate.approval == Approval::Manual {
            "awaiting_approval"
        } else {
            "passed"
        });
        let passed = decision.passed;
        let summary = decision.summary.clone();
        if let Some(stage) = self.stage_mut(key) {
            stage.gate = Some(decision);
            stage.started_ms = Some(now);
        }
        match (passed, gate.approval) {
            (false, _) => {
                self.alert_gate_failed(key, &summary);
                self.settle_stage(key, StageState::Failed, None, summary);
            }
            (true, Approval::Manual) => {
                if self.move_stage(key, StageState::AwaitingApproval)
                    && let Some(stage) = self.stage_mut(key)
                {
                    stage.message = format!("{summary}; waiting for `kiln approve`");
                }
            }
            (true, Approval::Auto) => self.settle_stage(key, StageState::Succeeded, None, summary),
        }
    }

    /// `kiln approve` / `kiln reject` of a gate that waits.
    pub(super) fn decide_gate(
        &mut self,
        run: RunId,
        name: &str,
        user: &str,
        approve: bool,
    ) -> Result<RunId, ApiError> {
        let active = self.runs.get(&run).ok_or_else(|| self.not_active(run))?;
        let idx = active
            .spec
            .parsed
            .stage_idx(name)
            .ok_or_else(|| ApiError::NotFound(format!("run {run} has no stage `{name}`")))?;
        let key = StageKey {
            run,
            idx: idx as u32,
        };
        let state = active.stages[idx].state;
        if state != StageState::AwaitingApproval {
            return Err(ApiError::FailedPrecondition(format!(
                "stage `{name}` of run {run} is {}, not waiting for approval",
                state.name()
            )));
        }
        let verdict = if approve { "approved" } else { "rejected" };
        if let Some(stage) = self.stage_mut(key)
            && let Some(gate) = stage.gate.as_mut()
        {
            gate.decided_by = Some(user.to_owned());
            gate.passed = approve;
            gate.summary = format!("{}; {verdict} by {user}", gate.summary);
        }
        tracing::info!(run = %run, stage = name, user, verdict, "manual gate decided");
        let message = format!("{verdict} by {user}");
        if approve {
            self.settle_stage(key, StageState::Succeeded, None, message);
        } else {
            self.settle_stage(key, StageState::Failed, None, message);
        }
        Ok(run)
    }

    /// An environment stage succeeded: its release goes live (or, in a
    /// rollback run, the restored release does).
    pub(super) fn on_environment_stage_succeeded(&mut self, key: StageKey) {
        let Some(active) = self.run_of(key.run) else {
            return;
        };
        if let Some(plan) = active.record.rollback.clone() {
            self.finish_rollback(&plan, true);
            return;
        }
        let Some(stage_spec) = self.stage_spec(key).cloned() else {
            return;
        };
        let Some(name) = stage_spec.environment.as_deref() else {
            return;
        };
        let environment = EnvKey::of_pipeline(&active.record.pipeline, name);
        let now = self.clock.now_ms();
        let id = self.delivery.next_release_id();
        let Some(active) = self.run_of(key.run) else {
            return;
        };
        let stage = &active.stages[key.idx as usize];
        let mut artifacts: Vec<StageArtifact> = self.inputs_of_stage(key);
        artifacts.extend(stage.outputs.iter().map(|artifact| StageArtifact {
            stage: stage.name.clone(),
            artifact: artifact.clone(),
        }));
        let gates = active
            .stages
            .iter()
            .filter_map(|s| s.gate.clone().map(|gate| (s.name.clone(), gate)))
            .collect();
        // The environment stage's own image: what a rollback re-deploys in.
        let image_digest = stage.image_digest.clone();
        let release = ReleaseRecord {
            id,
            environment: environment.clone(),
            run: key.run,
            pipeline: active.record.pipeline.clone(),
            pipeline_version: active.record.pipeline_version,
            commit: active.record.commit.clone(),
            source_digest: active.record.source_digest.clone(),
            stage: stage.name.clone(),
            artifacts,
            image_digest,
            metrics: self.run_metrics(key.run),
            gates,
            triggered_by: active.record.triggered_by.clone(),
            created_ms: now,
            state: ReleaseState::Live,
            reason: None,
            monitor_until_ms: stage_spec
                .monitor
                .as_ref()
                .map(|m| now + m.window.as_millis() as u64),
            restored_by_rollback: false,
        };
        self.make_live(release, ReleaseState::Superseded, None);
        if let Some(signer) = self.release_signer.clone() {
            self.after_commit(move || {
                let _ = signer.send(id);
            });
        }
        if let Some(monitor) = stage_spec.monitor {
            let until_ms = now + monitor.window.as_millis() as u64;
            self.monitor_requests.push(MonitorRequest {
                release: id,
                environment,
                monitor,
                until_ms,
            });
        }
    }

    /// Makes `release` live through the delivery state and queues the
    /// writes.
    fn make_live(
        &mut self,
        release: ReleaseRecord,
        previous_becomes: ReleaseState,
        reason: Option<String>,
    ) {
        self.metrics.release_created(&release.environment);
        for op in self.delivery.make_live(release, previous_becomes, reason) {
            self.write(op);
        }
    }

    /// Starts a rollback run of `environment` to `to` (default: the release
    /// of the same environment of the same pipeline that was live before
    /// the current one).
    pub(super) fn start_rollback(
        &mut self,
        environment: &EnvKey,
        to: Option<u64>,
        reason: String,
        triggered_by: String,
    ) -> Result<RunId, ApiError> {
        if !self.delivery.exists(environment) {
            return Err(ApiError::NotFound(format!(
                "environment `{environment}` has no releases"
            )));
        }
        let live = self.delivery.live(environment).ok_or_else(|| {
            ApiError::FailedPrecondition(format!("nothing is live in `{environment}`"))
        })?;
        if let Some(running) = self.runs.values().find(|run| {
            !run.record.state.is_finished()
                && run
                    .record
                    .rollback
                    .as_ref()
                    .is_some_and(|plan| plan.environment == *environment)
        }) {
            return Err(ApiError::FailedPrecondition(format!(
                "a rollback of `{environment}` is already running as run {}",
                running.record.id
            )));
        }
        let history: Vec<ReleaseRecord> = self
            .delivery
            .history(environment)
            .into_iter()
            .cloned()
            .collect();
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
                .find(|release| release.id < live && release.state != ReleaseState::RolledBack)
                .ok_or_else(|| {
                    ApiError::FailedPrecondition(format!(
                        "`{environment}` has no earlier release to roll back to; pass --to RELEASE"
                    ))
                })?,
        }
        .clone();
        if target.id == live {
            return Err(ApiError::FailedPrecondition(format!(
                "release {live} is already live in `{environment}`"
            )));
        }
        let pipeline =
            self.latest.get(&target.pipeline).cloned().ok_or_else(|| {
                ApiError::NotFound(format!("pipeline `{}` is gone", target.pipeline))
            })?;
        let spec = self.spec(&target.pipeline, target.pipeline_version)?;
        let idx = spec.parsed.stage_idx(&target.stage).ok_or_else(|| {
            ApiError::FailedPrecondition(format!(
                "stage `{}` is not in version {}",
                target.stage, target.pipeline_version
            ))
        })?;
        let plan = RollbackPlan {
            environment: environment.clone(),
            from: live,
            to: target.id,
            stage: target.stage.clone(),
            inputs: target
                .artifacts
                .iter()
                .filter(|a| a.stage != target.stage)
                .cloned()
                .collect(),
            reason,
        };
        let id = RunId(self.next_run_id);
        self.next_run_id += 1;
        let now = self.clock.now_ms();
        let record = RunRecord {
            id,
            pipeline: pipeline.name.clone(),
            pipeline_version: target.pipeline_version,
            commit: target.commit.clone(),
            rev: format!("rollback to release {}", target.id),
            state: RunState::Queued,
            triggered_by,
            created_ms: now,
            finished_ms: None,
            source_digest: target.source_digest.clone(),
            rollback: Some(plan),
            datasets: Vec::new(),
        };
        let stages: Vec<StageRecord> = spec
            .parsed
            .stages
            .iter()
            .enumerate()
            .map(|(i, stage)| {
                let mut record = StageRecord::new(
                    StageKey {
                        run: id,
                        idx: i as u32,
                    },
                    &stage.name,
                    Vec::new(),
                );
                if i != idx {
                    record.state = StageState::Skipped;
                    record.message = "not part of a rollback".into();
                }
                record
            })
            .collect();
        tracing::warn!(run = %id, %environment, from = live, to = target.id, "rolling back: release {} replaces release {live}", target.id);
        self.runs.insert(id, ActiveRun::new(record, stages, spec));
        self.save_run(id);
        for i in 0..self.runs[&id].stages.len() {
            self.save_stage(StageKey {
                run: id,
                idx: i as u32,
            });
        }
        self.make_ready(StageKey {
            run: id,
            idx: idx as u32,
        });
        Ok(id)
    }

    /// The rollback run ended: on success the restored release is live
    /// again and the replaced one is marked rolled back.
    pub(super) fn finish_rollback(&mut self, plan: &RollbackPlan, succeeded: bool) {
        self.metrics.rollback_finished(&plan.environment, succeeded);
        if !succeeded {
            self.alert_rollback_failed(plan);
            return;
        }
        let live = self.delivery.live(&plan.environment);
        if live != Some(plan.from) {
            // Something else went live meanwhile: leave it, and say so.
            tracing::warn!(environment = %plan.environment, ?live, from = plan.from, "rollback finished after another release went live; not applied");
            self.alert_rollback_failed(plan);
            return;
        }
        let Some(mut restored) = self.delivery.release(plan.to).cloned() else {
            return;
        };
        restored.state = ReleaseState::Live;
        restored.restored_by_rollback = true;
        restored.monitor_until_ms = None;
        self.make_live(
            restored,
            ReleaseState::RolledBack,
            Some(plan.reason.clone()),
        );
        self.alert_rolled_back(plan);
    }

    /// Artifacts a stage gets: the outputs of the stages it needs, or a
    /// rollback plan's fixed artifacts.
    pub(super) fn inputs_of_stage(&self, key: StageKey) -> Vec<StageArtifact> {
        let Some(active) = self.run_of(key.run) else {
            return Vec::new();
        };
        if let Some(plan) = &active.record.rollback {
            return plan.inputs.clone();
        }
        active.spec.parsed.stages[key.idx as usize]
            .needs
            .iter()
            .flat_map(|&need| {
                let stage = &active.stages[need];
                stage.outputs.iter().map(|artifact| StageArtifact {
                    stage: stage.name.clone(),
                    artifact: artifact.clone(),
                })
            })
            .collect()
    }

    pub(super) fn unfreeze(&mut self, environment: &EnvKey) -> Result<EnvironmentRecord, ApiError> {
        let op = self.delivery.unfreeze(environment)?;
        let Op::Environment(record) = &op else {
            unreachable!("unfreezing writes the environment");
        };
        let record = record.clone();
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

/// Evaluates a gate: thresholds, then the champion comparison.
fn decide(
    gate: &Gate,
    metrics: &BTreeMap<String, Option<f64>>,
    champion: Option<(&str, &BTreeMap<String, Option<f64>>)>,
) -> GateDecision {
    let mut checks = Vec::new();
    for (metric, condition) in &gate.require {
        let value = metrics
            .get(metric)
            .copied()
            .flatten()
            .filter(|v| !v.is_nan());
        let (passed, by_missing) = match value {
            Some(value) => (condition.holds(value), None),
            None => missing(gate.on_missing),
        };
        checks.push(GateCheck {
            metric: metric.clone(),
            rule: condition.to_string(),
            value,
            champion: None,
            passed,
            decided_by_on_missing: by_missing,
        });
    }
    let mut notes = Vec::new();
    match (gate.compare_to.as_deref(), champion) {
        (Some(env), None) => notes.push(format!(
            "no champion in `{env}` yet: first deployment, gated on thresholds alone"
        )),
        (Some(env), Some((_, champion_metrics))) => {
            for (metric, regression) in &gate.max_regression {
                let value = metrics
                    .get(metric)
                    .copied()
                    .flatten()
                    .filter(|v| !v.is_nan());
                let best = champion_metrics
                    .get(metric)
                    .copied()
                    .flatten()
                    .filter(|v| !v.is_nan());
                let allowed = |champion: f64| {
                    if regression.relative {
                        champion * regression.amount
                    } else {
                        regression.amount
                    }
                };
                let rule = if regression.relative {
                    format!("drop <= {}% vs {env}", regression.amount * 100.0)
                } else {
                    format!("drop <= {} vs {env}", regression.amount)
                };
                let (passed, by_missing) = match (value, best) {
                    (Some(value), Some(best)) => (value >= best - allowed(best), None),
                    _ => missing(gate.on_missing),
                };
                checks.push(GateCheck {
                    metric: metric.clone(),
                    rule,
                    value,
                    champion: best,
                    passed,
                    decided_by_on_missing: by_missing,
                });
            }
        }
        (None, _) => {}
    }
    let failed: Vec<String> = checks
        .iter()
        .filter(|check| !check.passed)
        .map(|check| match (check.value, &check.decided_by_on_missing) {
            (None, _) => format!(
                "{} missing or NaN for `{}` (on_missing: fail decided)",
                check.metric, check.rule
            ),
            (Some(value), _) => match check.champion {
                Some(champion) => format!(
                    "{} {value:.4} vs champion {champion:.4} ({})",
                    check.metric, check.rule
                ),
                None => format!("{} {value:.4} not {}", check.metric, check.rule),
            },
        })
        .collect();
    let passed = failed.is_empty();
    let mut summary = if passed {
        format!("gate passed: {} checks", checks.len())
    } else {
        format!("gate failed: {}", failed.join("; "))
    };
    let passed_by_missing: Vec<&str> = checks
        .iter()
        .filter(|check| check.passed && check.decided_by_on_missing.is_some())
        .map(|check| check.metric.as_str())
        .collect();
    if !passed_by_missing.is_empty() {
        summary.push_str(&format!(
            " ({} missing, passed by on_missing: pass)",
            passed_by_missing.join(", ")
        ));
    }
    for note in notes {
        summary.push_str(&format!("; {note}"));
    }
    GateDecision {
        passed,
        checks,
        summary,
        decided_ms: 0,
        decided_by: None,
    }
}

fn missing(policy: OnMissing) -> (bool, Option<String>) {
    match policy {
        OnMissing::Fail => (false, Some("fail".into())),
        OnMissing::Pass => (true, Some("pass".into())),
    }
}

/// A flat JSON object of numbers. Python's `json` writes NaN as a bare
/// `NaN`, which is not JSON; it is accepted (and kept as NaN) so a gate can
/// apply `on_missing` to it.
pub(crate) fn parse_metrics(text: &str) -> Result<BTreeMap<String, Option<f64>>, String> {
    let cleaned = replace_bare_nan(text);
    let value: serde_json::Value = serde_json::from_str(&cleaned).map_err(|error| {
        format!("not valid JSON ({error}); write a flat object like {{\"accuracy\": 0.94}}")
    })?;
    let object = value
        .as_object()
        .ok_or_else(|| "must be a flat JSON object like {\"accuracy\": 0.94}".to_owned())?;
    object
        .iter()
        .map(|(name, value)| match value {
            serde_json::Value::Number(number) => Ok((name.clone(), number.as_f64())),
            serde_json::Value::Null => Ok((name.clone(), None)),
            other => Err(format!(
                "`{name}` is {other}, not a number; metrics must be a flat object of numbers"
            )),
        })
        .collect()
}

/// Replaces `NaN` tokens outside strings with `null`.
fn replace_bare_nan(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string && rest.starts_with("NaN") {
            out.push_str("null");
            rest = &rest[3..];
            continue;
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

impl StageRecord {
    /// A stage as it starts: pending, attempt 1.
    pub(crate) fn new(key: StageKey, name: &str, needs: Vec<String>) -> Self {
        Self {
            key,
            name: name.to_owned(),
            needs,
            state: StageState::Pending,
            attempt: 1,
            retries_used: 0,
            agent: None,
            started_ms: None,
            finished_ms: None,
            exit_code: None,
            message: String::new(),
            next_log_seq: 0,
            log_bytes: 0,
            log_truncated: false,
            image_digest: None,
            outputs: Vec::new(),
            metrics: BTreeMap::new(),
            gate: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_common::spec::{Condition, MaxRegression, Op};

    fn metrics(pairs: &[(&str, Option<f64>)]) -> BTreeMap<String, Option<f64>> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn metrics_files_are_flat_numbers_with_nan_allowed() {
        let parsed = parse_metrics(r#"{"accuracy": 0.94, "recall": NaN, "note_NaN": 1}"#).unwrap();
        assert_eq!(
            parsed,
            metrics(&[
                ("accuracy", Some(0.94)),
                ("note_NaN", Some(1.0)),
                ("recall", None)
            ])
        );
        assert!(
            parse_metrics(r#"{"a": {"b": 1}}"#)
                .unwrap_err()
                .contains("`a`")
        );
        assert!(
            parse_metrics("[1, 2]")
                .unwrap_err()
                .contains("flat JSON object")
        );
        assert!(parse_metrics("{").unwrap_err().contains("not valid JSON"));
    }

    fn gate(on_missing: OnMissing) -> Gate {
        Gate {
            require: [(
                "recall".to_string(),
                Condition {
                    op: Op::Ge,
                    value: 0.5,
                },
            )]
            .into(),
            compare_to: Some("production".into()),
            max_regression: [(
                "recall".to_string(),
                MaxRegression {
                    amount: 0.1,
                    relative: true,
                },
            )]
            .into(),
            on_missing,
            approval: Approval::Auto,
        }
    }

    #[test]
    fn thresholds_champion_and_missing_values() {
        let first = decide(
            &gate(OnMissing::Fail),
            &metrics(&[("recall", Some(0.6))]),
            None,
        );
        assert!(first.passed);
        assert!(
            first.summary.contains("first deployment"),
            "{}",
            first.summary
        );

        let champion = metrics(&[("recall", Some(0.8))]);
        let regressed = decide(
            &gate(OnMissing::Fail),
            &metrics(&[("recall", Some(0.6))]),
            Some(("production", &champion)),
        );
        assert!(!regressed.passed, "0.6 is more than 10% below 0.8");
        assert!(
            regressed.summary.contains("vs champion 0.8000"),
            "{}",
            regressed.summary
        );
        let close = decide(
            &gate(OnMissing::Fail),
            &metrics(&[("recall", Some(0.75))]),
            Some(("production", &champion)),
        );
        assert!(close.passed, "{}", close.summary);

        let nan = decide(&gate(OnMissing::Fail), &metrics(&[("recall", None)]), None);
        assert!(!nan.passed);
        assert!(
            nan.summary.contains("on_missing: fail decided"),
            "{}",
            nan.summary
        );
        let lenient = decide(&gate(OnMissing::Pass), &metrics(&[]), None);
        assert!(lenient.passed);
        assert!(
            lenient.summary.contains("passed by on_missing: pass"),
            "{}",
            lenient.summary
        );
    }
}
