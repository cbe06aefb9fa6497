//! Metric history: every monitor sample the engine stored (`S<release><at_ms>`)
//! and every release's metrics, read back for `kiln metrics`, and kept
//! bounded by a compactor task.
//!
//! Samples younger than a day are kept as taken. Older ones are thinned to
//! the first of each minute (a breaching one is kept in its place), and a
//! release keeps at most [`MAX_SAMPLES_PER_RELEASE`], its oldest going
//! first. The compactor only reads the store (on the blocking pool) and
//! writes removals through the group committer; the engine keeps writing
//! new samples meanwhile, which thinning never touches.

use std::sync::Arc;
use std::time::Duration;

use kiln_common::ids::EnvKey;
use tokio::sync::watch;

use crate::commit::Writer;
use crate::store::{Batch, MonitorSampleRecord, Op, ReleaseRecord, Store, StoreError};

/// Samples younger than this are kept as taken.
pub(crate) const FULL_RESOLUTION_MS: u64 = 24 * 3_600_000;
/// Older samples keep one per this much time.
const THINNED_EVERY_MS: u64 = 60_000;
/// The most samples one release keeps.
pub(crate) const MAX_SAMPLES_PER_RELEASE: usize = 20_000;
/// How often the compactor looks.
const COMPACT_EVERY: Duration = Duration::from_secs(3_600);
/// Removals per batch, so one compaction never holds the committer long.
const REMOVALS_PER_BATCH: usize = 1_000;

/// Which samples of one release go: `samples` in time order, `(at_ms,
/// breached)`. Pure, so the policy is tested without a store.
pub(crate) fn to_remove(samples: &[(u64, bool)], now_ms: u64) -> Vec<u64> {
    let old_before = now_ms.saturating_sub(FULL_RESOLUTION_MS);
    let mut remove = Vec::new();
    let mut kept = Vec::with_capacity(samples.len());
    // One per minute among the old ones: the first, unless a later one in
    // the same minute breached (then that one, so breaches stay visible).
    let mut i = 0;
    while i < samples.len() {
        let (at, _) = samples[i];
        if at >= old_before {
            kept.push(at);
            i += 1;
            continue;
        }
        let minute = at / THINNED_EVERY_MS;
        let end = samples[i..]
            .iter()
            .position(|&(t, _)| t >= old_before || t / THINNED_EVERY_MS != minute)
            .map_or(samples.len(), |n| i + n);
        let bucket = &samples[i..end];
        let keep = bucket
            .iter()
            .find(|(_, breached)| *breached)
            .unwrap_or(&bucket[0])
            .0;
        for &(t, _) in bucket {
            if t == keep {
                kept.push(t);
            } else {
                remove.push(t);
            }
        }
        i = end;
    }
    if kept.len() > MAX_SAMPLES_PER_RELEASE {
        remove.extend(&kept[..kept.len() - MAX_SAMPLES_PER_RELEASE]);
    }
    remove.sort_unstable();
    remove
}

/// The history of `environment` since `since_ms`: its releases (every one
/// created since then, and the one live now) and their monitor samples.
pub(crate) fn read(
    store: &dyn Store,
    environment: &EnvKey,
    since_ms: u64,
) -> Result<(Vec<ReleaseRecord>, Vec<MonitorSampleRecord>), StoreError> {
    let releases: Vec<ReleaseRecord> = store
        .releases()?
        .into_iter()
        .filter(|release| release.environment == *environment)
        .collect();
    let mut samples = Vec::new();
    for release in &releases {
        samples.extend(
            store
                .monitor_samples(release.id, usize::MAX)?
                .into_iter()
                .filter(|sample| sample.at_ms >= since_ms),
        );
    }
    samples.sort_by_key(|sample| (sample.at_ms, sample.release));
    let wanted: std::collections::BTreeSet<u64> = samples.iter().map(|s| s.release).collect();
    let releases = releases
        .into_iter()
        .filter(|release| {
            release.created_ms >= since_ms
                || release.state == crate::store::ReleaseState::Live
                || wanted.contains(&release.id)
        })
        .collect();
    Ok((releases, samples))
}

/// Thins every release's samples once an hour until `stop`.
pub(crate) async fn run_compactor(
    store: Arc<dyn Store>,
    writer: Writer,
    now_ms: impl Fn() -> u64,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(COMPACT_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let now = now_ms();
        let reader = store.clone();
        let removals = tokio::task::spawn_blocking(move || removals(reader.as_ref(), now)).await;
        let removals = match removals {
            Ok(Ok(removals)) => removals,
            Ok(Err(error)) => {
                tracing::error!(%error, "cannot read monitor samples to thin them");
                continue;
            }
            Err(_) => continue,
        };
        let total = removals.len();
        for chunk in removals.chunks(REMOVALS_PER_BATCH) {
            let batch = Batch {
                ops: chunk
                    .iter()
                    .map(|&(release, at_ms)| Op::RemoveMonitorSample { release, at_ms })
                    .collect(),
            };
            if let Err(error) = writer.write(batch).await {
                tracing::warn!(%error, "thinning monitor samples stopped");
                break;
            }
        }
        if total > 0 {
            tracing::info!(samples = total, "monitor history thinned");
        }
    }
}

fn removals(store: &dyn Store, now_ms: u64) -> Result<Vec<(u64, u64)>, StoreError> {
    let mut removals = Vec::new();
    for release in store.releases()? {
        let samples: Vec<(u64, bool)> = store
            .monitor_samples(release.id, usize::MAX)?
            .iter()
            .map(|s| (s.at_ms, s.breached))
            .collect();
        removals.extend(
            to_remove(&samples, now_ms)
                .into_iter()
                .map(|at| (release.id, at)),
        );
    }
    Ok(removals)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 10 * FULL_RESOLUTION_MS;

    #[test]
    fn the_last_day_is_kept_as_taken() {
        let samples: Vec<(u64, bool)> = (0..100).map(|i| (NOW - i * 1_000, false)).rev().collect();
        assert!(to_remove(&samples, NOW).is_empty());
    }

    #[test]
    fn older_samples_keep_one_a_minute_preferring_a_breach() {
        let start = NOW - 2 * FULL_RESOLUTION_MS;
        let start = start - start % THINNED_EVERY_MS;
        // Two minutes of a sample every 10 s; the fourth one breached.
        let samples: Vec<(u64, bool)> = (0..12).map(|i| (start + i * 10_000, i == 3)).collect();
        let removed = to_remove(&samples, NOW);
        let kept: Vec<u64> = samples
            .iter()
            .map(|&(t, _)| t)
            .filter(|t| !removed.contains(t))
            .collect();
        assert_eq!(kept, [start + 30_000, start + 60_000]);
    }

    #[test]
    fn a_release_keeps_at_most_the_newest_samples() {
        let samples: Vec<(u64, bool)> = (0..MAX_SAMPLES_PER_RELEASE as u64 + 5)
            .map(|i| (NOW - FULL_RESOLUTION_MS / 2 + i, false))
            .collect();
        let removed = to_remove(&samples, NOW);
        assert_eq!(removed, (0..5).map(|i| samples[i].0).collect::<Vec<_>>());
    }
}
