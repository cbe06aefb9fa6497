//! Runs nobody typed: cron schedules and watched data directories (this
//! task), and push webhooks (`webhook`, on the HTTP listener).
//!
//! The watcher wakes every [`TICK`], looks at the latest durable version
//! of every pipeline (the durable view's, parsed once), and starts a run when a schedule slot is due or watched data
//! has changed and settled. The slot or data digest that started a run is
//! written in the same batch as the run, so after a restart a slot never
//! fires twice; slots missed while the coordinator was down fire once,
//! for the latest of them (see `kiln_common::triggers::schedule`).

pub(crate) mod dataset;
pub(crate) mod poll;
pub(crate) mod webhook;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kiln_common::spec::{self, DataTrigger, Triggers};
use kiln_common::triggers::data::{DataWatch, digest_tree};
use kiln_common::triggers::schedule;
use kiln_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot, watch};

use crate::blobs::BlobStore;
use crate::clock::Clock;
use crate::engine::{Event, FileAtCommit, TriggerRequest};
use crate::error::ApiError;
use crate::pipelines::ParsedPipelines;
use crate::read::DurableView;
use crate::repos::Repos;
use crate::store::{DatasetRecord, PipelineRecord, Store, TriggerStateRecord};

/// How often due schedules and data polls are checked.
const TICK: Duration = Duration::from_secs(1);

/// What a trigger asks the engine for.
pub(crate) struct TriggeredRun {
    pub(crate) pipeline: PipelineRecord,
    /// A branch, tag or commit to resolve; `None` = the registered branch.
    pub(crate) rev: Option<String>,
    pub(crate) triggered_by: String,
    pub(crate) datasets: Vec<DatasetRecord>,
    pub(crate) trigger_state: Option<TriggerStateRecord>,
    /// Parameter values asked for; checked against the pipeline file the
    /// run builds (unknown names and wrong types are refused).
    pub(crate) params: BTreeMap<String, String>,
    /// What started the run, as stages see it: `KILN_EVENT`, and the
    /// `KILN_BRANCH`/`KILN_TAG`/`KILN_MR_ID` the trigger knows. A branch
    /// or tag the trigger does not name is found from the revision.
    pub(crate) variables: BTreeMap<String, String>,
    /// A webhook delivery's idempotency keys; see `TriggerRequest`.
    pub(crate) deliveries: Vec<String>,
    /// Found by the starter for `changes:`; see `TriggerRequest`.
    pub(crate) changed: Option<Vec<String>>,
}

impl TriggeredRun {
    /// A run of `pipeline` at `rev` (the branch head when `None`) started
    /// by `event` (`KILN_EVENT`), with nothing else set.
    pub(crate) fn new(
        pipeline: PipelineRecord,
        rev: Option<String>,
        event: &str,
        triggered_by: String,
    ) -> Self {
        Self {
            pipeline,
            rev,
            triggered_by,
            datasets: Vec::new(),
            trigger_state: None,
            params: BTreeMap::new(),
            variables: BTreeMap::from([("KILN_EVENT".to_owned(), event.to_owned())]),
            deliveries: Vec::new(),
            changed: None,
        }
    }
}

/// Everything that starts runs (the CLI, webhooks, schedules, data) starts
/// them through this: the revision resolved to a commit and the pipeline
/// file read at that commit, both off the engine loop, then one event.
#[derive(Clone)]
pub(crate) struct Starter {
    pub(crate) events: mpsc::Sender<Event>,
    pub(crate) repos: Arc<Repos>,
    pub(crate) parsed: Arc<ParsedPipelines>,
    /// Where the branch's previous build is found, for `changes:`.
    pub(crate) store: Arc<dyn Store>,
}

/// How far back the previous build of a branch is looked for.
const PREVIOUS_BUILD_LOOKBACK: usize = 500;

