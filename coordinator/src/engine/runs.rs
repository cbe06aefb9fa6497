//! Runs and their DAG: creation, stage transitions, completion, cancel and
//! retry.
//!
//! **Architecture Invariant:** a stage reaches a terminal state at most once
//! per attempt; only a new attempt (re-dispatch or manual retry) can leave
//! it, and that attempt number fences off whoever held the old one.

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_common::ids::{RunId, StageKey};
use kiln_common::spec;
use kiln_proto::v1 as pb;
use tokio::sync::watch;

use super::delivery::RollbackStart;
use super::{ActiveRun, Engine, PipelineSpec, Reply};
use crate::error::ApiError;
use crate::store::{
    DatasetRecord, Op, PipelineRecord, RunRecord, RunState, StageArtifact, StageRecord, StageState,
};
use crate::views;

/// What a new run builds: a commit (or an uploaded snapshot) and the
/// pipeline file it was read from.
pub(super) struct RunSource {
    pub(super) commit: String,
    /// What was asked for (branch, tag, commit).
    pub(super) rev: String,
    pub(super) source_digest: Option<String>,
    /// "sha256:<hex>" of the file read at `commit`; "" for a snapshot.
    pub(super) pipeline_digest: String,
    /// Parameter values (checked, defaults filled in) and trigger
    /// variables; see [`RunRecord`].
    pub(super) params: BTreeMap<String, String>,
    pub(super) variables: BTreeMap<String, String>,
    /// Paths the commit changed since the branch's previous build, for
    /// `changes:`; `None`: everything.
    pub(super) changed: Option<Vec<String>>,
}

/// A run as the run book lends it to others (delivery), read-only.
pub(super) struct RunView<'a> {
    pub(super) record: &'a RunRecord,
    pub(super) stages: &'a [StageRecord],
    pub(super) spec: &'a spec::Pipeline,
}

impl RunView<'_> {
    /// Every metric of the run so far; later stages win on a name clash.
    /// The stages a best-of gate did not pick do not count. A promote run
    /// has the metrics of the version it deploys.
    pub(super) fn metrics(&self) -> BTreeMap<String, Option<f64>> {
        if let Some(plan) = &self.record.promote {
            return plan.metrics.clone();
        }
        crate::models::run_metrics(self.stages)
    }

    /// [`RunView::metrics`], leaving out the stages named in `left_out`.
    pub(super) fn metrics_without(&self, left_out: &[&str]) -> BTreeMap<String, Option<f64>> {
        let mut metrics = BTreeMap::new();
        for stage in self.stages {
            if !left_out.contains(&stage.name.as_str()) {
                metrics.extend(stage.metrics.clone());
            }
        }
        metrics
    }

    /// Artifacts stage `idx` gets: the outputs of the stages it needs, or
    /// a rollback or promote plan's fixed artifacts.
    pub(super) fn inputs_of(&self, idx: usize) -> Vec<StageArtifact> {
        if let Some(plan) = &self.record.rollback {
            return plan.inputs.clone();
        }
        if let Some(plan) = &self.record.promote {
            return plan.inputs.clone();
        }
        self.spec.stages[idx]
            .needs
            .iter()
            .flat_map(|&need| {
                // After a best-of gate: the winner's artifacts.
                let winner = self.stages[need]
                    .gate
                    .as_ref()
                    .and_then(|gate| gate.selection.as_ref()?.winner.as_deref())
                    .and_then(|name| self.stages.iter().find(|stage| stage.name == name));
                let stage = winner.unwrap_or(&self.stages[need]);
                stage.outputs.iter().map(|artifact| StageArtifact {
                    stage: stage.name.clone(),
                    artifact: artifact.clone(),
                })
            })
            .collect()
    }
}

impl ActiveRun {
    pub(super) fn view(&self) -> RunView<'_> {
        RunView {
            record: &self.record,
            stages: &self.stages,
            spec: &self.spec.parsed,
        }
    }
}

impl RunRecord {
    /// The environment a stage of this run gets besides Kiln's own
    /// per-attempt variables (the agent adds those): the stage's `env:`
    /// (the pipeline's under it), the run's parameters, and what started
    /// the run.
    pub(super) fn stage_env(
        &self,
        stage: &spec::Stage,
    ) -> std::collections::HashMap<String, String> {
        let mut env: std::collections::HashMap<String, String> =
            stage.env.clone().into_iter().collect();
        env.extend(self.params.clone());
        env.extend(self.variables.clone());
        env
    }
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
            gpus: Vec::new(),
            settled: false,
        }
    }
}

