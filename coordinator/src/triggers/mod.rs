//! Runs nobody typed: cron schedules and watched data directories (this
//! task), and push webhooks (`webhook`, on the HTTP listener).
//!
//! The watcher wakes every [`TICK`], reads the latest version of every
//! pipeline, and starts a run when a schedule slot is due or watched data
//! has changed and settled. The slot or data digest that started a run is
//! written in the same batch as the run, so after a restart a slot never
//! fires twice; slots missed while the coordinator was down fire once,
//! for the latest of them (see `kiln_common::triggers::schedule`).

pub(crate) mod dataset;
pub(crate) mod webhook;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kiln_common::spec::{self, DataTrigger};
use kiln_common::triggers::data::{DataWatch, digest_tree};
use kiln_common::triggers::schedule;
use kiln_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot, watch};

use crate::blobs::BlobStore;
use crate::clock::Clock;
use crate::engine::Event;
use crate::error::ApiError;
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
}

/// Resolves the revision and starts the run; answers once it is durable.
pub(crate) async fn start_run(
    events: &mpsc::Sender<Event>,
    run: TriggeredRun,
) -> Result<pb::Run, ApiError> {
    let rev = run.rev.unwrap_or_else(|| run.pipeline.branch.clone());
    let commit =
        crate::control::resolve_commit(&run.pipeline.repo, &run.pipeline.branch, &rev).await?;
    let (reply, answer) = oneshot::channel();
    events
        .send(Event::Trigger {
            pipeline: run.pipeline,
            commit,
            rev,
            triggered_by: run.triggered_by,
            source_digest: None,
            datasets: run.datasets,
            trigger_state: run.trigger_state,
            reply,
        })
        .await
        .map_err(|_| ApiError::ShuttingDown)?;
    answer.await.map_err(|_| ApiError::ShuttingDown)?
}

/// Per pipeline: the data watch and when it is polled next.
struct Watched {
    /// The pipeline version the state belongs to.
    version: u32,
    data: Option<DataPoll>,
    /// A slot whose run could not start (say, the branch is gone): not
    /// retried every tick, only at the next slot.
    failed_slot: Option<u64>,
}

struct DataPoll {
    trigger: DataTrigger,
    watch: DataWatch,
    next_poll_ms: u64,
}

/// Watches schedules and data until `stop`.
pub(crate) async fn run_watcher(
    store: Arc<dyn Store>,
    blobs: Arc<BlobStore>,
    clock: Arc<dyn Clock>,
    events: mpsc::Sender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let mut watched: HashMap<String, Watched> = HashMap::new();
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = ticks.tick() => {}
        }
        let pipelines = match store.latest_pipelines() {
            Ok(pipelines) => pipelines,
            Err(error) => {
                tracing::error!(%error, "trigger watcher cannot read pipelines");
                continue;
            }
        };
        for pipeline in pipelines {
            let Ok(parsed) = spec::parse(&pipeline.file_name, &pipeline.spec_yaml) else {
                continue;
            };
            let triggers = parsed.triggers;
            if triggers.schedule.is_empty() && triggers.data.is_none() {
                watched.remove(&pipeline.name);
                continue;
            }
            let state = match store.trigger_state(&pipeline.name) {
                Ok(state) => state.unwrap_or_else(|| TriggerStateRecord {
                    pipeline: pipeline.name.clone(),
                    ..Default::default()
                }),
                Err(error) => {
                    tracing::error!(%error, pipeline = %pipeline.name, "cannot read trigger state");
                    continue;
                }
            };
            let entry = watched
                .entry(pipeline.name.clone())
                .or_insert_with(|| Watched {
                    version: 0,
                    data: None,
                    failed_slot: None,
                });
            if entry.version != pipeline.version {
                entry.version = pipeline.version;
                entry.data = triggers.data.clone().map(|trigger| DataPoll {
                    watch: DataWatch::new(state.data_digest.clone(), trigger.settle),
                    trigger,
                    next_poll_ms: 0,
                });
            }
            let now = clock.now_ms();
            let last_fired = state.last_fired_ms.unwrap_or(pipeline.registered_ms);
            if let Some(slot) = schedule::due(&triggers.schedule, last_fired, now)
                && entry.failed_slot != Some(slot)
            {
                let expressions: Vec<&str> =
                    triggers.schedule.iter().map(|s| s.expression()).collect();
                let run = TriggeredRun {
                    pipeline: pipeline.clone(),
                    rev: None,
                    triggered_by: format!("schedule:{}", expressions.join(" | ")),
                    datasets: Vec::new(),
                    trigger_state: Some(TriggerStateRecord {
                        last_fired_ms: Some(slot),
                        ..state.clone()
                    }),
                };
                match start_run(&events, run).await {
                    Ok(run) => {
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
                poll_data(&blobs, &events, &pipeline, &state, data, now).await;
            }
        }
    }
}

/// One poll of a watched directory; starts a run when new content settled.
async fn poll_data(
    blobs: &Arc<BlobStore>,
    events: &mpsc::Sender<Event>,
    pipeline: &PipelineRecord,
    state: &TriggerStateRecord,
    data: &mut DataPoll,
    now: u64,
) {
    let root = data.trigger.watch.clone();
    let digest = match tokio::task::spawn_blocking(move || digest_tree(&root)).await {
        Ok(Ok(tree)) if tree.n_files > 0 => tree.digest,
        // An empty or missing directory is nothing to train on yet.
        Ok(Ok(_)) => return,
        Ok(Err(error)) => {
            tracing::debug!(pipeline = %pipeline.name, %error, "watched data is not readable");
            return;
        }
        Err(error) => {
            tracing::error!(%error, "data digest panicked");
            return;
        }
    };
    let Some(settled) = data.watch.observe(&digest, now) else {
        return;
    };
    let snapshot = match dataset::snapshot(blobs, &data.trigger, &settled).await {
        Ok(Some(snapshot)) => snapshot,
        // Changed again while being copied: a later poll settles it.
        Ok(None) => {
            data.watch = DataWatch::new(state.data_digest.clone(), data.trigger.settle);
            return;
        }
        Err(error) => {
            tracing::warn!(pipeline = %pipeline.name, %error, "cannot snapshot the watched data");
            data.watch = DataWatch::new(state.data_digest.clone(), data.trigger.settle);
            return;
        }
    };
    let run = TriggeredRun {
        pipeline: pipeline.clone(),
        rev: None,
        triggered_by: format!("data:{}", data.trigger.watch.display()),
        datasets: vec![snapshot],
        trigger_state: Some(TriggerStateRecord {
            data_digest: Some(settled.clone()),
            ..state.clone()
        }),
    };
    match start_run(events, run).await {
        Ok(run) => {
            tracing::info!(pipeline = %pipeline.name, run = run.id, digest = %settled, "new data started a run")
        }
        Err(error) => {
            tracing::warn!(pipeline = %pipeline.name, %error, "a data-triggered run could not start");
            data.watch = DataWatch::new(state.data_digest.clone(), data.trigger.settle);
        }
    }
}
