//! [`Store`] on sled 0.34: one tree, JSON values, big-endian keys.
//!
//! sled is unmaintained since 2021, which is why it stays behind the trait.
//! Batches are applied with `apply_batch` (atomic, no closures to retry) and
//! made durable with an explicit `flush`; sled's own background flush runs
//! only every 500 ms and acknowledges nothing.

use std::ops::Bound;
use std::path::Path;
use std::sync::Mutex;

use kiln_common::ids::{RunId, StageKey};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    AuditRecord, Batch, CacheClearedRecord, CacheRecord, DeliveryRecord, EnvironmentRecord,
    LogLine, ModelAliasRecord, MonitorSampleRecord, Op, PipelineRecord, ProvenanceRecord, RawWrite,
    ReleaseRecord, Result, RunRecord, SecretRecord, StageRecord, Store, StoreError, StoredLog,
    TokenRecord, TriggerStateRecord, keys,
};

pub(crate) struct SledStore {
    db: sled::Db,
    /// While an online backup scans the store, every write `apply` makes
    /// is also recorded here (see `backup`).
    recording: Mutex<Option<Vec<RawWrite>>>,
}

impl SledStore {
    /// Opens (or creates) the database under `dir`.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir.join("state.sled"))
            // The page cache is the bulk of the coordinator's memory; hot
            // state lives in the engine, so a small cache is enough.
            .cache_capacity(64 * 1024 * 1024)
            .open()?;
        super::migrate::to_current(&db, dir)?;
        Ok(Self {
            db,
            recording: Mutex::new(None),
        })
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>> {
        self.db
            .get(key)?
            .map(|value| decode(key, &value))
            .transpose()
    }

    fn scan<T: DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<T>> {
        self.db
            .scan_prefix(prefix)
            .map(|entry| {
                let (key, value) = entry?;
                decode(&key, &value)
            })
            .collect()
    }
}

/// Writes keys and values as they are into a new store: restoring a
/// backup (`backup::restore`), before any coordinator opens it.
pub(crate) struct RawWriter {
    db: sled::Db,
}

impl RawWriter {
    pub(crate) fn create(dir: &Path) -> Result<Self> {
        let db = sled::Config::new().path(dir.join("state.sled")).open()?;
        Ok(Self { db })
    }

    /// Puts `value` at `key`, or removes `key` when `value` is `None`.
    pub(crate) fn write(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        match value {
            Some(value) => self.db.insert(key, value)?,
            None => self.db.remove(key)?,
        };
        Ok(())
    }

