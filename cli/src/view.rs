//! What `kiln` shows, built once from the proto messages and used for both
//! the tables and `--output json`.
//!
//! The JSON field names are a contract with scripts and the end-to-end
//! tests: they are the Rust field names below, never renamed silently.
//! Conventions: enums are lowercase strings (`"succeeded"`, `"timed_out"`),
//! times are milliseconds since the Unix epoch, and a time that has not
//! happened yet is `null` (the protocol's 0).

use std::collections::BTreeMap;

use kiln_proto::v1 as pb;
use serde::Serialize;

/// State of a run. JSON: `"queued" | "running" | "succeeded" | "failed" |
/// "cancelled" | "unknown"` (`unknown` = a state this CLI does not know).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RunState {
    Unknown,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// State of a stage. JSON: `"pending" | "ready" | "assigned" | "running" |
/// "succeeded" | "failed" | "timed_out" | "cancelled" | "skipped" |
/// "unknown"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StageState {
    Unknown,
    Pending,
    Ready,
    Assigned,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Skipped,
    /// A manual gate that passed its checks, waiting for `kiln approve`.
    AwaitingApproval,
    /// An environment stage whose rollout (`strategy:`) is under way; the
    /// stages after it wait for its end.
    RollingOut,
}

/// A run (`kiln status`, `kiln runs`, `kiln run`, `cancel`, `retry`).
///
/// JSON: `{id, pipeline, pipeline_version, pipeline_digest, params,
/// variables, commit, rev, state, triggered_by, created_ms, finished_ms,
/// stages: [StageView], rollback}`; `rollback` is `{pipeline,
/// environment, from_release, to_release, reason, kind, step, steps,
/// weight, model, summary}` for a run the coordinator started to deploy a
/// release (`kind`: `rollback`, `rollout_step`, `rollout_restore`), else
/// `null`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct RunView {
    pub(crate) id: u64,
    pub(crate) pipeline: String,
    /// 0 for a run failed at once because its pipeline file at the
    /// commit could not be read or parsed.
    pub(crate) pipeline_version: u32,
    /// "sha256:<hex>" of the pipeline file read at the commit; "" for a
    /// run of a registered snapshot.
    pub(crate) pipeline_digest: String,
    /// The run's `params:` values, defaults filled in.
    pub(crate) params: std::collections::BTreeMap<String, String>,
    /// What started it: `KILN_EVENT`, `KILN_BRANCH`, `KILN_TAG`,
    /// `KILN_MR_ID` as its stages see them.
    pub(crate) variables: std::collections::BTreeMap<String, String>,
    /// Full commit id the run checked out ("" until resolved).
    pub(crate) commit: String,
    /// What was asked for: branch, tag, commit, or "" for the branch head.
    pub(crate) rev: String,
    pub(crate) state: RunState,
    pub(crate) triggered_by: String,
    pub(crate) created_ms: Option<u64>,
    pub(crate) finished_ms: Option<u64>,
    /// In pipeline order.
    pub(crate) stages: Vec<StageView>,
    pub(crate) rollback: Option<RollbackView>,
}

/// What a run the coordinator started deploys, in which environment of
/// which pipeline: a rollback, one step of a rollout, or the restore
/// after an aborted rollout (`kind`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct RollbackView {
    pub(crate) pipeline: String,
    pub(crate) environment: String,
    pub(crate) from_release: u64,
    pub(crate) to_release: u64,
    pub(crate) reason: String,
    /// `rollback`, `rollout_step` or `rollout_restore`.
    pub(crate) kind: String,
    /// A rollout step's number (1-based) of `steps` and its traffic
    /// percent; `null` for a rollback.
    pub(crate) step: Option<u32>,
    pub(crate) steps: Option<u32>,
    pub(crate) weight: Option<u32>,
    /// "caravan@4", when the release is a model version.
    pub(crate) model: Option<String>,
    /// The coordinator's one line: "rollout step 2/3 of caravan@4 …".
    pub(crate) summary: String,
}

/// One stage of a run.
///
/// JSON: `{idx, name, state, attempt, agent, started_ms, finished_ms,
/// exit_code, message, needs}`; `agent` is `null` until assigned,
/// `exit_code` is `null` until the stage finished.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct StageView {
    pub(crate) idx: u32,
    pub(crate) name: String,
    pub(crate) state: StageState,
    /// 1 for the first try; 0 before the first assignment.
    pub(crate) attempt: u32,
    pub(crate) agent: Option<String>,
    pub(crate) started_ms: Option<u64>,
    pub(crate) finished_ms: Option<u64>,
    pub(crate) exit_code: Option<i32>,
    /// Why it ended the way it did ("agent lost", "timed out after 5s").
    pub(crate) message: String,
    pub(crate) needs: Vec<String>,
    /// Parsed by the coordinator from the stage's metrics file (NaN = null).
    pub(crate) metrics: BTreeMap<String, f64>,
    /// A gate's decision and the values that decided it.
    pub(crate) gate: Option<GateView>,
}