impl Starter {
    /// Resolves the revision, reads the pipeline file at that commit and
    /// starts the run; answers once it is durable. A file that cannot be
    /// read or parsed still starts a run, failed at once with the reason.
    pub(crate) async fn start(&self, mut run: TriggeredRun) -> Result<pb::Run, ApiError> {
        let pipeline = &run.pipeline.clone();
        let rev = run.rev.clone().unwrap_or_else(|| pipeline.branch.clone());
        let commit = self
            .repos
            .resolve(&pipeline.repo, &pipeline.branch, &rev)
            .await?;
        let at_commit = self.file_at_commit(pipeline, &commit).await?;
        let declared = match &at_commit {
            None => self.parsed.get(pipeline).ok(),
            Some(FileAtCommit {
                read: Ok((_, parsed)),
                ..
            }) => Some(parsed.clone()),
            // The run fails at once with the file's own error.
            Some(_) => None,
        };
        if let Some(declared) = &declared {
            run.params = spec::resolve_params(&declared.params, &run.params)
                .map_err(ApiError::InvalidArgument)?;
        }
        if !run.variables.contains_key("KILN_BRANCH") && !run.variables.contains_key("KILN_TAG") {
            let found = if run.rev.is_none() {
                Some(("KILN_BRANCH", pipeline.branch.clone()))
            } else {
                self.repos
                    .ref_kind(&pipeline.repo, &rev)
                    .await
                    .map(|kind| (kind, rev.clone()))
            };
            if let Some((name, value)) = found {
                run.variables.insert(name.to_owned(), value);
            }
        }
        let asks_changes = declared.is_some_and(|declared| {
            declared.stages.iter().any(|stage| {
                stage
                    .condition
                    .as_ref()
                    .is_some_and(|condition| !condition.changes.is_empty())
            })
        });
        run.changed = if asks_changes {
            self.changed_since_previous_build(&run, &commit).await?
        } else {
            None
        };
        self.send(run, at_commit, (commit, rev), None).await
    }

    /// The paths `commit` changed since the last commit of the same
    /// branch that a run of this pipeline built (another commit than this
    /// one, so a re-run sees what its first run saw); `None` — everything
    /// — for a branch's first build, a tag or a commit with no branch.
    async fn changed_since_previous_build(
        &self,
        run: &TriggeredRun,
        commit: &str,
    ) -> Result<Option<Vec<String>>, ApiError> {
        let Some(branch) = run.variables.get("KILN_BRANCH").cloned() else {
            return Ok(None);
        };
        let (store, pipeline, commit_owned) = (
            self.store.clone(),
            run.pipeline.name.clone(),
            commit.to_owned(),
        );
        let previous = tokio::task::spawn_blocking(move || {
            let runs = store.runs(
                Some(&pipeline),
                kiln_common::ids::RunId(u64::MAX),
                PREVIOUS_BUILD_LOOKBACK,
            )?;
            Ok::<_, ApiError>(runs.into_iter().find_map(|record| {
                (record.variables.get("KILN_BRANCH") == Some(&branch)
                    && !record.commit.is_empty()
                    && record.commit != commit_owned)
                    .then_some(record.commit)
            }))
        })
        .await
        .map_err(|error| ApiError::Internal(format!("previous build lookup: {error}")))??;
        let Some(base) = previous else {
            return Ok(None);
        };
        self.repos
            .changed_paths(&run.pipeline.repo, &base, commit)
            .await
    }

    /// Starts a run of an uploaded source snapshot: the registered
    /// version, no commit.
    pub(crate) async fn start_snapshot(
        &self,
        pipeline: PipelineRecord,
        source_digest: String,
        triggered_by: String,
        params: BTreeMap<String, String>,
    ) -> Result<pb::Run, ApiError> {
        let mut run = TriggeredRun::new(pipeline, None, "manual", triggered_by);
        run.params = params;
        let declared = self
            .parsed
            .get(&run.pipeline)
            .map_err(|error| ApiError::FailedPrecondition(error.to_string()))?;
        run.params = spec::resolve_params(&declared.params, &run.params)
            .map_err(ApiError::InvalidArgument)?;
        let source = (String::new(), "uploaded source".to_owned());
        self.send(run, None, source, Some(source_digest)).await
    }

    async fn send(
        &self,
        run: TriggeredRun,
        at_commit: Option<FileAtCommit>,
        (commit, rev): (String, String),
        source_digest: Option<String>,
    ) -> Result<pb::Run, ApiError> {
        let (reply, answer) = oneshot::channel();
        let request = TriggerRequest {
            pipeline: run.pipeline,
            at_commit,
            commit,
            rev,
            triggered_by: run.triggered_by,
            source_digest,
            datasets: run.datasets,
            params: run.params,
            variables: run.variables,
            deliveries: run.deliveries,
            trigger_state: run.trigger_state,
            changed: run.changed,
        };
        self.events
            .send(Event::Trigger { request, reply })
            .await
            .map_err(|_| ApiError::ShuttingDown)?;
        answer.await.map_err(|_| ApiError::ShuttingDown)?
    }

