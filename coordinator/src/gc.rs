//! Retention: which finished runs a pipeline's `retention:` lets go
//! ([`expired_runs`]; the caller deletes them through the commit thread),
//! which blobs are still wanted, and deleting the rest.
//!
//! Kept: everything a release references (forever: a rollback may need it),
//! and the outputs and source snapshots of every unfinished run and of
//! every run that finished within `keep_days`, and the archives of shared
//! cache entries saved within `cache_keep_days`. Everything else older than
//! the grace period goes.
//!
//! [`Collector`] is one pass of all of that, for `kiln gc` and for the
//! coordinator's own periodic pass ([`run_periodic`], `--gc-every`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_common::ids::RunId;
use kiln_common::spec::Retention;
use kiln_proto::v1 as pb;
use tokio::sync::watch;
use tonic::Status;

use crate::blobs::{BlobStore, GC_GRACE, GcReport};
use crate::caches::Caches;
use crate::commit::Writer;
use crate::read::Reader;
use crate::store::{Batch, CacheRecord, Op, RunRecord, Store};

/// Runs deleted per commit batch: a large backlog is deleted in slices so
/// each batch stays small.
const RUNS_DELETED_PER_BATCH: usize = 16;

/// One garbage collection pass: retention's runs (deleted through the
/// commit thread), then unreferenced blobs and expired shared caches.
#[derive(Clone)]
pub(crate) struct Collector {
    pub(crate) reader: Reader,
    pub(crate) blobs: Arc<BlobStore>,
    pub(crate) writer: Writer,
    pub(crate) caches: Caches,
    /// Outputs of runs finished within this many days are kept, unless a
    /// request names its own.
    pub(crate) keep_days: u32,
}

impl Collector {
    /// Each pipeline's `retention:` policy, from its latest version.
    fn retention_policies(&self) -> HashMap<String, Retention> {
        let mut policies = HashMap::new();
        for record in self.reader.view().pipelines() {
            if let Ok(pipeline) = self.reader.parsed().get(&record)
                && let Some(retention) = pipeline.retention
            {
                policies.insert(record.name.clone(), retention);
            }
        }
        policies
    }

    /// One pass; `keep_days` 0 means the coordinator's own setting. A dry
    /// run reports what would go and changes nothing.
    pub(crate) async fn collect(
        &self,
        keep_days: u32,
        dry_run: bool,
    ) -> Result<pb::GcResponse, Status> {
        let keep_days = if keep_days == 0 {
            self.keep_days
        } else {
            keep_days
        };
        let store = self.reader.store().clone();
        let policies = self.retention_policies();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let expired_runs = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || expired_runs(&*store, &policies, now_ms))
                .await
                .map_err(|error| Status::internal(format!("retention panicked: {error}")))??
        };
        let runs_deleted: Vec<u64> = expired_runs.iter().map(|run| run.id.0).collect();
        if !dry_run {
            for chunk in expired_runs.chunks(RUNS_DELETED_PER_BATCH) {
                let mut batch = Batch::default();
                for run in chunk {
                    batch.push(Op::DeleteRun(run.id));
                }
                self.writer.write(batch).await?;
            }
            if !runs_deleted.is_empty() {
                tracing::info!(runs = runs_deleted.len(), "retention deleted finished runs");
            }
        }
        let dropped: HashSet<RunId> = expired_runs.iter().map(|run| run.id).collect();
        let cache_keep_days = self.caches.keep_days();
        let blobs = self.blobs.clone();
        let (report, expired_caches) = tokio::task::spawn_blocking(move || {
            collect(
                &*store,
                &blobs,
                keep_days,
                cache_keep_days,
                &dropped,
                dry_run,
            )
        })
        .await
        .map_err(|error| Status::internal(format!("garbage collection panicked: {error}")))??;
        let caches_expired = expired_caches.len() as u64;
        if !dry_run {
            self.caches.forget(expired_caches).await?;
        }
        Ok(pb::GcResponse {
            blobs_deleted: report.deleted,
            bytes_freed: report.freed,
            blobs_kept: report.kept,
            caches_expired,
            runs_deleted,
        })
    }
}

/// The coordinator's own garbage collection: a pass every `every` (the
/// first one `every` after start) until shutdown. A failed pass is logged
/// and the next one tries again; `kiln gc` can run one any time.
pub(crate) async fn run_periodic(
    collector: Collector,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        match collector.collect(0, false).await {
            Ok(report) => tracing::info!(
                runs_deleted = report.runs_deleted.len(),
                blobs_deleted = report.blobs_deleted,
                bytes_freed = report.bytes_freed,
                caches_expired = report.caches_expired,
                "periodic garbage collection"
            ),
            Err(status) => tracing::warn!(
                error = status.message(),
                "periodic garbage collection failed; the next pass tries again"
            ),
        }
    }
}