impl Engine {
    pub(super) fn trigger(
        &mut self,
        pipeline: &PipelineRecord,
        version: u32,
        source: RunSource,
        triggered_by: String,
        datasets: Vec<DatasetRecord>,
    ) -> Result<RunId, ApiError> {
        let spec = self.spec(&pipeline.name, version)?;
        let id = RunId(self.next_run_id);
        self.next_run_id += 1;
        let record = RunRecord {
            id,
            pipeline: pipeline.name.clone(),
            pipeline_version: version,
            commit: source.commit,
            rev: source.rev,
            state: RunState::Queued,
            triggered_by,
            created_ms: self.clock.now_ms(),
            finished_ms: None,
            source_digest: source.source_digest,
            rollback: None,
            datasets,
            pipeline_digest: source.pipeline_digest,
            params: source.params,
            variables: source.variables,
            promote: None,
            group: None,
            waiting: false,
        };
        let stages: Vec<StageRecord> = spec
            .parsed
            .stages
            .iter()
            .enumerate()
            .map(|(idx, stage)| {
                let needs = stage
                    .needs
                    .iter()
                    .map(|&need| spec.parsed.stages[need].name.clone())
                    .collect();
                StageRecord::new(
                    StageKey {
                        run: id,
                        idx: idx as u32,
                    },
                    &stage.name,
                    needs,
                )
            })
            .collect();
        tracing::info!(run = %id, pipeline = %record.pipeline, commit = %record.commit, "run triggered");
        self.insert_new_run(record, stages, spec);
        self.start_new_run(id, source.changed);
        Ok(id)
    }

    /// Holds a run just created and queues its record and every stage's
    /// for the next commit.
    pub(super) fn insert_new_run(
        &mut self,
        record: RunRecord,
        stages: Vec<StageRecord>,
        spec: Arc<PipelineSpec>,
    ) {
        let id = record.id;
        let keys: Vec<StageKey> = stages.iter().map(|stage| stage.key).collect();
        self.runs.insert(id, ActiveRun::new(record, stages, spec));
        self.save_run(id);
        for key in keys {
            self.save_stage(key);
        }
    }

    /// Puts a run loaded from the store back to work after a restart.
    pub(super) fn resume_run(
        &mut self,
        record: RunRecord,
        stages: Vec<StageRecord>,
        spec: Arc<PipelineSpec>,
    ) {
        let id = record.id;
        let now = self.clock.now_ms();
        let mut held = Vec::new();
        for stage in &stages {
            match stage.state {
                StageState::Ready => self.ready.push_back(stage.key),
                state if state.is_held() => {
                    if let Some(agent) = &stage.agent {
                        held.push((agent.clone(), stage.key));
                    }
                }
                _ => {}
            }
        }
        self.runs.insert(id, ActiveRun::new(record, stages, spec));
        // Only now: the pool books each attempt by the stage's own record
        // (attempt number and reservation), which must be in place. Booked
        // before, the attempt was 0, so an agent that never came back after
        // a restart had its lease expire on an attempt no stage had, and
        // its stages stayed running for ever.
        for (agent, key) in held {
            self.expect_agent(&agent, key, now);
        }
        self.publish_to_readers(id);
        self.finish_run_if_done(id);
    }

    pub(super) fn stage(&self, key: StageKey) -> Option<&StageRecord> {
        self.runs.get(&key.run)?.stages.get(key.idx as usize)
    }

    pub(super) fn stage_mut(&mut self, key: StageKey) -> Option<&mut StageRecord> {
        self.runs
            .get_mut(&key.run)?
            .stages
            .get_mut(key.idx as usize)
    }

    /// Marks the stage's record for writing, and its run for a snapshot
    /// push, at the end of the burst: a stage that changes several times in
    /// one burst is encoded and written once.
    pub(super) fn save_stage(&mut self, key: StageKey) {
        self.dirty.stages.insert(key);
        self.dirty.watched.insert(key.run);
    }

    pub(super) fn save_run(&mut self, run: RunId) {
        self.dirty.runs.insert(run);
        self.dirty.watched.insert(run);
    }

    /// Queues the writes and snapshots of everything marked dirty (of one
    /// run, or of all).
    pub(super) fn write_dirty(&mut self, only: Option<RunId>) {
        let wanted = |run: RunId| only.is_none_or(|only| only == run);
        let stages = drain_matching(&mut self.dirty.stages, |key| wanted(key.run));
        for key in stages {
            if let Some(stage) = self.stage(key).cloned() {
                self.write(Op::Stage(stage));
            }
        }
        let runs = drain_matching(&mut self.dirty.runs, |&run| wanted(run));
        for run in runs {
            if let Some(record) = self.runs.get(&run).map(|active| active.record.clone()) {
                let last = self.view_update.last_run.get_or_insert(run);
                *last = (*last).max(run);
                self.write(Op::Run(record));
            }
        }
        let watched = drain_matching(&mut self.dirty.watched, |&run| wanted(run));
        for run in watched {
            self.publish(run);
            self.publish_to_readers(run);
        }
    }