/// A gate's decision. JSON: `{passed, summary, decided_by, checks: [{metric,
/// rule, value, champion, passed, decided_by_on_missing}]}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct GateView {
    pub(crate) passed: bool,
    pub(crate) summary: String,
    pub(crate) decided_by: Option<String>,
    pub(crate) checks: Vec<GateCheckView>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct GateCheckView {
    pub(crate) metric: String,
    pub(crate) rule: String,
    pub(crate) value: Option<f64>,
    pub(crate) champion: Option<f64>,
    pub(crate) passed: bool,
    pub(crate) decided_by_on_missing: Option<String>,
}

impl From<pb::GateDecision> for GateView {
    fn from(gate: pb::GateDecision) -> Self {
        GateView {
            passed: gate.passed,
            summary: gate.summary,
            decided_by: (!gate.decided_by.is_empty()).then_some(gate.decided_by),
            checks: gate
                .checks
                .into_iter()
                .map(|check| GateCheckView {
                    metric: check.metric,
                    rule: check.rule,
                    value: check.value,
                    champion: check.champion,
                    passed: check.passed,
                    decided_by_on_missing: (!check.decided_by_on_missing.is_empty())
                        .then_some(check.decided_by_on_missing),
                })
                .collect(),
        }
    }
}

/// A registered pipeline version (`kiln pipeline list|show|register`).
///
/// JSON: `{name, version, repo, branch, subdir, path, digest, repository,
/// stages, registered_ms, spec_yaml}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct PipelineView {
    pub(crate) name: String,
    pub(crate) version: u32,
    pub(crate) repo: String,
    pub(crate) branch: String,
    /// Directory of kiln.yml inside the repository, "" for the root.
    pub(crate) subdir: String,
    /// The pipeline file inside the repository when runs read it at their
    /// commit; "" for a registered snapshot.
    pub(crate) path: String,
    /// "sha256:<hex>" of the file's text.
    pub(crate) digest: String,
    /// The repository's name (`kiln repo add --name`).
    pub(crate) repository: String,
    /// Stage names in file order.
    pub(crate) stages: Vec<String>,
    pub(crate) registered_ms: Option<u64>,
    pub(crate) spec_yaml: String,
}

/// The answer to `kiln pipeline register`. JSON: `{created, pipeline}`;
/// `created` is false when kiln.yml was unchanged.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct RegisteredView {
    pub(crate) created: bool,
    pub(crate) pipeline: PipelineView,
}

/// An agent (`kiln agents`, `kiln agent drain`).
///
/// JSON: `{name, state, running, capacity, labels, version, last_seen_ms}`
/// with `state` one of `"connected" | "disconnected" | "draining"`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct AgentView {
    pub(crate) name: String,
    pub(crate) state: AgentState,
    /// Stages running on it now.
    pub(crate) running: u32,
    /// Stages it runs at once.
    pub(crate) capacity: u32,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) version: String,
    pub(crate) last_seen_ms: Option<u64>,
    /// What the agent's machine declared (0 CPUs or memory: not declared).
    pub(crate) resources: ResourcesView,
    /// What the stages running on it reserve of that.
    pub(crate) in_use: ResourcesView,
}

/// CPUs, memory and GPU devices of an agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(crate) struct ResourcesView {
    pub(crate) cpus: f64,
    pub(crate) memory_bytes: u64,
    pub(crate) gpus: Vec<u32>,
}

impl From<Option<pb::Resources>> for ResourcesView {
    fn from(resources: Option<pb::Resources>) -> Self {
        let resources = resources.unwrap_or_default();
        ResourcesView {
            cpus: resources.cpus,
            memory_bytes: resources.memory_bytes,
            gpus: resources.gpus,
        }
    }
}

/// Whether an agent takes work. A draining agent that lost its
/// connection is `disconnected`: it runs nothing either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AgentState {
    Connected,
    Disconnected,
    Draining,
}

/// One log line (`kiln logs --output json`, one object per line).
///
/// JSON: `{stage, attempt, seq, stream, text, at_ms}` with `stream` one of
/// `"stdout" | "stderr" | "system"` (`system` = written by Kiln itself).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct LogLineView {
    pub(crate) stage: String,
    pub(crate) attempt: u32,
    /// Position within the attempt, from 0.
    pub(crate) seq: u64,
    pub(crate) stream: LogStream,
    pub(crate) text: String,
    pub(crate) at_ms: Option<u64>,
}

/// Where a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LogStream {
    Stdout,
    Stderr,
    System,
}

/// The protocol's "0 = not yet".
fn when(ms: u64) -> Option<u64> {
    (ms != 0).then_some(ms)
}