const DAY_MS: u64 = 24 * 3_600_000;

/// The finished runs each pipeline's `retention:` lets go (by pipeline
/// name), oldest first. Runs that made a release are never among them.
pub(crate) fn expired_runs(
    store: &dyn Store,
    policies: &HashMap<String, Retention>,
    now_ms: u64,
) -> Result<Vec<RunRecord>, Status> {
    let internal = |error: crate::store::StoreError| Status::internal(error.to_string());
    let released: HashSet<RunId> = store
        .releases()
        .map_err(internal)?
        .into_iter()
        .map(|release| release.run)
        .collect();
    let mut expired = Vec::new();
    for (pipeline, retention) in policies {
        let runs = store
            .runs(Some(pipeline), RunId(u64::MAX), usize::MAX)
            .map_err(internal)?;
        expired.extend(past_retention(runs, retention, &released, now_ms));
    }
    expired.sort_by_key(|run| run.id);
    Ok(expired)
}

/// Of one pipeline's runs (newest first), the finished ones past
/// `retention`: beyond the newest `runs` finished runs and finished more
/// than `days` ago (each only when set), and not released.
fn past_retention(
    runs: Vec<RunRecord>,
    retention: &Retention,
    released: &HashSet<RunId>,
    now_ms: u64,
) -> impl Iterator<Item = RunRecord> {
    let Retention {
        runs: keep_runs,
        days,
    } = *retention;
    let keep_after_ms = days.map(|days| now_ms.saturating_sub(u64::from(days) * DAY_MS));
    runs.into_iter()
        .filter(|run| run.finished_ms.is_some())
        .enumerate()
        .filter(move |(newer, run)| {
            let by_count = keep_runs.is_some_and(|n| *newer < n as usize);
            let by_age = keep_after_ms
                .is_some_and(|after| run.finished_ms.is_some_and(|finished| finished >= after));
            !by_count && !by_age && !released.contains(&run.id)
        })
        .map(|(_, run)| run)
}