    /// What readers see of a run once this commit is durable: its snapshot
    /// and where each stage's durable log ends.
    fn publish_to_readers(&mut self, run: RunId) {
        let Some(active) = self.runs.get(&run) else {
            return;
        };
        let snapshot = Arc::new(views::run(&active.record, &active.stages));
        let marks = active.stages.iter().map(|stage| {
            let mark = crate::read::LogMark {
                attempt: stage.attempt,
                next_seq: stage.next_log_seq,
            };
            (stage.key, mark)
        });
        self.view_update.marks.extend(marks);
        self.view_update.runs.push(snapshot);
    }

    /// The one way a stage's state changes. A move the state machine does
    /// not allow is a bug: it is logged loudly and refused, never applied.
    pub(super) fn move_stage(&mut self, key: StageKey, to: StageState) -> bool {
        let Some(stage) = self.stage_mut(key) else {
            return false;
        };
        if !stage.state.can_become(to) {
            tracing::error!(
                stage = %key,
                name = %stage.name,
                from = stage.state.name(),
                to = to.name(),
                "illegal stage transition refused; this is a bug in the coordinator"
            );
            return false;
        }
        stage.state = to;
        self.save_stage(key);
        true
    }

    pub(super) fn make_ready(&mut self, key: StageKey) {
        if self.deploy_needs_guard(key) {
            return;
        }
        if self.move_stage(key, StageState::Ready) {
            self.ready.push_back(key);
            self.ready_since.insert(key, std::time::Instant::now());
        }
    }

    /// Ends the current attempt of a stage in a terminal state and moves the
    /// DAG on: dependents become ready or are skipped, and the run finishes
    /// when nothing is left.
    pub(super) fn settle_stage(
        &mut self,
        key: StageKey,
        state: StageState,
        exit_code: Option<i32>,
        message: String,
    ) {
        let deployed = state == StageState::Succeeded
            && self
                .stage_spec(key)
                .is_some_and(|stage| stage.environment.is_some());
        if deployed && self.hold_for_rollout(key, exit_code) {
            self.delivery_events
                .push(super::delivery::DeliveryEvent::Deployed(key));
            return;
        }
        if !self.end_attempt(key, state, exit_code, message) {
            return;
        }
        if deployed {
            self.delivery_events
                .push(super::delivery::DeliveryEvent::Deployed(key));
        }
        self.move_on(key);
    }

    /// The rollout a `rolling_out` stage waited for ended: promoted, the
    /// stage succeeds and the stages after it run; aborted, it fails with
    /// the abort's reason and they are skipped.
    pub(super) fn end_rollout_stage(&mut self, key: StageKey, promoted: bool, message: String) {
        if !self
            .stage(key)
            .is_some_and(|stage| stage.state == StageState::RollingOut)
        {
            return;
        }
        let exit_code = self.stage(key).and_then(|stage| stage.exit_code);
        let state = if promoted {
            StageState::Succeeded
        } else {
            StageState::Failed
        };
        if self.end_attempt(key, state, exit_code, message) {
            self.move_on(key);
        }
    }

    /// Moves the DAG on after stage `key` ended: dependents become ready
    /// or are skipped, and the run finishes when nothing is left.
    fn move_on(&mut self, key: StageKey) {
        let Some(spec) = self.runs.get(&key.run).map(|run| run.spec.clone()) else {
            return;
        };
        let passed = self.stage(key).is_some_and(|stage| passes(stage, &spec));
        // A promote run's left-out stages stand for outputs it already has.
        let outside = self.outside_promote(key.run);
        if passed {
            for &dependent in &spec.dependents[key.idx as usize] {
                let all_done = spec.parsed.stages[dependent].needs.iter().all(|&need| {
                    outside.contains(&need)
                        || self
                            .stage(StageKey {
                                run: key.run,
                                idx: need as u32,
                            })
                            .is_some_and(|stage| passes(stage, &spec))
                });
                let dependent_key = StageKey {
                    run: key.run,
                    idx: dependent as u32,
                };
                let pending = self
                    .stage(dependent_key)
                    .is_some_and(|stage| stage.state == StageState::Pending);
                // A need that ended without success (possible after a manual
                // retry of one of several needs) means the dependent can
                // never run: skip it rather than leave it pending forever.
                let blocked_by = spec.parsed.stages[dependent]
                    .needs
                    .iter()
                    .filter(|need| !outside.contains(need))
                    .find_map(|&need| {
                        let need = self.stage(StageKey {
                            run: key.run,
                            idx: need as u32,
                        })?;
                        (need.state.is_finished() && !passes(need, &spec))
                            .then(|| need.name.clone())
                    });
                if all_done && pending {
                    self.make_ready(dependent_key);
                } else if let (true, Some(blocker)) = (pending, blocked_by) {
                    self.skip(dependent_key, &blocker);
                    self.skip_dependents(dependent_key, &spec, &blocker);
                }
            }
        } else {
            let name = self
                .stage(key)
                .map(|stage| stage.name.clone())
                .unwrap_or_default();
            self.skip_dependents(key, &spec, &name);
        }
        self.finish_run_if_done(key.run);
    }

