//! Stored records as wire messages.

use std::collections::{BTreeMap, HashMap};

use kiln_common::ids::RunId;
use kiln_proto::v1 as pb;

use crate::error::ApiError;
use crate::store::{
    ArtifactRecord, EnvironmentRecord, GateDecision, LogStream, ReleaseRecord, ReleaseState,
    RunRecord, RunState, StageRecord, StageState, Store, StoredLog,
};

pub(crate) fn run(record: &RunRecord, stages: &[StageRecord]) -> pb::Run {
    pb::Run {
        id: record.id.0,
        pipeline: record.pipeline.clone(),
        pipeline_version: record.pipeline_version,
        commit: record.commit.clone(),
        rev: record.rev.clone(),
        state: run_state(record.state) as i32,
        triggered_by: record.triggered_by.clone(),
        created_ms: record.created_ms,
        finished_ms: record.finished_ms.unwrap_or_default(),
        stages: stages.iter().map(stage).collect(),
        source_digest: record.source_digest.clone().unwrap_or_default(),
        datasets: record.datasets.iter().map(dataset).collect(),
        pipeline_digest: record.pipeline_digest.clone(),
        params: record.params.clone().into_iter().collect(),
        variables: record.variables.clone().into_iter().collect(),
        rollback: record.rollback.as_ref().map(|plan| pb::RollbackPlan {
            pipeline: plan.environment.pipeline().to_owned(),
            environment: plan.environment.name.clone(),
            from_release: plan.from,
            to_release: plan.to,
            reason: plan.reason.clone(),
            kind: plan.kind().to_owned(),
            step: plan.rollout.as_ref().map_or(0, |step| step.step as u32 + 1),
            steps: plan.rollout.as_ref().map_or(0, |step| step.steps as u32),
            weight: plan.rollout.as_ref().map_or(0, |step| step.weight),
            model: plan
                .rollout
                .as_ref()
                .and_then(|step| step.model.as_ref())
                .map(ToString::to_string)
                .unwrap_or_default(),
            summary: plan.describe(),
        }),
    }
}

pub(crate) fn dataset(record: &crate::store::DatasetRecord) -> pb::Dataset {
    pb::Dataset {
        source: record.source.clone(),
        path: record.path.clone(),
        digest: record.digest.clone(),
        content_digest: record.content_digest.clone(),
    }
}

pub(crate) fn stored_run(store: &dyn Store, id: RunId) -> Result<pb::Run, ApiError> {
    let record = store
        .run(id)?
        .ok_or_else(|| ApiError::NotFound(format!("run {id} does not exist")))?;
    Ok(run(&record, &store.stages(id)?))
}

fn stage(record: &StageRecord) -> pb::Stage {
    pb::Stage {
        idx: record.key.idx,
        name: record.name.clone(),
        state: stage_state(record.state) as i32,
        attempt: record.attempt,
        agent: record.agent.clone().unwrap_or_default(),
        started_ms: record.started_ms.unwrap_or_default(),
        finished_ms: record.finished_ms.unwrap_or_default(),
        exit_code: record.exit_code.unwrap_or_default(),
        message: record.message.clone(),
        needs: record.needs.clone(),
        image_digest: record.image_digest.clone().unwrap_or_default(),
        outputs: record
            .outputs
            .iter()
            .map(|output| artifact(&record.name, output))
            .collect(),
        metrics: metrics(&record.metrics),
        gate: record.gate.as_ref().map(gate),
    }
}

pub(crate) fn metrics(values: &BTreeMap<String, Option<f64>>) -> HashMap<String, f64> {
    values
        .iter()
        .map(|(name, value)| (name.clone(), value.unwrap_or(f64::NAN)))
        .collect()
}

pub(crate) fn gate(decision: &GateDecision) -> pb::GateDecision {
    pb::GateDecision {
        passed: decision.passed,
        checks: decision
            .checks
            .iter()
            .map(|check| pb::GateCheck {
                metric: check.metric.clone(),
                rule: check.rule.clone(),
                value: check.value,
                champion: check.champion,
                passed: check.passed,
                decided_by_on_missing: check.decided_by_on_missing.clone().unwrap_or_default(),
            })
            .collect(),
        summary: decision.summary.clone(),
        selected: decision
            .selection
            .as_ref()
            .and_then(|selection| selection.winner.clone())
            .unwrap_or_default(),
        candidates: decision
            .selection
            .iter()
            .flat_map(|selection| &selection.candidates)
            .map(|(stage, value)| pb::Candidate {
                stage: stage.clone(),
                value: *value,
            })
            .collect(),
        decided_ms: decision.decided_ms,
        decided_by: decision.decided_by.clone().unwrap_or_default(),
    }
}