impl RunState {
    pub(crate) fn is_finished(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled
        )
    }

    /// The JSON spelling, also used in tables.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RunState::Unknown => "unknown",
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
        }
    }
}

impl StageState {
    /// True once the stage will not change unless someone retries it.
    pub(crate) fn is_finished(self) -> bool {
        matches!(
            self,
            StageState::Succeeded
                | StageState::Failed
                | StageState::TimedOut
                | StageState::Cancelled
                | StageState::Skipped
        )
    }

    /// The JSON spelling, also used in tables.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StageState::Unknown => "unknown",
            StageState::Pending => "pending",
            StageState::Ready => "ready",
            StageState::Assigned => "assigned",
            StageState::Running => "running",
            StageState::Succeeded => "succeeded",
            StageState::Failed => "failed",
            StageState::TimedOut => "timed_out",
            StageState::Cancelled => "cancelled",
            StageState::Skipped => "skipped",
            StageState::AwaitingApproval => "awaiting_approval",
            StageState::RollingOut => "rolling_out",
        }
    }
}

impl AgentState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AgentState::Connected => "connected",
            AgentState::Disconnected => "disconnected",
            AgentState::Draining => "draining",
        }
    }
}

impl From<pb::RunState> for RunState {
    fn from(state: pb::RunState) -> Self {
        match state {
            pb::RunState::Unspecified => RunState::Unknown,
            pb::RunState::Queued => RunState::Queued,
            pb::RunState::Running => RunState::Running,
            pb::RunState::Succeeded => RunState::Succeeded,
            pb::RunState::Failed => RunState::Failed,
            pb::RunState::Cancelled => RunState::Cancelled,
        }
    }
}

impl From<pb::StageState> for StageState {
    fn from(state: pb::StageState) -> Self {
        match state {
            pb::StageState::Unspecified => StageState::Unknown,
            pb::StageState::Pending => StageState::Pending,
            pb::StageState::Ready => StageState::Ready,
            pb::StageState::Assigned => StageState::Assigned,
            pb::StageState::Running => StageState::Running,
            pb::StageState::Succeeded => StageState::Succeeded,
            pb::StageState::Failed => StageState::Failed,
            pb::StageState::TimedOut => StageState::TimedOut,
            pb::StageState::Cancelled => StageState::Cancelled,
            pb::StageState::Skipped => StageState::Skipped,
            pb::StageState::AwaitingApproval => StageState::AwaitingApproval,
            pb::StageState::RollingOut => StageState::RollingOut,
        }
    }
}

impl From<pb::Run> for RunView {
    fn from(run: pb::Run) -> Self {
        RunView {
            id: run.id,
            state: run.state().into(),
            pipeline: run.pipeline,
            pipeline_version: run.pipeline_version,
            pipeline_digest: run.pipeline_digest,
            params: run.params.into_iter().collect(),
            variables: run.variables.into_iter().collect(),
            commit: run.commit,
            rev: run.rev,
            triggered_by: run.triggered_by,
            created_ms: when(run.created_ms),
            finished_ms: when(run.finished_ms),
            stages: run.stages.into_iter().map(StageView::from).collect(),
            rollback: run.rollback.map(RollbackView::from),
        }
    }
}

impl From<pb::RollbackPlan> for RollbackView {
    fn from(plan: pb::RollbackPlan) -> Self {
        // A coordinator from before `kind` was sent made only rollbacks.
        let rollout = plan.kind.starts_with("rollout");
        RollbackView {
            pipeline: plan.pipeline,
            environment: plan.environment,
            from_release: plan.from_release,
            to_release: plan.to_release,
            reason: plan.reason,
            kind: if rollout {
                plan.kind
            } else {
                "rollback".into()
            },
            step: rollout.then_some(plan.step),
            steps: (rollout && plan.steps > 0).then_some(plan.steps),
            weight: rollout.then_some(plan.weight),
            model: (!plan.model.is_empty()).then_some(plan.model),
            summary: plan.summary,
        }
    }
}

impl From<pb::Stage> for StageView {
    fn from(stage: pb::Stage) -> Self {
        let state: StageState = stage.state().into();
        // The protocol's exit code is 0 both for "exited 0" and "has not
        // exited"; only a stage that ran to an end has a real one.
        let exited = stage.finished_ms != 0 && stage.started_ms != 0;
        StageView {
            idx: stage.idx,
            name: stage.name,
            state,
            attempt: stage.attempt,
            agent: (!stage.agent.is_empty()).then_some(stage.agent),
            started_ms: when(stage.started_ms),
            finished_ms: when(stage.finished_ms),
            exit_code: (exited && state.is_finished()).then_some(stage.exit_code),
            message: stage.message,
            needs: stage.needs,
            metrics: stage.metrics.into_iter().collect(),
            gate: stage.gate.map(GateView::from),
        }
    }
}