    /// Ends a stage's current attempt in a finished state (without moving
    /// the DAG on); false if the state machine refused.
    pub(super) fn end_attempt(
        &mut self,
        key: StageKey,
        state: StageState,
        exit_code: Option<i32>,
        message: String,
    ) -> bool {
        let now = self.clock.now_ms();
        if !state.is_finished() || !self.move_stage(key, state) {
            return false;
        }
        let allowed = matches!(state, StageState::Failed | StageState::TimedOut)
            && self
                .stage_spec(key)
                .is_some_and(|stage| stage.allow_failure);
        let Some(stage) = self.stage_mut(key) else {
            return false;
        };
        stage.exit_code = exit_code;
        stage.message = if allowed {
            format!("{message} (allowed to fail)")
        } else {
            message
        };
        stage.finished_ms = Some(now);
        tracing::debug!(stage = %key, name = %stage.name, ?state, "stage settled");
        let ran = stage
            .started_ms
            .map(|started| std::time::Duration::from_millis(now.saturating_sub(started)));
        let pipeline = self
            .runs
            .get(&key.run)
            .map_or("", |run| run.record.pipeline.as_str());
        self.metrics.stage_finished(pipeline, state, ran);
        self.end_followers(key);
        true
    }

    fn skip_dependents(&mut self, key: StageKey, spec: &PipelineSpec, failed: &str) {
        let reason = format!("`{failed}` did not succeed");
        self.skip_waiting_dependents(key, spec, &reason, false);
    }

    /// Skips every stage still waiting on `key`, transitively, for
    /// `reason`; `settled`: for good ([`StageRecord::settled`]).
    fn skip_waiting_dependents(
        &mut self,
        key: StageKey,
        spec: &PipelineSpec,
        reason: &str,
        settled: bool,
    ) {
        let mut todo = spec.dependents[key.idx as usize].clone();
        while let Some(idx) = todo.pop() {
            let dependent = StageKey {
                run: key.run,
                idx: idx as u32,
            };
            let waiting = self.stage(dependent).is_some_and(|stage| {
                matches!(stage.state, StageState::Pending | StageState::Ready)
            });
            let skipped = waiting
                && if settled {
                    self.skip_settled(dependent, reason.to_owned())
                } else {
                    self.skip_because(dependent, reason.to_owned())
                };
            if skipped {
                todo.extend(spec.dependents[idx].iter().copied());
            }
        }
    }

    fn skip(&mut self, key: StageKey, blocker: &str) -> bool {
        self.skip_because(key, format!("`{blocker}` did not succeed"))
    }

    /// Skips a waiting stage; `reason` follows "skipped: " in its message
    /// and in the one line of its log.
    pub(super) fn skip_because(&mut self, key: StageKey, reason: String) -> bool {
        if !self.move_stage(key, StageState::Skipped) {
            return false;
        }
        let now = self.clock.now_ms();
        let text = format!("skipped: {reason}");
        let Some(stage) = self.stage_mut(key) else {
            return true;
        };
        stage.message = text.clone();
        stage.finished_ms = Some(now);
        let (attempt, seq) = (stage.attempt, stage.next_log_seq);
        stage.next_log_seq += 1;
        stage.log_bytes += text.len() as u64;
        self.write(Op::Log(crate::store::StoredLog {
            key,
            attempt,
            seq,
            line: crate::store::LogLine {
                stream: crate::store::LogStream::System,
                text,
                at_ms: now,
            },
        }));
        true
    }

    /// Skips a waiting stage for good ([`StageRecord::settled`]): by its
    /// condition, the deploy guard, or a stage it needs skipped so.
    pub(super) fn skip_settled(&mut self, key: StageKey, reason: String) -> bool {
        if !self.skip_because(key, reason) {
            return false;
        }
        if let Some(stage) = self.stage_mut(key) {
            stage.settled = true;
        }
        true
    }

    /// Skips what waits on `key`, a stage that was itself skipped (by its
    /// condition or the deploy guard): a stage that needs a skipped stage
    /// is skipped too, for good.
    pub(super) fn skip_dependents_of_skipped(
        &mut self,
        key: StageKey,
        spec: &PipelineSpec,
        name: &str,
    ) {
        let reason = format!("needs `{name}`, which was skipped");
        self.skip_waiting_dependents(key, spec, &reason, true);
    }