    /// The pipeline's file at `commit`, read and parsed here, for a
    /// pipeline whose runs read it at their commit (`None` otherwise).
    /// What makes it unusable is the run's failure, not this call's: only
    /// a repository that cannot be read at all is an error.
    pub(crate) async fn file_at_commit(
        &self,
        pipeline: &PipelineRecord,
        commit: &str,
    ) -> Result<Option<FileAtCommit>, ApiError> {
        if pipeline.path.is_empty() {
            return Ok(None);
        }
        let path = pipeline.path.clone();
        let text = match self
            .repos
            .read_pipeline(&pipeline.repo, commit, &path)
            .await
        {
            Ok(Some(text)) => text,
            Ok(None) => {
                return Ok(Some(FileAtCommit {
                    read: Err(format!(
                        "{path}: there is no such file at commit {commit}; add it, or register the repository again with `kiln repo add --file` naming where the pipeline is"
                    )),
                    path,
                    digest: String::new(),
                }));
            }
            Err(ApiError::FailedPrecondition(reason)) => {
                return Ok(Some(FileAtCommit {
                    read: Err(reason),
                    path,
                    digest: String::new(),
                }));
            }
            Err(other) => return Err(other),
        };
        let digest = crate::repos::digest(&text);
        let parsed = self.parsed.parse(&path, &text, digest.clone());
        let read = match parsed {
            Ok(parsed) if parsed.name == pipeline.name => Ok((text, parsed)),
            Ok(parsed) => Err(format!(
                "{path}: at commit {commit} the file names pipeline `{}`, not `{}`; put `pipeline: {}` back, or add the repository again (`kiln repo add`) to register `{}` as a pipeline of its own",
                parsed.name, pipeline.name, pipeline.name, parsed.name
            )),
            Err(error) => Err(error.to_string()),
        };
        Ok(Some(FileAtCommit { path, digest, read }))
    }
}

/// Per pipeline: its triggers, parsed once per version, what they last did,
/// and the data watch.
struct Watched {
    /// The pipeline version `triggers` and `data` belong to.
    version: u32,
    triggers: Triggers,
    /// As stored; the watcher is its only writer, so it is read once and
    /// then kept up to date here.
    state: TriggerStateRecord,
    data: Option<DataPoll>,
    /// A slot whose run could not start (say, the branch is gone): not
    /// retried every tick, only at the next slot.
    failed_slot: Option<u64>,
    /// When the repository is polled next (`--poll`).
    next_ref_poll_ms: u64,
}

struct DataPoll {
    trigger: DataTrigger,
    watch: DataWatch,
    next_poll_ms: u64,
}

impl DataPoll {
    fn new(trigger: DataTrigger, state: &TriggerStateRecord) -> Self {
        Self {
            watch: DataWatch::new(state.data_digest.clone(), trigger.settle),
            trigger,
            next_poll_ms: 0,
        }
    }

    /// Forgets a settled digest that did not start a run, so a later poll
    /// settles it again.
    fn retry(&mut self, state: &TriggerStateRecord) {
        self.watch = DataWatch::new(state.data_digest.clone(), self.trigger.settle);
    }
}

/// What the watcher reads.
pub(crate) struct Watcher {
    /// Trigger states (last slot fired, last data digest).
    pub(crate) store: Arc<dyn Store>,
    pub(crate) blobs: Arc<BlobStore>,
    pub(crate) clock: Arc<dyn Clock>,
    /// The latest durable pipeline versions: looked at every tick, copied
    /// only when a pipeline got a new version.
    pub(crate) view: Arc<DurableView>,
    /// Each version's triggers, parsed once.
    pub(crate) parsed: Arc<ParsedPipelines>,
    /// Where runs' revisions and pipeline files are read.
    pub(crate) repos: Arc<Repos>,
    /// Writes the refs a poll saw (`poll`).
    pub(crate) writer: crate::commit::Writer,
}