/// Collects blobs nothing keeps; returns the report and the shared cache
/// entries that expired (the caller forgets them through the commit
/// thread, unless this is a dry run).
pub(crate) fn collect(
    store: &dyn Store,
    blobs: &BlobStore,
    keep_days: u32,
    cache_keep_days: u32,
    dropped_runs: &HashSet<RunId>,
    dry_run: bool,
) -> Result<(GcReport, Vec<CacheRecord>), Status> {
    // Anything used after this instant is kept whatever the scan finds.
    let scan_started = SystemTime::now();
    let now_ms = scan_started
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let keep_after_ms = now_ms.saturating_sub(u64::from(keep_days) * 24 * 3_600_000);
    let mut keep = HashSet::new();
    let internal = |error: crate::store::StoreError| Status::internal(error.to_string());
    for run in store
        .runs(None, RunId(u64::MAX), usize::MAX)
        .map_err(internal)?
    {
        let wanted = !dropped_runs.contains(&run.id)
            && run
                .finished_ms
                .is_none_or(|finished| finished >= keep_after_ms);
        if !wanted {
            continue;
        }
        keep.extend(run.source_digest.clone());
        keep.extend(run.datasets.iter().map(|dataset| dataset.digest.clone()));
        for stage in store.stages(run.id).map_err(internal)? {
            keep.extend(stage.outputs.into_iter().map(|output| output.digest));
        }
    }
    for release in store.releases().map_err(internal)? {
        // A release's dataset is part of its lineage: kept like its model.
        if let Some(run) = store.run(release.run).map_err(internal)? {
            keep.extend(run.datasets.into_iter().map(|dataset| dataset.digest));
        }
        keep.extend(release.source_digest);
        keep.extend(release.artifacts.into_iter().map(|a| a.artifact.digest));
    }
    let mut expired_caches = Vec::new();
    for entry in store.caches(None).map_err(internal)? {
        if crate::caches::expired(&entry, now_ms, cache_keep_days) {
            expired_caches.push(entry);
        } else {
            keep.extend(entry.archives.into_iter().map(|archive| archive.digest));
        }
    }
    let cutoff = scan_started.checked_sub(GC_GRACE).unwrap_or(UNIX_EPOCH);
    let report = blobs
        .collect(&keep, cutoff, dry_run)
        .map_err(|error| Status::internal(format!("garbage collection failed: {error}")))?;
    tracing::info!(
        ?report,
        keep_days,
        expired_caches = expired_caches.len(),
        dry_run,
        "artifact garbage collection"
    );
    Ok((report, expired_caches))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kiln_common::ids::{RunId, StageKey};

    use super::*;
    use crate::store::{
        ArtifactRecord, Batch, Op, ReleaseRecord, ReleaseState, RunRecord, RunState, SledStore,
        StageArtifact, StageRecord,
    };

    /// Stores `bytes` as a blob and ages it past the grace period.
    async fn old_blob(blobs: &BlobStore, dir: &std::path::Path, bytes: &[u8]) -> String {
        use sha2::{Digest, Sha256};
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        let parsed = crate::blobs::parse_digest(&digest).unwrap();
        let chunks = futures::stream::iter([Ok(bytes.to_vec())]);
        blobs
            .write(&parsed, bytes.len() as u64, chunks)
            .await
            .unwrap();
        let hex = &digest["sha256:".len()..];
        let path = dir.join("blobs/sha256").join(&hex[..2]).join(hex);
        let old = SystemTime::now() - GC_GRACE - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        digest
    }

    #[tokio::test]
    async fn release_artifacts_outlive_their_runs() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let blobs = BlobStore::open(dir.path(), 1 << 20).unwrap();
        let model = old_blob(&blobs, dir.path(), b"model").await;
        let scratch = old_blob(&blobs, dir.path(), b"scratch").await;
        let run = RunId(1);
        let mut batch = Batch::default();
        batch.push(Op::Run(RunRecord {
            // Finished long before any keep_days window.
            finished_ms: Some(1),
            ..RunRecord::for_test(run.0, "p", RunState::Succeeded)
        }));
        let mut stage = StageRecord::new(StageKey { run, idx: 0 }, "train", Vec::new());
        let output = |digest: &str| ArtifactRecord {
            path: "build".into(),
            digest: digest.into(),
            size: 1,
        };
        stage.outputs = vec![output(&model), output(&scratch)];
        batch.push(Op::Stage(stage));
        batch.push(Op::Release(ReleaseRecord {
            artifacts: vec![StageArtifact {
                stage: "train".into(),
                artifact: output(&model),
            }],
            created_ms: 1,
            state: ReleaseState::Superseded,
            ..ReleaseRecord::for_test(
                1,
                kiln_common::ids::EnvKey::of_pipeline("p", "production"),
                run.0,
            )
        }));
        store.apply(&batch).unwrap();
        let (report, _) = collect(&store, &blobs, 1, 7, &HashSet::new(), false).unwrap();
        assert_eq!((report.deleted, report.kept), (1, 1));
        let model = crate::blobs::parse_digest(&model).unwrap();
        let scratch = crate::blobs::parse_digest(&scratch).unwrap();
        assert!(
            blobs.stat(&model).is_some(),
            "a release still references the model"
        );
        assert!(
            blobs.stat(&scratch).is_none(),
            "an old run's other output is collected"
        );
    }

    fn finished(id: u64, finished_ms: Option<u64>) -> RunRecord {
        let state = if finished_ms.is_some() {
            RunState::Succeeded
        } else {
            RunState::Running
        };
        RunRecord {
            finished_ms,
            ..RunRecord::for_test(id, "p", state)
        }
    }

    #[test]
    fn retention_keeps_the_newest_runs_the_recent_ones_and_the_released() {
        let now = 100 * DAY_MS;
        // Newest first: 6 is unfinished, 5..1 finished a day apart.
        let runs = || {
            let mut runs = vec![finished(6, None)];
            runs.extend(
                (1..=5)
                    .rev()
                    .map(|id| finished(id, Some(now - (6 - id) * DAY_MS))),
            );
            runs
        };
        let ids = |retention: Retention, released: &[u64]| {
            let released = released.iter().map(|id| RunId(*id)).collect();
            past_retention(runs(), &retention, &released, now)
                .map(|run| run.id.0)
                .collect::<Vec<_>>()
        };
        let by_count = Retention {
            runs: Some(2),
            days: None,
        };
        assert_eq!(
            ids(by_count, &[]),
            [3, 2, 1],
            "unfinished 6 is never counted"
        );
        assert_eq!(ids(by_count, &[2]), [3, 1], "a released run stays");
        let by_age = Retention {
            runs: None,
            days: Some(3),
        };
        // Run 5 finished 1 day ago ... run 3 three days ago: kept.
        assert_eq!(ids(by_age, &[]), [2, 1]);
        let either = Retention {
            runs: Some(4),
            days: Some(1),
        };
        assert_eq!(ids(either, &[]), [1]);
    }
}