    /// Re-queues a stage whose attempt ended without success, as a new
    /// attempt, when its `retries` allow it for `cause`; otherwise ends it
    /// (failed, or timed out). `cause: None` is a hand-back: always
    /// re-queued, and free.
    pub(super) fn requeue(
        &mut self,
        key: StageKey,
        cause: Option<Cause>,
        exit_code: Option<i32>,
        why: &str,
    ) {
        let Some(spec) = self.runs.get(&key.run).map(|run| run.spec.clone()) else {
            return;
        };
        let stage_spec = &spec.parsed.stages[key.idx as usize];
        let Some(stage) = self.stage(key) else {
            return;
        };
        if !stage.state.is_held() {
            return;
        }
        if let Some(cause) = cause {
            let final_state = cause.final_state();
            if !cause.earns_retry(&stage_spec.retry_when) {
                self.settle_stage(key, final_state, exit_code, why.to_owned());
                return;
            }
            if stage.retries_used >= stage_spec.retries {
                let message = format!("{why} (attempt {}, no retries left)", stage.attempt);
                self.settle_stage(key, final_state, exit_code, message);
                return;
            }
        }
        let message = format!("{why}; re-queued as attempt {}", stage.attempt + 1);
        tracing::warn!(stage = %key, attempt = stage.attempt + 1, "{why}; re-queued");
        self.new_attempt(key, StageState::Ready, cause.is_some(), false, &message);
    }

    /// The run's own `timeout:` passed: what still runs is stopped, what
    /// waits is cancelled, and the run fails.
    pub(super) fn expire_runs(&mut self) {
        let now = self.clock.now_ms();
        let due: Vec<(RunId, std::time::Duration)> = self
            .runs
            .values()
            .filter_map(|run| {
                let limit = run.spec.parsed.timeout?;
                let deadline = run
                    .record
                    .created_ms
                    .saturating_add(limit.as_millis() as u64);
                (!run.record.state.is_finished() && now >= deadline)
                    .then_some((run.record.id, limit))
            })
            .collect();
        for (run, limit) in due {
            let why = format!(
                "the run's timeout of {} passed",
                kiln_common::duration::format(limit)
            );
            tracing::warn!(run = %run, "{why}; stopping it");
            self.stop_run(run, RunState::Failed, StageState::TimedOut, &why, &why);
        }
    }

    /// The one way a stage starts over: a new attempt (which fences off
    /// whoever held the old one) with a clean log, in state `to`.
    /// `charge` counts it against `retries`; `fresh` (a manual retry) also
    /// forgets retries used and what the old attempt produced.
    fn new_attempt(
        &mut self,
        key: StageKey,
        to: StageState,
        charge: bool,
        fresh: bool,
        message: &str,
    ) -> bool {
        let allowed = self
            .stage(key)
            .is_some_and(|stage| stage.state.can_become(to));
        if !allowed {
            // Let the transition function log the refusal.
            return self.move_stage(key, to);
        }
        if let Some(stage) = self.stage_mut(key) {
            stage.attempt += 1;
            stage.retries_used = if fresh {
                0
            } else {
                stage.retries_used + u32::from(charge)
            };
            if fresh {
                stage.outputs.clear();
                stage.finished_ms = None;
                stage.exit_code = None;
            }
            stage.agent = None;
            stage.started_ms = None;
            stage.next_log_seq = 0;
            stage.log_bytes = 0;
            stage.log_truncated = false;
            stage.message = message.to_owned();
        }
        if to == StageState::Ready {
            self.make_ready(key);
            true
        } else {
            self.move_stage(key, to)
        }
    }

    pub(super) fn finish_run_if_done(&mut self, run: RunId) {
        let now = self.clock.now_ms();
        let Some(active) = self.runs.get_mut(&run) else {
            return;
        };
        if !active.stages.iter().all(|stage| stage.state.is_finished()) {
            return;
        }
        if !active.record.state.is_finished() {
            let failed = active.stages.iter().any(|stage| {
                matches!(stage.state, StageState::Failed | StageState::TimedOut)
                    && !passes(stage, &active.spec)
            });
            let cancelled = active
                .stages
                .iter()
                .any(|stage| stage.state == StageState::Cancelled);
            active.record.state = if failed {
                RunState::Failed
            } else if cancelled {
                RunState::Cancelled
            } else {
                RunState::Succeeded
            };
        }
        active.record.finished_ms.get_or_insert(now);
        tracing::info!(run = %run, state = ?active.record.state, "run finished");
        if let Some(plan) = active.record.rollback.clone()
            && active.record.state != RunState::Succeeded
        {
            self.delivery_events
                .push(super::delivery::DeliveryEvent::RollbackFailed(plan));
        }
        let Some(active) = self.runs.get(&run) else {
            return;
        };
        self.metrics.run_finished(active.record.state);
        let record = active.record.clone();
        self.save_run(run);
        self.retire(run);
        self.group_run_ended(&record);
    }

    /// Moves a finished run out of the live set once its last snapshot is
    /// out; it stays among the retired until that is durable.
    fn retire(&mut self, run: RunId) {
        self.write_dirty(Some(run));
        let Some(mut active) = self.runs.remove(&run) else {
            return;
        };
        let snapshot = active
            .watch
            .as_ref()
            .map(|_| views::run(&active.record, &active.stages));
        let watch = active.watch.take();
        let followers = std::mem::take(&mut active.followers);
        self.after_commit(move || {
            if let (Some(watch), Some(snapshot)) = (watch, snapshot) {
                watch.send_replace(snapshot);
            }
            drop(followers);
        });
        self.view_update.retired.push(run);
        self.retired.insert(run, active);
        self.retired_order.push_back((run, None));
    }