    /// Makes everything durable and closes the store.
    pub(crate) fn finish(self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

/// One batch's writes: the sled batch, and — only while a backup is
/// recording — the same writes as plain keys and values.
struct Writes {
    batch: sled::Batch,
    raw: Option<Vec<RawWrite>>,
}

impl Writes {
    fn new(recording: bool) -> Self {
        Self {
            batch: sled::Batch::default(),
            raw: recording.then(Vec::new),
        }
    }

    fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let (key, value) = (key.as_ref(), value.as_ref());
        self.batch.insert(key, value);
        if let Some(raw) = &mut self.raw {
            raw.push((key.to_vec(), Some(value.to_vec())));
        }
    }

    fn remove(&mut self, key: impl AsRef<[u8]>) {
        let key = key.as_ref();
        self.batch.remove(key);
        if let Some(raw) = &mut self.raw {
            raw.push((key.to_vec(), None));
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialize")
}

fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

impl Store for SledStore {
    fn apply(&self, batch: &Batch) -> Result<()> {
        // Held until the batch is applied and recorded, so a backup never
        // stops recording between the two: its scan could then see part
        // of a batch (the keys after where it was) whose other writes it
        // passed already and that the recording would lack.
        let mut recording = self.recording.lock().unwrap_or_else(|e| e.into_inner());
        let mut writes = Writes::new(recording.is_some());
        for op in &batch.ops {
            match op {
                Op::Release(record) => writes.insert(keys::release(record.id), encode(record)),
                Op::Environment(record) => {
                    writes.insert(keys::environment(&record.key), encode(record))
                }
                Op::Pipeline(record) => {
                    writes.insert(keys::pipeline(&record.name, record.version), encode(record));
                }
                Op::Run(record) => {
                    writes.insert(keys::run(record.id), encode(record));
                    if record.state.is_finished() {
                        writes.remove(keys::active(record.id));
                    } else {
                        writes.insert(keys::active(record.id), &[][..]);
                    }
                }
                Op::Stage(record) => writes.insert(keys::stage(record.key), encode(record)),
                Op::Log(log) => {
                    writes.insert(keys::log(log.key, log.attempt, log.seq), encode(&log.line));
                }
                Op::Token(record) => {
                    writes.insert(keys::named(keys::TOKEN, &record.name), encode(record));
                }
                Op::Secret(record) => {
                    writes.insert(keys::named(keys::SECRET, &record.name), encode(record));
                }
                Op::RemoveSecret(name) => writes.remove(keys::named(keys::SECRET, name)),
                Op::Cache(record) => {
                    writes.insert(keys::cache(&record.pipeline, &record.key), encode(record));
                }
                Op::RemoveCache(pipeline, key) => writes.remove(keys::cache(pipeline, key)),
                Op::CacheCleared(record) => {
                    writes.insert(
                        keys::cache_cleared(&record.pipeline, &record.key),
                        encode(record),
                    );
                }
                Op::RemoveCacheCleared(pipeline, key) => {
                    writes.remove(keys::cache_cleared(pipeline, key));
                }
                Op::ModelAlias(record) => {
                    writes.insert(
                        keys::model_alias(&record.model, &record.alias),
                        encode(record),
                    );
                }
                Op::RemoveModelAlias(model, alias) => {
                    writes.remove(keys::model_alias(model, alias));
                }
                Op::DeleteRun(run) => {
                    // The keys are listed before the batch is applied (a
                    // batch holds point writes only); the commit thread is
                    // the only writer, so none appears in between.
                    if self.db.contains_key(keys::active(*run))? {
                        tracing::warn!(%run, "not deleting a run that is unfinished again");
                        continue;
                    }
                    writes.remove(keys::run(*run));
                    for prefix in [keys::stages_of(*run), keys::logs_of_run(*run)] {
                        for key in self.db.scan_prefix(prefix).keys() {
                            writes.remove(key?);
                        }
                    }
                }
                Op::Audit(record) => writes.insert(keys::audit(record.id), encode(record)),
                Op::TriggerState(record) => {
                    writes.insert(
                        keys::named(keys::TRIGGER_STATE, &record.pipeline),
                        encode(record),
                    );
                }
                Op::Provenance(record) => {
                    writes.insert(keys::provenance(record.release), encode(record));
                }
                Op::Delivery(record) => {
                    writes.insert(
                        keys::delivery(&record.pipeline, &record.key),
                        encode(record),
                    );
                }
                Op::MonitorSample(record) => {
                    writes.insert(
                        keys::monitor_sample(record.release, record.at_ms),
                        encode(record),
                    );
                }
                Op::RemoveMonitorSample { release, at_ms } => {
                    writes.remove(keys::monitor_sample(*release, *at_ms));
                }
                Op::RemoveDelivery(pipeline, key) => writes.remove(keys::delivery(pipeline, key)),
                Op::CommitStatus(record) => {
                    writes.insert(
                        keys::named(keys::COMMIT_STATUS, &record.key()),
                        encode(record),
                    );
                }
                Op::RemoveCommitStatus(record) => {
                    // A point read; the commit thread is the only writer.
                    let key = keys::named(keys::COMMIT_STATUS, &record.key());
                    if self
                        .db
                        .get(&key)?
                        .is_some_and(|stored| *stored == encode(record)[..])
                    {
                        writes.remove(key);
                    }
                }
            }
        }
        self.db.apply_batch(writes.batch)?;
        // A backup that starts recording after this scans the whole batch.
        if let (Some(recorded), Some(raw)) = (recording.as_mut(), writes.raw) {
            recorded.extend(raw);
        }
        Ok(())
    }

    fn raw_page(&self, after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let entries = match after {
            Some(key) => self
                .db
                .range::<&[u8], _>((Bound::Excluded(key), Bound::Unbounded)),
            None => self.db.iter(),
        };
        entries
            .take(limit)
            .map(|entry| {
                let (key, value) = entry?;
                Ok((key.to_vec(), value.to_vec()))
            })
            .collect()
    }

    fn record_writes(&self, on: bool) -> Vec<RawWrite> {
        let mut recording = self.recording.lock().unwrap_or_else(|e| e.into_inner());
        let recorded = recording.take().unwrap_or_default();
        if on {
            *recording = Some(Vec::new());
        }
        recorded
    }

    fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn pipeline(&self, name: &str, version: u32) -> Result<Option<PipelineRecord>> {
        self.get(&keys::pipeline(name, version))
    }

    fn latest_pipelines(&self) -> Result<Vec<PipelineRecord>> {
        let mut latest: Vec<PipelineRecord> = Vec::new();
        for record in self.scan::<PipelineRecord>(&[keys::PIPELINE])? {
            if record.side {
                continue;
            }
            // Versions of one name are adjacent and ascending.
            match latest.last_mut() {
                Some(last) if last.name == record.name => *last = record,
                _ => latest.push(record),
            }
        }
        Ok(latest)
    }

    fn pipeline_versions(&self) -> Result<Vec<PipelineRecord>> {
        self.scan::<PipelineRecord>(&[keys::PIPELINE])
    }

    fn run(&self, id: RunId) -> Result<Option<RunRecord>> {
        self.get(&keys::run(id))
    }

    fn runs(&self, pipeline: Option<&str>, up_to: RunId, limit: usize) -> Result<Vec<RunRecord>> {
        let mut runs = Vec::new();
        if limit == 0 {
            return Ok(runs);
        }
        let first = keys::run(RunId(0));
        let last = keys::run(up_to);
        for entry in self.db.range(first..=last).rev() {
            let (key, value) = entry?;
            let run: RunRecord = decode(&key, &value)?;
            if pipeline.is_none_or(|name| name == run.pipeline) {
                runs.push(run);
                if runs.len() == limit {
                    break;
                }
            }
        }
        Ok(runs)
    }

    fn unfinished_runs(&self) -> Result<Vec<RunRecord>> {
        let mut runs = Vec::new();
        for entry in self.db.scan_prefix([keys::ACTIVE]) {
            let (key, _) = entry?;
            if let Some(run) = keys::run_of(&key).map(|id| self.run(id)).transpose()? {
                runs.extend(run);
            }
        }
        Ok(runs)
    }

    fn last_run_id(&self) -> Result<u64> {
        let last = self.db.scan_prefix([keys::RUN]).next_back().transpose()?;
        Ok(last
            .and_then(|(key, _)| keys::run_of(&key))
            .map_or(0, |id| id.0))
    }

    fn stages(&self, run: RunId) -> Result<Vec<StageRecord>> {
        self.scan(&keys::stages_of(run))
    }

    fn release(&self, id: u64) -> Result<Option<ReleaseRecord>> {
        self.get(&keys::release(id))
    }

    fn releases(&self) -> Result<Vec<ReleaseRecord>> {
        self.scan(&[keys::RELEASE])
    }

    fn environments(&self) -> Result<Vec<EnvironmentRecord>> {
        self.scan(&[keys::ENVIRONMENT])
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.scan(&[keys::TOKEN])
    }

    fn secret(&self, name: &str) -> Result<Option<SecretRecord>> {
        self.get(&keys::named(keys::SECRET, name))
    }

    fn secrets(&self) -> Result<Vec<SecretRecord>> {
        self.scan(&[keys::SECRET])
    }

    fn cache(&self, pipeline: &str, key: &str) -> Result<Option<CacheRecord>> {
        self.get(&keys::cache(pipeline, key))
    }

    fn caches(&self, pipeline: Option<&str>) -> Result<Vec<CacheRecord>> {
        match pipeline {
            Some(pipeline) => self.scan(&keys::cache(pipeline, "")),
            None => self.scan(&[keys::CACHE]),
        }
    }

    fn caches_cleared(&self, pipeline: &str) -> Result<Vec<CacheClearedRecord>> {
        self.scan(&keys::cache_cleared(pipeline, ""))
    }

    fn model_aliases(&self) -> Result<Vec<ModelAliasRecord>> {
        self.scan(&[keys::MODEL_ALIAS])
    }

    fn monitor_samples(&self, release: u64, limit: usize) -> Result<Vec<MonitorSampleRecord>> {
        let mut samples = self
            .db
            .scan_prefix(keys::monitor_samples(release))
            .rev()
            .take(limit)
            .map(|entry| {
                let (key, value) = entry?;
                decode(&key, &value)
            })
            .collect::<Result<Vec<MonitorSampleRecord>>>()?;
        samples.reverse();
        Ok(samples)
    }

    fn audit(&self, limit: usize) -> Result<Vec<AuditRecord>> {
        self.db
            .scan_prefix([keys::AUDIT])
            .rev()
            .take(limit)
            .map(|entry| {
                let (key, value) = entry?;
                decode(&key, &value)
            })
            .collect()
    }

    fn last_audit_id(&self) -> Result<u64> {
        let last = self.db.scan_prefix([keys::AUDIT]).next_back().transpose()?;
        Ok(last
            .and_then(|(key, _)| key.get(1..9).and_then(|id| id.try_into().ok()))
            .map_or(0, u64::from_be_bytes))
    }

    fn provenance(&self, release: u64) -> Result<Option<ProvenanceRecord>> {
        self.get(&keys::provenance(release))
    }

    fn deliveries(&self) -> Result<Vec<DeliveryRecord>> {
        self.scan::<DeliveryRecord>(&[keys::DELIVERY])
    }

    fn commit_statuses(&self) -> Result<Vec<crate::forge_status::CommitStatusRecord>> {
        self.scan(&[keys::COMMIT_STATUS])
    }

    fn trigger_state(&self, pipeline: &str) -> Result<Option<TriggerStateRecord>> {
        self.get(&keys::named(keys::TRIGGER_STATE, pipeline))
    }

    fn log_page(
        &self,
        key: StageKey,
        attempt: u32,
        from_seq: u64,
        below_seq: u64,
        max_lines: usize,
    ) -> Result<Vec<StoredLog>> {
        let mut logs = Vec::new();
        if from_seq >= below_seq {
            return Ok(logs);
        }
        let start = keys::log(key, attempt, from_seq);
        let end = keys::log(key, attempt, below_seq);
        for entry in self.db.range(start..end).take(max_lines) {
            let (raw_key, value) = entry?;
            let line: LogLine = decode(&raw_key, &value)?;
            let seq = keys::log_seq(&raw_key).unwrap_or_default();
            logs.push(StoredLog {
                key,
                attempt,
                seq,
                line,
            });
        }
        Ok(logs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{LogStream, RunState, StageState};

    fn run(id: u64, pipeline: &str, state: RunState) -> RunRecord {
        RunRecord {
            rev: String::new(),
            created_ms: id,
            ..RunRecord::for_test(id, pipeline, state)
        }
    }

    #[test]
    fn records_survive_reopen_and_scan_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            let mut batch = Batch::default();
            for id in [1, 2, 300] {
                batch.push(Op::Run(run(
                    id,
                    if id == 2 { "b" } else { "a" },
                    RunState::Running,
                )));
            }
            batch.push(Op::Run(run(1, "a", RunState::Succeeded)));
            let key = StageKey {
                run: RunId(2),
                idx: 0,
            };
            batch.push(Op::Stage(StageRecord {
                key,
                name: "build".into(),
                needs: Vec::new(),
                state: StageState::Running,
                attempt: 1,
                retries_used: 0,
                agent: Some("a1".into()),
                started_ms: None,
                finished_ms: None,
                exit_code: None,
                message: String::new(),
                next_log_seq: 2,
                log_bytes: 0,
                log_truncated: false,
                image_digest: None,
                outputs: Vec::new(),
                metrics: Default::default(),
                gate: None,
                gpus: vec![0],
                settled: false,
            }));
            for seq in [0, 1, 256] {
                batch.push(Op::Log(StoredLog {
                    key,
                    attempt: 1,
                    seq,
                    line: LogLine {
                        stream: LogStream::Stdout,
                        text: format!("line {seq}"),
                        at_ms: 0,
                    },
                }));
            }
            store.apply(&batch).unwrap();
            store.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.last_run_id().unwrap(), 300);
        let unfinished: Vec<_> = store
            .unfinished_runs()
            .unwrap()
            .iter()
            .map(|r| r.id.0)
            .collect();
        assert_eq!(unfinished, [2, 300]);
        let newest_a: Vec<_> = store
            .runs(Some("a"), RunId(u64::MAX), 10)
            .unwrap()
            .iter()
            .map(|r| r.id.0)
            .collect();
        assert_eq!(newest_a, [300, 1]);
        // Nothing above the watermark a reader passes.
        let below: Vec<_> = store
            .runs(None, RunId(2), 10)
            .unwrap()
            .iter()
            .map(|r| r.id.0)
            .collect();
        assert_eq!(below, [2, 1]);
        let key = StageKey {
            run: RunId(2),
            idx: 0,
        };
        let page = |from, below, max| -> Vec<u64> {
            store
                .log_page(key, 1, from, below, max)
                .unwrap()
                .iter()
                .map(|l| l.seq)
                .collect()
        };
        assert_eq!(page(1, u64::MAX, 100), [1, 256]);
        assert_eq!(page(0, 256, 100), [0, 1], "the bound is exclusive");
        assert_eq!(
            page(0, u64::MAX, 2),
            [0, 1],
            "a page holds at most max lines"
        );
        assert!(page(5, 5, 100).is_empty());
        assert!(store.log_page(key, 2, 0, u64::MAX, 100).unwrap().is_empty());
        assert_eq!(store.stages(RunId(2)).unwrap().len(), 1);
    }
}