pub(crate) fn release(record: &ReleaseRecord) -> pb::Release {
    pb::Release {
        id: record.id,
        environment: record.environment.name.clone(),
        run_id: record.run.0,
        pipeline: record.pipeline.clone(),
        pipeline_version: record.pipeline_version,
        commit: record.commit.clone(),
        source_digest: record.source_digest.clone().unwrap_or_default(),
        stage: record.stage.clone(),
        artifacts: record
            .artifacts
            .iter()
            .map(|a| artifact(&a.stage, &a.artifact))
            .collect(),
        image_digest: record.image_digest.clone().unwrap_or_default(),
        metrics: metrics(&record.metrics),
        gates: record
            .gates
            .iter()
            .map(|(stage, decision)| pb::NamedGateDecision {
                stage: stage.clone(),
                decision: Some(gate(decision)),
            })
            .collect(),
        triggered_by: record.triggered_by.clone(),
        created_ms: record.created_ms,
        state: match record.state {
            ReleaseState::Live => pb::ReleaseState::Live,
            ReleaseState::Superseded => pb::ReleaseState::Superseded,
            ReleaseState::RolledBack => pb::ReleaseState::RolledBack,
            ReleaseState::RollingOut => pb::ReleaseState::RollingOut,
            ReleaseState::Aborted => pb::ReleaseState::Aborted,
        } as i32,
        reason: record.reason.clone().unwrap_or_default(),
        monitor_until_ms: record.monitor_until_ms.unwrap_or_default(),
        restored_by_rollback: record.restored_by_rollback,
        endpoint: record.endpoint.clone().unwrap_or_default(),
        rollout: record
            .rollout
            .as_ref()
            .map(|rollout| self::rollout(&record.environment, rollout)),
        model: record
            .model
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default(),
        model_version: record.model.as_ref().map_or(0, |m| m.version),
        promotion: record.promotion.as_ref().map(|p| pb::Promotion {
            by: p.by.clone(),
            at_ms: p.at_ms,
            from_release: p.from_release,
        }),
        datasets: Vec::new(),
        repo: String::new(),
        provenance_digest: String::new(),
    }
}

pub(crate) fn environment(record: &EnvironmentRecord) -> pb::Environment {
    pb::Environment {
        name: record.key.name.clone(),
        live_release: record.live.unwrap_or_default(),
        frozen: record.frozen.clone().unwrap_or_default(),
        pipeline: record.key.pipeline().to_owned(),
    }
}

pub(crate) fn artifact(stage: &str, record: &ArtifactRecord) -> pb::Artifact {
    pb::Artifact {
        path: record.path.clone(),
        digest: record.digest.clone(),
        size: record.size,
        stage: stage.to_owned(),
    }
}

pub(crate) fn log_entry(stage: &str, log: &StoredLog) -> pb::LogEntry {
    let stream = match log.line.stream {
        LogStream::Stdout => pb::LogStream::Stdout,
        LogStream::Stderr => pb::LogStream::Stderr,
        LogStream::System => pb::LogStream::System,
    };
    pb::LogEntry {
        stage: stage.to_owned(),
        attempt: log.attempt,
        seq: log.seq,
        line: Some(pb::LogLine {
            stream: stream as i32,
            text: log.line.text.clone(),
            at_ms: log.line.at_ms,
        }),
    }
}

pub(crate) fn run_state(state: RunState) -> pb::RunState {
    match state {
        RunState::Queued => pb::RunState::Queued,
        RunState::Running => pb::RunState::Running,
        RunState::Succeeded => pb::RunState::Succeeded,
        RunState::Failed => pb::RunState::Failed,
        RunState::Cancelled => pb::RunState::Cancelled,
    }
}

pub(crate) fn stage_state(state: StageState) -> pb::StageState {
    match state {
        StageState::Pending => pb::StageState::Pending,
        StageState::Ready => pb::StageState::Ready,
        StageState::Assigned => pb::StageState::Assigned,
        StageState::Running => pb::StageState::Running,
        StageState::Succeeded => pb::StageState::Succeeded,
        StageState::Failed => pb::StageState::Failed,
        StageState::TimedOut => pb::StageState::TimedOut,
        StageState::Cancelled => pb::StageState::Cancelled,
        StageState::Skipped => pb::StageState::Skipped,
        StageState::AwaitingApproval => pb::StageState::AwaitingApproval,
        StageState::RollingOut => pb::StageState::RollingOut,
    }
}

pub(crate) fn rollout(
    environment: &kiln_common::ids::EnvKey,
    record: &crate::store::RolloutRecord,
) -> pb::Rollout {
    use crate::store::{RolloutKind, RolloutOutcome, RolloutPhase};
    let (phase, analysis_until_ms) = match record.phase {
        RolloutPhase::Deploying => ("deploying", 0),
        RolloutPhase::Analysing { until_ms } => ("analysing", until_ms),
        RolloutPhase::Restoring => ("restoring", 0),
        RolloutPhase::Ended => ("ended", 0),
    };
    pb::Rollout {
        pipeline: environment.pipeline().to_owned(),
        environment: environment.name.clone(),
        kind: match record.kind {
            RolloutKind::Canary => "canary",
            RolloutKind::Shadow => "shadow",
        }
        .to_owned(),
        candidate: record.candidate,
        previous: record.previous,
        steps: record.steps.clone(),
        step: record.step as u32,
        weight: record.weight(),
        phase: phase.to_owned(),
        analysis_until_ms,
        outcome: match record.outcome {
            None => "",
            Some(RolloutOutcome::Promoted) => "promoted",
            Some(RolloutOutcome::Aborted) => "aborted",
            Some(RolloutOutcome::RestoreFailed) => "restore_failed",
        }
        .to_owned(),
        reason: record.reason.clone().unwrap_or_default(),
        started_ms: record.started_ms,
        finished_ms: record.finished_ms.unwrap_or_default(),
        rounds: record
            .rounds
            .iter()
            .map(|round| pb::AnalysisRound {
                step: round.step as u32,
                at_ms: round.at_ms,
                values: round
                    .values
                    .iter()
                    .filter_map(|(name, value)| Some((name.clone(), (*value)?)))
                    .collect(),
                missing: round
                    .values
                    .iter()
                    .filter(|(_, value)| value.is_none())
                    .map(|(name, _)| name.clone())
                    .collect(),
                error: round.error.clone().unwrap_or_default(),
                breached: round.breached,
            })
            .collect(),
        promote_requested: record.promote_requested,
    }
}
