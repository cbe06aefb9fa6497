//! Stored records as wire messages.

use kiln_common::ids::RunId;
use kiln_proto::v1 as pb;

use crate::error::ApiError;
use crate::store::{
    ArtifactRecord, LogStream, RunRecord, RunState, StageRecord, StageState, Store, StoredLog,
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
    }
}

pub(crate) fn run_state_name(state: RunState) -> &'static str {
    match state {
        RunState::Queued => "queued",
        RunState::Running => "running",
        RunState::Succeeded => "succeeded",
        RunState::Failed => "failed",
        RunState::Cancelled => "cancelled",
    }
}

pub(crate) fn stage_state_name(state: StageState) -> &'static str {
    match state {
        StageState::Pending => "pending",
        StageState::Ready => "ready",
        StageState::Assigned => "assigned",
        StageState::Running => "running",
        StageState::Succeeded => "succeeded",
        StageState::Failed => "failed",
        StageState::TimedOut => "timed out",
        StageState::Cancelled => "cancelled",
        StageState::Skipped => "skipped",
    }
}