    /// Pushes a snapshot to `WatchRun` streams after the next commit.
    pub(super) fn publish(&mut self, run: RunId) {
        let Some(active) = self.runs.get(&run) else {
            return;
        };
        let Some(watch) = active.watch.as_ref().filter(|w| w.receiver_count() > 0) else {
            return;
        };
        let watch = watch.clone();
        let snapshot = views::run(&active.record, &active.stages);
        self.after_commit(move || {
            watch.send_replace(snapshot);
        });
    }

    pub(super) fn watch_run(&mut self, run: RunId, reply: Reply<Option<watch::Receiver<pb::Run>>>) {
        let receiver = self.runs.get_mut(&run).map(|active| match &active.watch {
            Some(watch) => watch.subscribe(),
            None => {
                let snapshot = views::run(&active.record, &active.stages);
                let (watch, receiver) = watch::channel(snapshot);
                active.watch = Some(watch);
                receiver
            }
        });
        // A finished run: the caller reads it, durable by the time it hears.
        self.reply(reply, Ok(receiver));
    }

    pub(super) fn cancel_run(&mut self, run: RunId) -> Result<RunId, ApiError> {
        if !self.runs.contains_key(&run) {
            return Err(self.not_active(run));
        }
        self.stop_run(
            run,
            RunState::Cancelled,
            StageState::Cancelled,
            "run cancelled",
            "cancelled by user",
        );
        tracing::info!(run = %run, "run cancelled");
        Ok(run)
    }

    /// Ends every unfinished stage of `run` and the run itself in
    /// `run_state`: a running stage's agent is told to stop (`stop_reason`)
    /// and the stage ends `held_as`; a waiting one is cancelled.
    fn stop_run(
        &mut self,
        run: RunId,
        run_state: RunState,
        held_as: StageState,
        stop_reason: &str,
        message: &str,
    ) {
        let Some(active) = self.runs.get_mut(&run) else {
            return;
        };
        active.record.state = run_state;
        let rolling_out = active
            .stages
            .iter()
            .any(|stage| stage.state == StageState::RollingOut);
        let keys: Vec<StageKey> = active.stages.iter().map(|stage| stage.key).collect();
        // A release this run is rolling out is aborted: the previous one
        // goes back to 100% rather than staying at part of the traffic.
        if rolling_out {
            self.abort_rollout_of_run(run, &format!("was stopped ({message})"));
        }
        for key in keys {
            let Some(stage) = self.stage(key) else {
                continue;
            };
            if stage.state.is_finished() {
                continue;
            }
            let was_rolling_out = stage.state == StageState::RollingOut;
            let state = if stage.state.is_held() {
                if let Some(agent) = stage.agent.clone() {
                    self.send_cancel(&agent, key, stage.attempt, stop_reason);
                }
                held_as
            } else {
                StageState::Cancelled
            };
            let message = if was_rolling_out {
                format!("{message}; its rollout is aborted and the previous release restored")
            } else {
                message.to_owned()
            };
            self.end_attempt(key, state, None, message);
        }
        self.finish_run_if_done(run);
        if rolling_out {
            self.start_rollout_runs();
        }
    }

    pub(super) fn retry_stage(
        &mut self,
        run: RunId,
        name: &str,
        stored: Option<(RunRecord, Vec<StageRecord>)>,
    ) -> Result<RunId, ApiError> {
        let mut reopened = None;
        if !self.runs.contains_key(&run) {
            // The engine's own copy is never older than the store's.
            let active = match (self.retired.remove(&run), stored) {
                (Some(active), _) => active,
                (None, Some((record, stages))) => {
                    let spec = self.spec(&record.pipeline, record.pipeline_version)?;
                    ActiveRun::new(record, stages, spec)
                }
                (None, None) => return Err(self.not_active(run)),
            };
            self.retired_order.retain(|(id, _)| *id != run);
            self.runs.insert(run, active);
            reopened = Some(run);
        }
        let result = self.reopen_stage(run, name);
        if let (Err(_), Some(run)) = (&result, reopened) {
            // Put a finished run back to rest untouched.
            if let Some(active) = self.runs.remove(&run) {
                self.retired.insert(run, active);
                self.retired_order.push_back((run, None));
            }
        }
        result.map(|()| run)
    }

