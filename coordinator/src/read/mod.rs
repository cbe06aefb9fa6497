//! The read path: status, lists and log pages, served without the engine
//! or the commit thread.
//!
//! Readers go to the store on the blocking pool, at the **durable
//! watermark**: the [`DurableView`] is what the committer has made durable,
//! published after every flush (the unfinished runs as snapshots, how many
//! lines of each running attempt are on disk, the highest durable run id,
//! the latest version of every pipeline).
//! A reader takes the view first and reads the store only within it, so it
//! never shows what a crash could still take back, and it never waits for
//! the committer: a flush in progress only means the view is a few
//! milliseconds old.
//!
//! **Architecture Invariant:** the group committer only writes; no read
//! runs on its thread or in the engine's loop.

mod logs;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use kiln_common::ids::{RunId, StageKey};
use kiln_proto::v1 as pb;

pub(crate) use logs::{Followed, Follower, LogRequest, StagePlan, Tap, select_stage, stream_logs};

use crate::error::ApiError;
use crate::store::{PipelineRecord, Store};
use crate::views;

/// How far one running attempt's log is durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LogMark {
    pub(crate) attempt: u32,
    /// Lines `0..next_seq` of `attempt` are on disk.
    pub(crate) next_seq: u64,
}

/// What became durable in one commit; the engine builds it, the committer
/// applies it after the flush.
#[derive(Debug, Default)]
pub(crate) struct ViewUpdate {
    pub(crate) runs: Vec<Arc<pb::Run>>,
    pub(crate) marks: Vec<(StageKey, LogMark)>,
    /// Finished runs: their records in the store are final and durable.
    pub(crate) retired: Vec<RunId>,
    pub(crate) last_run: Option<RunId>,
    /// New latest versions of pipelines.
    pub(crate) pipelines: Vec<PipelineRecord>,
}

impl ViewUpdate {
    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty()
            && self.marks.is_empty()
            && self.retired.is_empty()
            && self.last_run.is_none()
            && self.pipelines.is_empty()
    }
}

#[derive(Default)]
struct ViewState {
    /// Unfinished runs as of the last flush.
    runs: HashMap<RunId, Arc<pb::Run>>,
    /// The durable log of each stage of an unfinished run.
    marks: HashMap<StageKey, LogMark>,
    /// The highest run id whose creation is durable.
    last_run: RunId,
    /// The latest durable version of every pipeline, by name.
    pipelines: BTreeMap<String, Arc<PipelineRecord>>,
    /// Changes whenever `pipelines` does, so a watcher can tell cheaply.
    pipelines_generation: u64,
}

/// The durable state readers may see; shared by the engine (which fills it
/// at recovery and through commit effects) and every reader.
#[derive(Default)]
pub(crate) struct DurableView {
    state: RwLock<ViewState>,
}

impl DurableView {
    pub(crate) fn apply(&self, update: ViewUpdate) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = update.last_run {
            state.last_run = state.last_run.max(last);
        }
        for run in update.runs {
            state.runs.insert(RunId(run.id), run);
        }
        for (key, mark) in update.marks {
            state.marks.insert(key, mark);
        }
        for run in update.retired {
            state.runs.remove(&run);
            state.marks.retain(|key, _| key.run != run);
        }
        if !update.pipelines.is_empty() {
            state.pipelines_generation += 1;
        }
        for pipeline in update.pipelines {
            state
                .pipelines
                .insert(pipeline.name.clone(), Arc::new(pipeline));
        }
    }

    /// The latest durable version of the pipeline `name`.
    pub(crate) fn pipeline(&self, name: &str) -> Option<Arc<PipelineRecord>> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.pipelines.get(name).cloned()
    }

    /// The latest durable version of every pipeline, by name.
    pub(crate) fn pipelines(&self) -> Vec<Arc<PipelineRecord>> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.pipelines.values().cloned().collect()
    }

    /// A number that changes whenever a pipeline gets a new version.
    pub(crate) fn pipelines_generation(&self) -> u64 {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.pipelines_generation
    }

    fn active_run(&self, run: RunId) -> Option<Arc<pb::Run>> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.runs.get(&run).cloned()
    }

    fn last_run(&self) -> RunId {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .last_run
    }

    /// What to send of an unfinished run's logs: each stage's attempt and
    /// where its durable lines end, read under one lock.
    fn active_plan(&self, run: RunId) -> Option<Vec<StagePlan>> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let snapshot = state.runs.get(&run)?;
        let plans = snapshot
            .stages
            .iter()
            .map(|stage| {
                let key = StageKey {
                    run,
                    idx: stage.idx,
                };
                let mark = state.marks.get(&key).copied().unwrap_or(LogMark {
                    attempt: stage.attempt,
                    next_seq: 0,
                });
                StagePlan {
                    key,
                    name: stage.name.clone(),
                    attempt: mark.attempt,
                    below: mark.next_seq,
                }
            })
            .collect();
        Some(plans)
    }
}

