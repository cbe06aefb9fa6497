//! Pipelines read at the commit a run builds.
//!
//! The file was read and parsed off the loop (`triggers::start_run`); here
//! it becomes the run's pipeline version — the version already stored
//! under its digest, or a new one — or, when it could not be read or
//! parsed, the run is created failed at once, its one stage named after
//! the file carrying the error as its reason and its log.

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_common::ids::{RunId, StageKey};
use kiln_common::spec;
use kiln_proto::v1 as pb;

use super::runs::RunSource;
use super::{Engine, PipelineSpec, Reply};
use crate::error::ApiError;
use crate::store::{
    DatasetRecord, DeliveryRecord, LogLine, LogStream, Op, PipelineRecord, RunRecord, RunState,
    StageRecord, StageState, StoredLog, TriggerStateRecord,
};
use crate::views;

/// The pipeline file as read at a run's commit, off the loop.
pub(crate) struct FileAtCommit {
    /// Its path inside the repository.
    pub(crate) path: String,
    /// "sha256:<hex>" of its text ("" when there was no text to read).
    pub(crate) digest: String,
    /// The text and its parse, or why no run can be built from it (file,
    /// line, column and what to change, for a parse error).
    pub(crate) read: Result<(String, Arc<spec::Pipeline>), String>,
}

/// Everything a new run is made of, resolved and read off the loop
/// (`triggers::Starter`).
pub(crate) struct TriggerRequest {
    pub(crate) pipeline: PipelineRecord,
    /// The pipeline file read at `commit`, for a pipeline whose runs read
    /// it there; `None` builds the registered version.
    pub(crate) at_commit: Option<FileAtCommit>,
    pub(crate) commit: String,
    pub(crate) rev: String,
    pub(crate) triggered_by: String,
    pub(crate) source_digest: Option<String>,
    pub(crate) datasets: Vec<DatasetRecord>,
    /// Checked against the file's `params:`, defaults filled in.
    pub(crate) params: BTreeMap<String, String>,
    /// `KILN_EVENT` and where they apply `KILN_BRANCH`, `KILN_TAG`,
    /// `KILN_MR_ID`.
    pub(crate) variables: BTreeMap<String, String>,
    /// Idempotency keys of the webhook delivery asking for the run: when
    /// one already started a run, this one starts nothing.
    pub(crate) deliveries: Vec<String>,
    /// Written with the run, atomically (schedule and data triggers).
    pub(crate) trigger_state: Option<TriggerStateRecord>,
    /// Paths `commit` changed since the branch's previous build, for
    /// `changes:`; `None`: everything (or no stage asks).
    pub(crate) changed: Option<Vec<String>>,
}

/// A run that could not start, as the refused run records it.
pub(super) struct Refusal {
    pub(super) commit: String,
    pub(super) rev: String,
    pub(super) triggered_by: String,
    pub(super) file: String,
    pub(super) digest: String,
    pub(super) reason: String,
    pub(super) variables: BTreeMap<String, String>,
}

impl Engine {
    /// Starts the run a trigger asked for — unless its webhook delivery
    /// already started one — as the version its file at the commit is, or
    /// failed at once when that file cannot be used.
    pub(super) fn trigger_request(&mut self, request: TriggerRequest, reply: Reply<pb::Run>) {
        let name = &request.pipeline.name;
        let seen = request
            .deliveries
            .iter()
            .find_map(|key| self.deliveries.get(&(name.clone(), key.clone())));
        if let Some(run) = seen {
            let error = ApiError::AlreadyExists(format!(
                "this delivery already started run {run}; it starts no other"
            ));
            self.reply(reply, Err(error));
            return;
        }
        let TriggerRequest {
            pipeline,
            at_commit,
            commit,
            rev,
            triggered_by,
            source_digest,
            datasets,
            params,
            variables,
            deliveries,
            trigger_state,
            changed,
        } = request;
        let (version, pipeline_digest) = match at_commit {
            None => (pipeline.version, String::new()),
            Some(FileAtCommit {
                path,
                digest,
                read: Ok((text, parsed)),
            }) => {
                // A merge request's source branch may share the name.
                let on_branch = variables.get("KILN_BRANCH") == Some(&pipeline.branch)
                    && !variables.contains_key("KILN_MR_ID");
                let version = self.version_at_commit(
                    &pipeline,
                    &path,
                    text,
                    digest.clone(),
                    parsed,
                    on_branch,
                );
                (version, digest)
            }
            Some(FileAtCommit {
                path,
                digest,
                read: Err(reason),
            }) => {
                let refusal = Refusal {
                    commit,
                    rev,
                    triggered_by,
                    file: path,
                    digest,
                    reason,
                    variables,
                };
                let run = self.refuse_run(&pipeline, refusal);
                self.after_trigger(&pipeline.name, RunId(run.id), deliveries, trigger_state);
                self.reply(reply, Ok(run));
                return;
            }
        };
        let source = RunSource {
            commit,
            rev,
            source_digest,
            pipeline_digest,
            params,
            variables,
            changed,
        };
        let result = self.trigger(&pipeline, version, source, triggered_by, datasets);
        if let Ok(run) = &result {
            self.after_trigger(&pipeline.name, *run, deliveries, trigger_state);
        }
        self.reply_run(reply, result);
    }