    fn reopen_stage(&mut self, run: RunId, name: &str) -> Result<(), ApiError> {
        let active = &self.runs[&run];
        let spec = active.spec.clone();
        let idx = spec
            .parsed
            .stage_idx(name)
            .ok_or_else(|| ApiError::NotFound(format!("run {run} has no stage `{name}`")))?;
        let stage = &active.stages[idx];
        if !matches!(
            stage.state,
            StageState::Failed | StageState::TimedOut | StageState::Cancelled
        ) {
            return Err(ApiError::FailedPrecondition(format!(
                "stage `{name}` of run {run} is {}; only failed, timed-out or cancelled stages can be retried",
                stage.state.name()
            )));
        }
        if let Some(&need) = spec.parsed.stages[idx]
            .needs
            .iter()
            .find(|&&need| !passes(&active.stages[need], &spec))
        {
            return Err(ApiError::FailedPrecondition(format!(
                "stage `{name}` needs `{}`, which did not succeed; retry that stage first",
                spec.parsed.stages[need].name
            )));
        }
        let key = StageKey {
            run,
            idx: idx as u32,
        };
        // Inputs of an old run may have been garbage-collected since.
        if let Some(gone) = self.inputs_of_stage(key).into_iter().find(|input| {
            crate::blobs::parse_digest(&input.artifact.digest)
                .map_or(true, |digest| self.blobs.stat(&digest).is_none())
        }) {
            return Err(ApiError::FailedPrecondition(format!(
                "stage `{name}` needs artifact `{}` from `{}` ({}), which is no longer stored; trigger a new run instead",
                gone.artifact.path, gone.stage, gone.artifact.digest
            )));
        }
        // Dependents that were skipped or cancelled because of it wait
        // again; those skipped for good (their condition) stay skipped.
        let mut todo = spec.dependents[idx].clone();
        while let Some(dependent) = todo.pop() {
            let dependent_key = StageKey {
                run,
                idx: dependent as u32,
            };
            let waits_for_it = self.stage(dependent_key).is_some_and(|s| {
                matches!(s.state, StageState::Skipped | StageState::Cancelled) && !s.settled
            });
            if waits_for_it && self.new_attempt(dependent_key, StageState::Pending, false, true, "")
            {
                todo.extend(spec.dependents[dependent].iter().copied());
            }
        }
        if let Some(active) = self.runs.get_mut(&run) {
            active.record.state = RunState::Running;
            active.record.finished_ms = None;
        }
        tracing::info!(run = %run, stage = name, "stage retried");
        self.save_run(run);
        self.new_attempt(key, StageState::Ready, false, true, "retried by user");
        Ok(())
    }

    /// Why a run the engine does not hold cannot change; decided from
    /// memory (run ids are only ever handed out here).
    pub(super) fn not_active(&self, run: RunId) -> ApiError {
        match self.retired.get(&run) {
            Some(active) => ApiError::FailedPrecondition(format!(
                "run {run} already finished ({})",
                active.record.state.name()
            )),
            None if run.0 >= 1 && run.0 < self.next_run_id => {
                ApiError::FailedPrecondition(format!("run {run} already finished"))
            }
            None => ApiError::NotFound(format!("run {run} does not exist")),
        }
    }

    /// A run whose pipeline version cannot be parsed any more: it fails,
    /// with the parse error as the reason, instead of stopping recovery.
    pub(super) fn fail_unparsable_run(
        &mut self,
        mut record: RunRecord,
        mut stages: Vec<StageRecord>,
        error: &ApiError,
    ) {
        let now = self.clock.now_ms();
        let reason = format!(
            "pipeline `{}` version {} cannot be read any more: {error}",
            record.pipeline, record.pipeline_version
        );
        tracing::error!(run = %record.id, "{reason}; failing the run");
        for stage in stages.iter_mut().filter(|stage| !stage.state.is_finished()) {
            stage.state = StageState::Failed;
            stage.message = reason.clone();
            stage.finished_ms = Some(now);
            self.write(Op::Stage(stage.clone()));
        }
        record.state = RunState::Failed;
        record.finished_ms = Some(now);
        self.write(Op::Run(record));
    }