/// Reads for the API, off the engine and the commit thread.
#[derive(Clone)]
pub(crate) struct Reader {
    store: Arc<dyn Store>,
    view: Arc<DurableView>,
    parsed: Arc<crate::pipelines::ParsedPipelines>,
}

impl Reader {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        view: Arc<DurableView>,
        parsed: Arc<crate::pipelines::ParsedPipelines>,
    ) -> Self {
        Self {
            store,
            view,
            parsed,
        }
    }

    /// Pipeline versions, parsed once.
    pub(crate) fn parsed(&self) -> &Arc<crate::pipelines::ParsedPipelines> {
        &self.parsed
    }

    /// Runs `read` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce(&dyn Store) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || read(&*store))
            .await
            .map_err(|error| ApiError::Internal(format!("a read task failed: {error}")))?
    }

    /// A run as durable now.
    pub(crate) async fn run(&self, run: RunId) -> Result<pb::Run, ApiError> {
        if let Some(active) = self.view.active_run(run) {
            return Ok((*active).clone());
        }
        if run > self.view.last_run() {
            return Err(not_found(run));
        }
        self.blocking(move |store| views::stored_run(store, run))
            .await
    }

    /// The newest runs, durable ones only.
    pub(crate) async fn runs(
        &self,
        pipeline: Option<String>,
        limit: usize,
    ) -> Result<Vec<pb::Run>, ApiError> {
        self.runs_up_to(pipeline, None, limit).await
    }

    /// The newest runs with an id up to `up_to` (all when `None`), durable
    /// ones only: the web dashboard's pages of runs.
    pub(crate) async fn runs_up_to(
        &self,
        pipeline: Option<String>,
        up_to: Option<RunId>,
        limit: usize,
    ) -> Result<Vec<pb::Run>, ApiError> {
        let view = self.view.clone();
        let durable = view.last_run();
        let up_to = up_to.map_or(durable, |id| id.min(durable));
        self.blocking(move |store| {
            let records = store.runs(pipeline.as_deref(), up_to, limit)?;
            records
                .into_iter()
                .map(|record| match view.active_run(record.id) {
                    Some(active) => Ok((*active).clone()),
                    None => Ok(views::run(&record, &store.stages(record.id)?)),
                })
                .collect()
        })
        .await
    }

    /// Whether the run is unfinished as of the last flush.
    pub(crate) fn is_active(&self, run: RunId) -> bool {
        self.view.active_run(run).is_some()
    }

    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(crate) fn view(&self) -> &Arc<DurableView> {
        &self.view
    }
}

pub(crate) fn not_found(run: RunId) -> ApiError {
    ApiError::NotFound(format!("run {run} does not exist"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(name: &str, version: u32) -> PipelineRecord {
        PipelineRecord::for_test(name, version, "")
    }

    #[test]
    fn the_latest_pipeline_versions_change_only_with_a_new_version() {
        let view = DurableView::default();
        let before = view.pipelines_generation();
        view.apply(ViewUpdate {
            last_run: Some(RunId(1)),
            ..Default::default()
        });
        assert_eq!(view.pipelines_generation(), before, "no pipeline changed");
        view.apply(ViewUpdate {
            pipelines: vec![pipeline("credit", 1), pipeline("juice", 1)],
            ..Default::default()
        });
        let registered = view.pipelines_generation();
        assert_ne!(registered, before);
        view.apply(ViewUpdate {
            pipelines: vec![pipeline("credit", 2)],
            ..Default::default()
        });
        assert_ne!(view.pipelines_generation(), registered);
        assert_eq!(view.pipeline("credit").unwrap().version, 2);
        assert_eq!(view.pipelines().len(), 2);
        assert!(view.pipeline("churn").is_none());
    }
}