/// Watches schedules and data until `stop`.
pub(crate) async fn run_watcher(
    watcher: Watcher,
    events: mpsc::Sender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let Watcher {
        store,
        blobs,
        clock,
        view,
        parsed,
        repos,
        writer,
    } = watcher;
    let starter = Starter {
        events,
        repos,
        parsed: parsed.clone(),
        store: store.clone(),
    };
    let mut watched: HashMap<String, Watched> = HashMap::new();
    let mut pipelines: Vec<Arc<PipelineRecord>> = Vec::new();
    let mut seen_generation = None;
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = ticks.tick() => {}
        }
        let generation = view.pipelines_generation();
        if seen_generation != Some(generation) {
            seen_generation = Some(generation);
            pipelines = view.pipelines();
        }
        for pipeline in &pipelines {
            let entry = match watched.entry(pipeline.name.clone()) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(slot) => match store.trigger_state(&pipeline.name) {
                    Ok(state) => slot.insert(Watched {
                        version: 0,
                        triggers: Triggers::default(),
                        state: state.unwrap_or_else(|| TriggerStateRecord {
                            pipeline: pipeline.name.clone(),
                            ..Default::default()
                        }),
                        data: None,
                        failed_slot: None,
                        next_ref_poll_ms: 0,
                    }),
                    Err(error) => {
                        tracing::error!(%error, pipeline = %pipeline.name, "cannot read trigger state");
                        continue;
                    }
                },
            };
            if entry.version != pipeline.version {
                entry.version = pipeline.version;
                entry.triggers = parsed
                    .get(pipeline)
                    .map(|parsed| parsed.triggers.clone())
                    .unwrap_or_default();
                entry.data = entry
                    .triggers
                    .data
                    .clone()
                    .map(|trigger| DataPoll::new(trigger, &entry.state));
            }
            let now = clock.now_ms();
            let last_fired = entry.state.last_fired_ms.unwrap_or(pipeline.registered_ms);
            if let Some(slot) = schedule::due(&entry.triggers.schedule, last_fired, now)
                && entry.failed_slot != Some(slot)
            {
                let expressions: Vec<&str> = entry
                    .triggers
                    .schedule
                    .iter()
                    .map(|s| s.expression())
                    .collect();
                let state = TriggerStateRecord {
                    last_fired_ms: Some(slot),
                    ..entry.state.clone()
                };
                let mut run = TriggeredRun::new(
                    (**pipeline).clone(),
                    None,
                    "schedule",
                    format!("schedule:{}", expressions.join(" | ")),
                );
                run.trigger_state = Some(state.clone());
                // The parameters of the schedule whose slot this is.
                run.params = entry
                    .triggers
                    .schedule
                    .iter()
                    .find(|schedule| schedule.due(last_fired, now) == Some(slot))
                    .map(|schedule| schedule.params.clone())
                    .unwrap_or_default();
                match starter.start(run).await {
                    Ok(run) => {
                        entry.state = state;
                        tracing::info!(pipeline = %pipeline.name, run = run.id, slot, "schedule started a run");
                    }
                    Err(error) => {
                        entry.failed_slot = Some(slot);
                        tracing::warn!(pipeline = %pipeline.name, %error, "a scheduled run could not start");
                    }
                }
                continue;
            }
            if let Some(data) = entry.data.as_mut()
                && now >= data.next_poll_ms
            {
                data.next_poll_ms = now + data.trigger.every.as_millis() as u64;
                if let Some(state) =
                    poll_data(&blobs, &starter, pipeline, &entry.state, data, now).await
                {
                    entry.state = state;
                }
            }
            if pipeline.poll_ms > 0 && now >= entry.next_ref_poll_ms {
                entry.next_ref_poll_ms = now + pipeline.poll_ms;
                if let Some(state) =
                    poll::poll_refs(&starter, pipeline, &entry.triggers, &entry.state).await
                {
                    let batch = crate::store::Batch {
                        ops: vec![crate::store::Op::TriggerState(state.clone())],
                    };
                    match writer.write(batch).await {
                        Ok(()) => entry.state = state,
                        Err(error) => {
                            tracing::warn!(pipeline = %pipeline.name, %error, "cannot record the polled refs");
                        }
                    }
                }
            }
        }
    }
}

/// One poll of a watched directory; starts a run when new content settled
/// and returns the trigger state written with it.
async fn poll_data(
    blobs: &Arc<BlobStore>,
    starter: &Starter,
    pipeline: &PipelineRecord,
    state: &TriggerStateRecord,
    data: &mut DataPoll,
    now: u64,
) -> Option<TriggerStateRecord> {
    let root = data.trigger.watch.clone();
    let digest = match tokio::task::spawn_blocking(move || digest_tree(&root)).await {
        Ok(Ok(tree)) if tree.n_files > 0 => tree.digest,
        // An empty or missing directory is nothing to train on yet.
        Ok(Ok(_)) => return None,
        Ok(Err(error)) => {
            tracing::debug!(pipeline = %pipeline.name, %error, "watched data is not readable");
            return None;
        }
        Err(error) => {
            tracing::error!(%error, "data digest panicked");
            return None;
        }
    };
    let settled = data.watch.observe(&digest, now)?;
    let snapshot = match dataset::snapshot(blobs, &data.trigger, &settled).await {
        Ok(Some(snapshot)) => snapshot,
        // Changed again while being copied: a later poll settles it.
        Ok(None) => {
            data.retry(state);
            return None;
        }
        Err(error) => {
            tracing::warn!(pipeline = %pipeline.name, %error, "cannot snapshot the watched data");
            data.retry(state);
            return None;
        }
    };
    let written = TriggerStateRecord {
        data_digest: Some(settled.clone()),
        ..state.clone()
    };
    let mut run = TriggeredRun::new(
        pipeline.clone(),
        None,
        "data",
        format!("data:{}", data.trigger.watch.display()),
    );
    run.datasets = vec![snapshot];
    run.trigger_state = Some(written.clone());
    match starter.start(run).await {
        Ok(run) => {
            tracing::info!(pipeline = %pipeline.name, run = run.id, digest = %settled, "new data started a run");
            Some(written)
        }
        Err(error) => {
            tracing::warn!(pipeline = %pipeline.name, %error, "a data-triggered run could not start");
            data.retry(state);
            None
        }
    }
}