impl From<pb::Pipeline> for PipelineView {
    fn from(pipeline: pb::Pipeline) -> Self {
        PipelineView {
            name: pipeline.name,
            version: pipeline.version,
            repo: pipeline.repo,
            branch: pipeline.branch,
            subdir: pipeline.subdir,
            path: pipeline.path,
            digest: pipeline.digest,
            repository: pipeline.repository,
            stages: pipeline.stages,
            registered_ms: when(pipeline.registered_ms),
            spec_yaml: pipeline.spec_yaml,
        }
    }
}

impl From<pb::Agent> for AgentView {
    fn from(agent: pb::Agent) -> Self {
        let state = match (agent.connected, agent.draining) {
            (false, _) => AgentState::Disconnected,
            (true, true) => AgentState::Draining,
            (true, false) => AgentState::Connected,
        };
        AgentView {
            name: agent.name,
            state,
            running: agent.running,
            capacity: agent.capacity,
            labels: agent.labels.into_iter().collect(),
            version: agent.version,
            last_seen_ms: when(agent.last_seen_ms),
            resources: agent.resources.into(),
            in_use: agent.reserved.into(),
        }
    }
}

impl From<pb::LogEntry> for LogLineView {
    fn from(entry: pb::LogEntry) -> Self {
        let line = entry.line.unwrap_or_default();
        let stream = match line.stream() {
            pb::LogStream::Stderr => LogStream::Stderr,
            pb::LogStream::System => LogStream::System,
            // Unspecified is treated as ordinary output rather than dropped.
            pb::LogStream::Stdout | pb::LogStream::Unspecified => LogStream::Stdout,
        };
        LogLineView {
            stage: entry.stage,
            attempt: entry.attempt,
            seq: entry.seq,
            stream,
            text: line.text,
            at_ms: when(line.at_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(name: &str, state: pb::StageState) -> pb::Stage {
        pb::Stage {
            name: name.to_owned(),
            state: state.into(),
            ..Default::default()
        }
    }

    #[test]
    fn run_json_uses_lowercase_states_and_null_for_not_yet() {
        let mut done = stage("train", pb::StageState::TimedOut);
        (
            done.started_ms,
            done.finished_ms,
            done.exit_code,
            done.agent,
        ) = (10, 20, 137, "agent-1".to_owned());
        let run = pb::Run {
            id: 7,
            pipeline: "hello".to_owned(),
            state: pb::RunState::Running.into(),
            created_ms: 5,
            stages: vec![done, stage("evaluate", pb::StageState::Pending)],
            ..Default::default()
        };
        let json = serde_json::to_value(RunView::from(run)).unwrap();
        assert_eq!(json["state"], "running");
        assert_eq!(json["created_ms"], 5);
        assert!(json["finished_ms"].is_null());
        assert_eq!(json["stages"][0]["state"], "timed_out");
        assert_eq!(json["stages"][0]["exit_code"], 137);
        assert_eq!(json["stages"][0]["agent"], "agent-1");
        assert!(json["stages"][1]["exit_code"].is_null());
        assert!(json["stages"][1]["agent"].is_null());
    }

    #[test]
    fn unknown_enum_values_do_not_fail_the_conversion() {
        let run = pb::Run {
            state: 42,
            ..Default::default()
        };
        assert_eq!(RunView::from(run).state, RunState::Unknown);
    }

    #[test]
    fn agent_state_prefers_disconnected_over_draining() {
        let agent = |connected, draining| {
            AgentView::from(pb::Agent {
                connected,
                draining,
                ..Default::default()
            })
            .state
        };
        assert_eq!(agent(true, false), AgentState::Connected);
        assert_eq!(agent(true, true), AgentState::Draining);
        assert_eq!(agent(false, true), AgentState::Disconnected);
        assert_eq!(
            serde_json::to_value(AgentState::Draining).unwrap(),
            AgentState::Draining.as_str()
        );
    }

    #[test]
    fn every_state_serializes_as_its_table_spelling() {
        for state in [
            StageState::TimedOut,
            StageState::Skipped,
            StageState::Assigned,
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        for state in [RunState::Queued, RunState::Cancelled, RunState::Unknown] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
    }

    #[test]
    fn log_lines_name_their_stream() {
        let entry = pb::LogEntry {
            stage: "build".to_owned(),
            attempt: 1,
            seq: 3,
            line: Some(pb::LogLine {
                stream: pb::LogStream::System.into(),
                text: "checked out abc".to_owned(),
                at_ms: 9,
            }),
        };
        let json = serde_json::to_value(LogLineView::from(entry)).unwrap();
        assert_eq!(json["stream"], "system");
        assert_eq!(json["seq"], 3);
    }
}