    /// What a started run spends, written in its batch: the schedule slot
    /// or data digest, and the delivery's keys.
    fn after_trigger(
        &mut self,
        pipeline: &str,
        run: RunId,
        deliveries: Vec<String>,
        trigger_state: Option<TriggerStateRecord>,
    ) {
        if let Some(state) = trigger_state {
            self.write(Op::TriggerState(state));
        }
        for key in deliveries {
            self.deliveries
                .insert((pipeline.to_owned(), key.clone()), run);
            self.write(Op::Delivery(DeliveryRecord {
                pipeline: pipeline.to_owned(),
                key,
                run,
            }));
        }
        self.expire_deliveries();
    }

    /// Keeps the remembered delivery keys (`W` records) bounded: past
    /// `max_delivery_keys`, the keys of the oldest runs go, down to nine
    /// tenths of it (so the sort runs once per tenth). A forgotten key
    /// lets a very late redelivery of the same delivery start a run again.
    pub(super) fn expire_deliveries(&mut self) {
        let cap = self.config.max_delivery_keys.max(1);
        if self.deliveries.len() <= cap {
            return;
        }
        let keep = cap - cap / 10;
        let mut by_age: Vec<(RunId, (String, String))> = self
            .deliveries
            .iter()
            .map(|(key, run)| (*run, key.clone()))
            .collect();
        by_age.sort();
        let expired = by_age.len() - keep;
        tracing::info!(
            expired,
            kept = keep,
            "forgetting the oldest webhook delivery keys"
        );
        for (_, key) in by_age.into_iter().take(expired) {
            self.deliveries.remove(&key);
            self.write(Op::RemoveDelivery(key.0, key.1));
        }
    }

    /// The version of `pipeline` whose file is `text`: the one stored
    /// under `digest`, or a new one with the current version's settings.
    ///
    /// `on_branch`: the run builds the registered branch, whose file is
    /// the pipeline's current version (its triggers, settings and page);
    /// when that file is not the current version, it becomes it — as a new
    /// version even when an older or side version holds the same file,
    /// since versions never change. Any other run's file is stored as a
    /// side version, for its runs only.
    pub(super) fn version_at_commit(
        &mut self,
        pipeline: &PipelineRecord,
        path: &str,
        text: String,
        digest: String,
        parsed: Arc<spec::Pipeline>,
        on_branch: bool,
    ) -> u32 {
        let key = (pipeline.name.clone(), digest.clone());
        let current = self.latest.get(&pipeline.name).unwrap_or(pipeline);
        if let Some(&version) = self.digests.get(&key)
            && (!on_branch || version == current.version)
        {
            return version;
        }
        let record = PipelineRecord {
            version: self.next_version(&pipeline.name),
            file_name: path.to_owned(),
            spec_yaml: text,
            path: path.to_owned(),
            digest,
            registered_ms: self.clock.now_ms(),
            side: !on_branch,
            ..current.clone()
        };
        tracing::info!(pipeline = %record.name, version = record.version, digest = %record.digest, side = record.side, "new pipeline version read at a run's commit");
        self.write(Op::Pipeline(record.clone()));
        if on_branch {
            self.view_update.pipelines.push(record.clone());
            self.latest.insert(record.name.clone(), record.clone());
        }
        self.top_version.insert(record.name.clone(), record.version);
        self.digests.insert(key, record.version);
        // Not durable yet, so `spec` could not read it back from the store.
        let spec = Arc::new(PipelineSpec::new(record.clone(), parsed));
        self.specs
            .insert((record.name.clone(), record.version), spec);
        record.version
    }

    /// Creates the run of `pipeline` already failed: its file at the
    /// commit cannot be read or parsed. One stage, named after the file,
    /// holds the reason as its message and its log.
    pub(super) fn refuse_run(&mut self, pipeline: &PipelineRecord, refusal: Refusal) -> pb::Run {
        let id = RunId(self.next_run_id);
        self.next_run_id += 1;
        let now = self.clock.now_ms();
        tracing::warn!(run = %id, pipeline = %pipeline.name, commit = %refusal.commit, reason = %refusal.reason, "run failed at once: its pipeline file cannot be used");
        let record = RunRecord {
            id,
            pipeline: pipeline.name.clone(),
            // No version: the file at this commit is no pipeline.
            pipeline_version: 0,
            commit: refusal.commit,
            rev: refusal.rev,
            state: RunState::Failed,
            triggered_by: refusal.triggered_by,
            created_ms: now,
            finished_ms: Some(now),
            source_digest: None,
            rollback: None,
            datasets: Vec::new(),
            pipeline_digest: refusal.digest,
            params: Default::default(),
            variables: refusal.variables,
            promote: None,
            group: None,
            waiting: false,
        };
        let key = StageKey { run: id, idx: 0 };
        let mut stage = StageRecord::new(key, &refusal.file, Vec::new());
        stage.state = StageState::Failed;
        stage.message = refusal.reason.clone();
        stage.started_ms = Some(now);
        stage.finished_ms = Some(now);
        for (seq, text) in refusal.reason.lines().enumerate() {
            self.write(Op::Log(StoredLog {
                key,
                attempt: stage.attempt,
                seq: seq as u64,
                line: LogLine {
                    stream: LogStream::System,
                    text: text.to_owned(),
                    at_ms: now,
                },
            }));
            stage.next_log_seq = seq as u64 + 1;
            stage.log_bytes += text.len() as u64;
        }
        self.write(Op::Stage(stage.clone()));
        self.write(Op::Run(record.clone()));
        let last = self.view_update.last_run.get_or_insert(id);
        *last = (*last).max(id);
        views::run(&record, &[stage])
    }
}