    /// A run of the run book, unfinished or lately finished: delivery
    /// events may arrive after the run retired in the same burst.
    pub(super) fn run_of(&self, run: RunId) -> Option<&ActiveRun> {
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

    /// Artifacts a stage gets: the outputs of the stages it needs, or a
    /// rollback plan's fixed artifacts.
    pub(super) fn inputs_of_stage(&self, key: StageKey) -> Vec<StageArtifact> {
        self.run_of(key.run)
            .map(|active| active.view().inputs_of(key.idx as usize))
            .unwrap_or_default()
    }

    /// `kiln approve` / `kiln reject` of a gate that waits.
    pub(super) fn decide_gate(
        &mut self,
        run: RunId,
        name: &str,
        user: &str,
        approve: bool,
        reason: &str,
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
        let because = if reason.is_empty() {
            String::new()
        } else {
            format!(": {reason}")
        };
        if let Some(stage) = self.stage_mut(key)
            && let Some(gate) = stage.gate.as_mut()
        {
            gate.decided_by = Some(user.to_owned());
            gate.passed = approve;
            gate.summary = format!("{}; {verdict} by {user}{because}", gate.summary);
        }
        tracing::info!(run = %run, stage = name, user, verdict, "manual gate decided");
        let message = format!("{verdict} by {user}{because}");
        let state = if approve {
            StageState::Succeeded
        } else {
            StageState::Failed
        };
        self.settle_stage(key, state, None, message);
        Ok(run)
    }

    /// Starts the rollback run delivery planned: the environment stage
    /// alone, at the restored release's pipeline version and commit, every
    /// other stage skipped.
    pub(super) fn start_rollback_run(
        &mut self,
        start: RollbackStart,
        triggered_by: String,
    ) -> Result<RunId, ApiError> {
        let RollbackStart { plan, target } = start;
        let variables = rollout_variables(plan.rollout.as_ref());
        let left_out = match plan.rollout {
            Some(_) => "not part of a rollout's run",
            None => "not part of a rollback",
        };
        let pipeline =
            self.latest.get(&target.pipeline).cloned().ok_or_else(|| {
                ApiError::NotFound(format!("pipeline `{}` is gone", target.pipeline))
            })?;
        let (spec, idx) =
            self.spec_with_stage(&target.pipeline, target.pipeline_version, &target.stage)?;
        let id = RunId(self.next_run_id);
        self.next_run_id += 1;
        match &plan.rollout {
            Some(step) => {
                tracing::info!(run = %id, environment = %plan.environment, release = plan.to, weight = step.weight, restore = step.restore, "deploying a rollout step")
            }
            None => {
                tracing::warn!(run = %id, environment = %plan.environment, from = plan.from, to = plan.to, "rolling back: release {} replaces release {}", plan.to, plan.from)
            }
        }
        let record = RunRecord {
            id,
            pipeline: pipeline.name.clone(),
            pipeline_version: target.pipeline_version,
            commit: target.commit.clone(),
            rev: match &plan.rollout {
                Some(step) if step.restore => format!("restore release {} at 100%", target.id),
                Some(step) => format!("rollout of release {} at {}%", target.id, step.weight),
                None => format!("rollback to release {}", target.id),
            },
            state: RunState::Queued,
            triggered_by,
            created_ms: self.clock.now_ms(),
            finished_ms: None,
            source_digest: target.source_digest.clone(),
            rollback: Some(plan),
            datasets: Vec::new(),
            pipeline_digest: spec.record.digest.clone(),
            params: BTreeMap::new(),
            variables,
            promote: None,
            group: None,
            waiting: false,
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
                    record.message = left_out.into();
                }
                record
            })
            .collect();
        self.insert_new_run(record, stages, spec);
        self.make_ready(StageKey {
            run: id,
            idx: idx as u32,
        });
        Ok(id)
    }
}

/// Whether a finished stage lets the stages after it run: it succeeded,
/// or it failed (or timed out) and says `allow_failure: true`.
pub(super) fn passes(stage: &StageRecord, spec: &PipelineSpec) -> bool {
    match stage.state {
        StageState::Succeeded => true,
        StageState::Failed | StageState::TimedOut => spec
            .parsed
            .stages
            .get(stage.key.idx as usize)
            .is_some_and(|stage| stage.allow_failure),
        _ => false,
    }
}

/// Why an attempt ended without success, in the words of `retries.when`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cause {
    AgentLost,
    InfraError,
    Timeout,
    Failed,
}

impl Cause {
    fn earns_retry(self, when: &spec::RetryWhen) -> bool {
        match self {
            Cause::AgentLost => when.agent_lost,
            Cause::InfraError => when.infra_error,
            Cause::Timeout => when.timeout,
            Cause::Failed => when.failed,
        }
    }

    /// The state a stage ends in when this cause gets no new attempt.
    fn final_state(self) -> StageState {
        match self {
            Cause::Timeout => StageState::TimedOut,
            Cause::AgentLost | Cause::InfraError | Cause::Failed => StageState::Failed,
        }
    }
}

/// Removes and returns the members of `set` that match.
fn drain_matching<T: Ord + Copy>(
    set: &mut std::collections::BTreeSet<T>,
    matches: impl Fn(&T) -> bool,
) -> Vec<T> {
    let taken: Vec<T> = set.iter().copied().filter(|item| matches(item)).collect();
    for item in &taken {
        set.remove(item);
    }
    taken
}

/// What a rollback run's stage is told: `KILN_EVENT=rollback`, or for a
/// rollout's run `KILN_EVENT=rollout` and the traffic it is to set.
fn rollout_variables(step: Option<&crate::store::RolloutStep>) -> BTreeMap<String, String> {
    let Some(step) = step else {
        return BTreeMap::from([("KILN_EVENT".to_owned(), "rollback".to_owned())]);
    };
    BTreeMap::from([
        ("KILN_EVENT".to_owned(), "rollout".to_owned()),
        ("KILN_TRAFFIC_WEIGHT".to_owned(), step.weight.to_string()),
        (
            "KILN_TRAFFIC_MODE".to_owned(),
            kiln_common::spec::Strategy::traffic_mode(step.weight).to_owned(),
        ),
    ])
}
