//! Runs and their DAG: creation, stage transitions, completion, cancel and
//! retry.
//!
//! **Architecture Invariant:** a stage reaches a terminal state at most once
//! per attempt; only a new attempt (re-dispatch or manual retry) can leave
//! it, and that attempt number fences off whoever held the old one.

use std::sync::Arc;

use kiln_common::ids::{RunId, StageKey};
use kiln_proto::v1 as pb;
use tokio::sync::watch;

use super::{ActiveRun, Engine, PipelineSpec, Reply};
use crate::error::ApiError;
use crate::store::{
    DatasetRecord, Op, PipelineRecord, RunRecord, RunState, StageRecord, StageState,
};
use crate::views;

impl Engine {
    pub(super) fn trigger(
        &mut self,
        pipeline: &PipelineRecord,
        commit: String,
        rev: String,
        triggered_by: String,
        source_digest: Option<String>,
        datasets: Vec<DatasetRecord>,
    ) -> Result<RunId, ApiError> {
        let spec = self.spec(&pipeline.name, pipeline.version)?;
        let id = RunId(self.next_run_id);
        self.next_run_id += 1;
        let record = RunRecord {
            id,
            pipeline: pipeline.name.clone(),
            pipeline_version: pipeline.version,
            commit,
            rev,
            state: RunState::Queued,
            triggered_by,
            created_ms: self.clock.now_ms(),
            finished_ms: None,
            source_digest,
            rollback: None,
            datasets,
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
        self.runs
            .insert(id, ActiveRun::new(record, stages, spec.clone()));
        self.save_run(id);
        for idx in 0..spec.parsed.stages.len() {
            if spec.parsed.stages[idx].needs.is_empty() {
                self.make_ready(StageKey {
                    run: id,
                    idx: idx as u32,
                });
            } else {
                self.save_stage(StageKey {
                    run: id,
                    idx: idx as u32,
                });
            }
        }
        Ok(id)
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
        for stage in &stages {
            match stage.state {
                StageState::Ready => self.ready.push_back(stage.key),
                state if state.is_held() => {
                    if let Some(agent) = &stage.agent {
                        self.expect_agent(agent, stage.key, now);
                    }
                }
                _ => {}
            }
        }
        self.runs.insert(id, ActiveRun::new(record, stages, spec));
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
                self.write(Op::Run(record));
            }
        }
        let watched = drain_matching(&mut self.dirty.watched, |&run| wanted(run));
        for run in watched {
            self.publish(run);
        }
    }

    pub(super) fn make_ready(&mut self, key: StageKey) {
        if let Some(stage) = self.stage_mut(key) {
            stage.state = StageState::Ready;
            self.ready.push_back(key);
            self.ready_since.insert(key, std::time::Instant::now());
            self.save_stage(key);
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
        let now = self.clock.now_ms();
        let Some(stage) = self.stage_mut(key) else {
            return;
        };
        stage.state = state;
        stage.exit_code = exit_code;
        stage.message = message;
        stage.finished_ms = Some(now);
        tracing::debug!(stage = %key, name = %stage.name, ?state, "stage settled");
        self.metrics.stage_finished(state);
        self.save_stage(key);
        self.end_followers(key);
        let Some(spec) = self.runs.get(&key.run).map(|run| run.spec.clone()) else {
            return;
        };
        if state == StageState::Succeeded {
            if spec.parsed.stages[key.idx as usize].environment.is_some() {
                self.on_environment_stage_succeeded(key);
            }
            for &dependent in &spec.dependents[key.idx as usize] {
                let all_done = spec.parsed.stages[dependent].needs.iter().all(|&need| {
                    self.stage(StageKey {
                        run: key.run,
                        idx: need as u32,
                    })
                    .is_some_and(|stage| stage.state == StageState::Succeeded)
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
                    .find_map(|&need| {
                        let need = self.stage(StageKey {
                            run: key.run,
                            idx: need as u32,
                        })?;
                        (need.state.is_terminal() && need.state != StageState::Succeeded)
                            .then(|| need.name.clone())
                    });
                if all_done && pending {
                    self.make_ready(dependent_key);
                } else if let (true, Some(blocker)) = (pending, blocked_by) {
                    if let Some(stage) = self.stage_mut(dependent_key) {
                        stage.state = StageState::Skipped;
                        stage.message = format!("skipped: `{blocker}` did not succeed");
                    }
                    self.save_stage(dependent_key);
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

    fn skip_dependents(&mut self, key: StageKey, spec: &PipelineSpec, failed: &str) {
        let mut todo = spec.dependents[key.idx as usize].clone();
        while let Some(idx) = todo.pop() {
            let dependent = StageKey {
                run: key.run,
                idx: idx as u32,
            };
            let Some(stage) = self.stage_mut(dependent) else {
                continue;
            };
            if matches!(stage.state, StageState::Pending | StageState::Ready) {
                stage.state = StageState::Skipped;
                stage.message = format!("skipped: `{failed}` did not succeed");
                self.save_stage(dependent);
                todo.extend(spec.dependents[idx].iter().copied());
            }
        }
    }

    /// Re-queues a stage whose attempt was lost, as a new attempt, or fails
    /// it when its retries are used up. `charge` is false for hand-backs.
    pub(super) fn requeue(&mut self, key: StageKey, charge: bool, why: &str) {
        let Some(spec) = self.runs.get(&key.run).map(|run| run.spec.clone()) else {
            return;
        };
        let retries = spec.parsed.stages[key.idx as usize].retries;
        let Some(stage) = self.stage_mut(key) else {
            return;
        };
        if stage.state.is_terminal() {
            return;
        }
        if charge && stage.retries_used >= retries {
            let message = format!("{why} (attempt {}, no retries left)", stage.attempt);
            self.settle_stage(key, StageState::Failed, None, message);
            return;
        }
        stage.retries_used += u32::from(charge);
        stage.attempt += 1;
        stage.agent = None;
        stage.started_ms = None;
        stage.next_log_seq = 0;
        stage.log_bytes = 0;
        stage.log_truncated = false;
        stage.message = format!("{why}; re-queued as attempt {}", stage.attempt);
        tracing::warn!(stage = %key, attempt = stage.attempt, "{why}; re-queued");
        self.make_ready(key);
    }

    pub(super) fn finish_run_if_done(&mut self, run: RunId) {
        let now = self.clock.now_ms();
        let Some(active) = self.runs.get_mut(&run) else {
            return;
        };
        if !active.stages.iter().all(|stage| stage.state.is_terminal()) {
            return;
        }
        if !active.record.state.is_terminal() {
            let failed = active
                .stages
                .iter()
                .any(|stage| matches!(stage.state, StageState::Failed | StageState::TimedOut));
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
            self.finish_rollback(&plan, false);
        }
        let Some(active) = self.runs.get(&run) else {
            return;
        };
        self.metrics.run_finished(active.record.state);
        self.save_run(run);
        self.retire(run);
    }

    /// Drops a finished run from memory once its last snapshot is out.
    fn retire(&mut self, run: RunId) {
        self.write_dirty(Some(run));
        let Some(active) = self.runs.remove(&run) else {
            return;
        };
        let snapshot = active
            .watch
            .as_ref()
            .map(|_| views::run(&active.record, &active.stages));
        let (watch, followers) = (active.watch, active.followers);
        self.after_commit(move |_| {
            if let (Some(watch), Some(snapshot)) = (watch, snapshot) {
                watch.send_replace(snapshot);
            }
            drop(followers);
        });
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
        self.after_commit(move |_| {
            watch.send_replace(snapshot);
        });
    }

    pub(super) fn get_run(&mut self, run: RunId, reply: Reply<pb::Run>) {
        // Read in the effect: by then every earlier transition is stored.
        self.after_commit(move |store| {
            let _ = reply.send(views::stored_run(store, run));
        });
    }

    pub(super) fn list_runs(
        &mut self,
        pipeline: Option<String>,
        limit: usize,
        reply: Reply<Vec<pb::Run>>,
    ) {
        self.after_commit(move |store| {
            let result = store
                .runs(pipeline.as_deref(), limit)
                .map_err(ApiError::from)
                .and_then(|runs| {
                    runs.into_iter()
                        .map(|run| Ok(views::run(&run, &store.stages(run.id)?)))
                        .collect()
                });
            let _ = reply.send(result);
        });
    }

    pub(super) fn watch_run(&mut self, run: RunId, reply: Reply<watch::Receiver<pb::Run>>) {
        match self.runs.get_mut(&run) {
            Some(active) => {
                let snapshot = views::run(&active.record, &active.stages);
                let receiver = match &active.watch {
                    Some(watch) => watch.subscribe(),
                    None => {
                        let (watch, receiver) = watch::channel(snapshot.clone());
                        active.watch = Some(watch);
                        receiver
                    }
                };
                self.reply(reply, Ok(receiver));
            }
            None => self.after_commit(move |store| {
                // Finished (or unknown): one snapshot, then the stream ends.
                let result =
                    views::stored_run(store, run).map(|snapshot| watch::channel(snapshot).1);
                let _ = reply.send(result);
            }),
        }
    }

    pub(super) fn cancel_run(&mut self, run: RunId) -> Result<RunId, ApiError> {
        let Some(active) = self.runs.get_mut(&run) else {
            return Err(self.not_active(run));
        };
        active.record.state = RunState::Cancelled;
        let keys: Vec<StageKey> = active.stages.iter().map(|stage| stage.key).collect();
        for key in keys {
            let Some(stage) = self.stage(key) else {
                continue;
            };
            if stage.state.is_terminal() {
                continue;
            }
            if stage.state.is_held()
                && let Some(agent) = stage.agent.clone()
            {
                self.send_cancel(&agent, key, stage.attempt, "run cancelled");
            }
            let now = self.clock.now_ms();
            if let Some(stage) = self.stage_mut(key) {
                stage.state = StageState::Cancelled;
                stage.message = "cancelled by user".into();
                stage.finished_ms = Some(now);
            }
            self.save_stage(key);
            self.end_followers(key);
        }
        tracing::info!(run = %run, "run cancelled");
        self.finish_run_if_done(run);
        Ok(run)
    }

    pub(super) fn retry_stage(&mut self, run: RunId, name: &str) -> Result<RunId, ApiError> {
        if !self.runs.contains_key(&run) {
            let record = self
                .store
                .run(run)?
                .ok_or_else(|| ApiError::NotFound(format!("run {run} does not exist")))?;
            let spec = self.spec(&record.pipeline, record.pipeline_version)?;
            let stages = self.store.stages(run)?;
            self.runs.insert(run, ActiveRun::new(record, stages, spec));
        }
        let result = self.reopen_stage(run, name);
        if result.is_err() {
            // Put a finished run back to rest untouched.
            if self
                .runs
                .get(&run)
                .is_some_and(|active| active.record.state.is_terminal())
            {
                self.runs.remove(&run);
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
                views::stage_state_name(stage.state)
            )));
        }
        if let Some(&need) = spec.parsed.stages[idx]
            .needs
            .iter()
            .find(|&&need| active.stages[need].state != StageState::Succeeded)
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
        reset_stage(self.stage_mut(key), "retried by user");
        // Dependents that were skipped or cancelled because of it wait again.
        let mut todo = spec.dependents[idx].clone();
        while let Some(dependent) = todo.pop() {
            let dependent_key = StageKey {
                run,
                idx: dependent as u32,
            };
            let stage = self.stage_mut(dependent_key);
            if stage
                .as_ref()
                .is_some_and(|s| matches!(s.state, StageState::Skipped | StageState::Cancelled))
            {
                reset_stage(stage, "");
                if let Some(stage) = self.stage_mut(dependent_key) {
                    stage.state = StageState::Pending;
                }
                self.save_stage(dependent_key);
                todo.extend(spec.dependents[dependent].iter().copied());
            }
        }
        if let Some(active) = self.runs.get_mut(&run) {
            active.record.state = RunState::Running;
            active.record.finished_ms = None;
        }
        tracing::info!(run = %run, stage = name, "stage retried");
        self.save_run(run);
        self.make_ready(key);
        Ok(())
    }

    pub(super) fn not_active(&self, run: RunId) -> ApiError {
        match self.store.run(run) {
            Ok(Some(record)) => ApiError::FailedPrecondition(format!(
                "run {run} already finished ({})",
                views::run_state_name(record.state)
            )),
            Ok(None) => ApiError::NotFound(format!("run {run} does not exist")),
            Err(error) => error.into(),
        }
    }
}

/// Clears a stage for a fresh attempt.
fn reset_stage(stage: Option<&mut StageRecord>, message: &str) {
    if let Some(stage) = stage {
        stage.outputs.clear();
        stage.attempt += 1;
        stage.retries_used = 0;
        stage.agent = None;
        stage.started_ms = None;
        stage.finished_ms = None;
        stage.exit_code = None;
        stage.next_log_seq = 0;
        stage.log_bytes = 0;
        stage.log_truncated = false;
        stage.message = message.to_owned();
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
