//! Artifact retention: which blobs are still wanted, and deleting the rest.
//!
//! Kept: the outputs and source snapshots of every unfinished run and of
//! every run that finished within `keep_days`. (Releases, once they exist,
//! keep theirs forever.) Everything else older than the grace period goes.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use tonic::Status;

use crate::blobs::{BlobStore, GC_GRACE, GcReport};
use crate::store::Store;

pub(crate) fn collect(
    store: &dyn Store,
    blobs: &BlobStore,
    keep_days: u32,
    dry_run: bool,
) -> Result<GcReport, Status> {
    // Anything used after this instant is kept whatever the scan finds.
    let scan_started = SystemTime::now();
    let now_ms = scan_started
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let keep_after_ms = now_ms.saturating_sub(u64::from(keep_days) * 24 * 3_600_000);
    let mut keep = HashSet::new();
    let internal = |error: crate::store::StoreError| Status::internal(error.to_string());
    for run in store.runs(None, usize::MAX).map_err(internal)? {
        let wanted = run
            .finished_ms
            .is_none_or(|finished| finished >= keep_after_ms);
        if !wanted {
            continue;
        }
        keep.extend(run.source_digest.clone());
        for stage in store.stages(run.id).map_err(internal)? {
            keep.extend(stage.outputs.into_iter().map(|output| output.digest));
        }
    }
    let cutoff = scan_started.checked_sub(GC_GRACE).unwrap_or(UNIX_EPOCH);
    let report = blobs
        .collect(&keep, cutoff, dry_run)
        .map_err(|error| Status::internal(format!("garbage collection failed: {error}")))?;
    tracing::info!(?report, keep_days, dry_run, "artifact garbage collection");
    Ok(report)
}
