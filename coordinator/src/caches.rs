//! Shared stage caches (`cache: {..., shared: true}`): an index from a
//! pipeline's rendered cache key to the archives an agent saved, which are
//! ordinary blobs. Agents ask for an entry before a stage (`GetCache`) and
//! record one after a stage that missed it (`PutCache`, written through the
//! commit thread once every archive is in the blob store). An entry lives
//! `cache_keep_days` after it was saved: older ones are misses, and `kiln gc`
//! forgets them and lets their blobs go.
//!
//! `kiln cache clear` also reaches what agents keep on their own disks: it
//! records a clear marker whose generation only grows, `GetCache` tells an
//! agent the generation in force for a key, and an agent drops (instead of
//! restoring) a copy it saved under an older one. An agent that was offline
//! during the clear learns it at its next lookup. A `PutCache` of an entry
//! looked up before a clear is refused.

use std::sync::Arc;

use kiln_common::cache_key::MAX_KEY_LEN;
use kiln_proto::v1 as pb;
use tonic::Status;

use crate::blobs::{BlobStore, parse_digest};
use crate::commit::Writer;
use crate::store::{ArtifactRecord, Batch, CacheClearedRecord, CacheRecord, Op, Store};

/// Most archives (cache paths) one entry may have.
const MAX_ARCHIVES: usize = 16;
const DAY_MS: u64 = 24 * 3_600_000;

/// The index, as the artifact service and the control service use it.
#[derive(Clone)]
pub(crate) struct Caches {
    store: Arc<dyn Store>,
    writer: Writer,
    blobs: Arc<BlobStore>,
    /// An entry older than this many days is a miss, and `kiln gc` drops it.
    keep_days: u32,
}

impl Caches {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        writer: Writer,
        blobs: Arc<BlobStore>,
        keep_days: u32,
    ) -> Self {
        Self {
            store,
            writer,
            blobs,
            keep_days,
        }
    }

    /// The live entry of `pipeline` under `key`, if any, and the clear
    /// generation in force for the key (0: never cleared). Read on the
    /// blocking pool.
    pub(crate) async fn get(
        &self,
        pipeline: &str,
        key: &str,
    ) -> Result<(Option<CacheRecord>, u64), Status> {
        let (store, pipeline, key) = (self.store.clone(), pipeline.to_owned(), key.to_owned());
        let (found, generation) = tokio::task::spawn_blocking(move || {
            let generation = generation_of(&store.caches_cleared(&pipeline)?, &key);
            Ok::<_, crate::store::StoreError>((store.cache(&pipeline, &key)?, generation))
        })
        .await
        .map_err(|error| Status::internal(error.to_string()))?
        .map_err(internal)?;
        let keep_days = self.keep_days;
        Ok((
            found.filter(|entry| !expired(entry, now_ms(), keep_days)),
            generation,
        ))
    }

    /// Records `entry`, saved by `agent` under clear generation
    /// `generation`, once each of its archives is a stored blob of the size
    /// it claims. An entry looked up before the key was last cleared is
    /// refused: it may hold what the clear meant to remove.
    pub(crate) async fn put(
        &self,
        entry: pb::CacheEntry,
        generation: u64,
        agent: &str,
    ) -> Result<(), Status> {
        let record = record_of(entry, agent, now_ms())?;
        let (_, in_force) = self.get(&record.pipeline, &record.key).await?;
        if generation < in_force {
            return Err(Status::failed_precondition(format!(
                "cache `{}` of pipeline {} was cleared after this copy was looked up; not shared",
                record.key, record.pipeline
            )));
        }
        for archive in &record.archives {
            let digest = parse_digest(&archive.digest)?;
            match self.blobs.stat(&digest) {
                Some(size) if size == archive.size => {}
                Some(size) => {
                    return Err(Status::invalid_argument(format!(
                        "cache archive {} is {size} bytes, not the {} the entry says",
                        archive.digest, archive.size
                    )));
                }
                None => {
                    return Err(Status::failed_precondition(format!(
                        "cache archive {} is not uploaded; upload it first",
                        archive.digest
                    )));
                }
            }
        }
        let mut batch = Batch::default();
        batch.push(Op::Cache(record));
        self.writer.write(batch).await.map_err(Status::from)
    }

    /// Entries of `pipeline` (every pipeline's for ""), newest first.
    pub(crate) async fn list(&self, pipeline: &str) -> Result<Vec<CacheRecord>, Status> {
        let (store, pipeline) = (self.store.clone(), pipeline.to_owned());
        let mut entries = tokio::task::spawn_blocking(move || {
            store.caches((!pipeline.is_empty()).then_some(pipeline.as_str()))
        })
        .await
        .map_err(|error| Status::internal(error.to_string()))?
        .map_err(internal)?;
        entries.sort_by_key(|entry| std::cmp::Reverse(entry.created_ms));
        Ok(entries)
    }

    /// Forgets the entries of `pipeline` (under `key` only, unless "");
    /// returns how many.
    /// Agents' own copies are dropped at their next lookup: the clear
    /// marker is written in the same batch.
    pub(crate) async fn clear(&self, pipeline: &str, key: &str) -> Result<u32, Status> {
        let entries = self.list(pipeline).await?;
        let markers = {
            let (store, pipeline) = (self.store.clone(), pipeline.to_owned());
            tokio::task::spawn_blocking(move || store.caches_cleared(&pipeline))
                .await
                .map_err(|error| Status::internal(error.to_string()))?
                .map_err(internal)?
        };
        let mut batch = Batch::default();
        for entry in entries
            .iter()
            .filter(|entry| key.is_empty() || entry.key == key)
        {
            batch.push(Op::RemoveCache(entry.pipeline.clone(), entry.key.clone()));
        }
        let removed = batch.ops.len() as u32;
        // A whole-pipeline clear makes every key's own marker redundant.
        if key.is_empty() {
            for marker in markers.iter().filter(|marker| !marker.key.is_empty()) {
                batch.push(Op::RemoveCacheCleared(
                    marker.pipeline.clone(),
                    marker.key.clone(),
                ));
            }
        }
        let newest = markers.iter().map(|marker| marker.generation).max();
        batch.push(Op::CacheCleared(CacheClearedRecord {
            pipeline: pipeline.to_owned(),
            key: key.to_owned(),
            generation: now_ms().max(newest.map_or(0, |newest| newest + 1)),
        }));
        self.writer.write(batch).await.map_err(Status::from)?;
        Ok(removed)
    }

    /// Forgets the expired entries `gc` found.
    pub(crate) async fn forget(&self, expired: Vec<CacheRecord>) -> Result<(), Status> {
        if expired.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::default();
        for entry in expired {
            batch.push(Op::RemoveCache(entry.pipeline, entry.key));
        }
        self.writer.write(batch).await.map_err(Status::from)
    }

    pub(crate) fn keep_days(&self) -> u32 {
        self.keep_days
    }
}

/// The clear generation in force for `key`: its own marker's or the whole
/// pipeline's, whichever is newer; 0 when neither exists.
fn generation_of(markers: &[CacheClearedRecord], key: &str) -> u64 {
    markers
        .iter()
        .filter(|marker| marker.key.is_empty() || marker.key == key)
        .map(|marker| marker.generation)
        .max()
        .unwrap_or(0)
}

/// Whether `entry` is past `keep_days` at `now_ms`.
pub(crate) fn expired(entry: &CacheRecord, now_ms: u64, keep_days: u32) -> bool {
    entry.created_ms < now_ms.saturating_sub(u64::from(keep_days) * DAY_MS)
}

pub(crate) fn view(entry: &CacheRecord) -> pb::CacheEntry {
    pb::CacheEntry {
        pipeline: entry.pipeline.clone(),
        key: entry.key.clone(),
        archives: entry
            .archives
            .iter()
            .map(|archive| pb::CacheArchive {
                path: archive.path.clone(),
                digest: archive.digest.clone(),
                size: archive.size,
            })
            .collect(),
        created_ms: entry.created_ms,
        agent: entry.agent.clone(),
    }
}

/// Checks what an agent sent: a pipeline and a key like the ones a spec
/// renders, and a bounded list of archives with valid digests.
fn record_of(entry: pb::CacheEntry, agent: &str, now_ms: u64) -> Result<CacheRecord, Status> {
    let key_ok = !entry.key.is_empty()
        && entry.key.len() <= MAX_KEY_LEN
        && entry
            .key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if entry.pipeline.is_empty() || !key_ok {
        return Err(Status::invalid_argument(format!(
            "a cache entry needs a pipeline and a key of letters, digits, `.`, `_` and `-` (at \
             most {MAX_KEY_LEN}); got pipeline `{}`, key `{}`",
            entry.pipeline, entry.key
        )));
    }
    if entry.archives.is_empty() || entry.archives.len() > MAX_ARCHIVES {
        return Err(Status::invalid_argument(format!(
            "a cache entry has 1 to {MAX_ARCHIVES} archives; got {}",
            entry.archives.len()
        )));
    }
    let archives = entry
        .archives
        .into_iter()
        .map(|archive| {
            parse_digest(&archive.digest)?;
            Ok(ArtifactRecord {
                path: archive.path,
                digest: archive.digest,
                size: archive.size,
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    Ok(CacheRecord {
        pipeline: entry.pipeline,
        key: entry.key,
        archives,
        created_ms: now_ms,
        agent: agent.to_owned(),
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn internal(error: crate::store::StoreError) -> Status {
    tracing::error!(%error, "cache index read failed");
    Status::internal("the cache index cannot be read")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::Committer;
    use crate::store::SledStore;

    fn open(dir: &std::path::Path) -> Caches {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.join("db")).unwrap());
        let (committer, _thread) = Committer::start(store.clone(), |_| {});
        let blobs = Arc::new(BlobStore::open(dir, 1 << 20).unwrap());
        Caches::new(store, Writer::new(committer), blobs, 7)
    }

    /// An entry under `key` whose one archive is a stored blob.
    fn entry(caches: &Caches, key: &str) -> pb::CacheEntry {
        let blob = caches
            .blobs
            .store_with(|out: &mut dyn std::io::Write| out.write_all(b"wheels"))
            .unwrap();
        pb::CacheEntry {
            pipeline: "p".into(),
            key: key.into(),
            archives: vec![pb::CacheArchive {
                path: ".cache".into(),
                digest: blob.digest.to_string(),
                size: blob.size,
            }],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn clears_raise_the_generation_and_refuse_entries_looked_up_before_them() {
        let dir = tempfile::tempdir().unwrap();
        let caches = open(dir.path());
        assert_eq!(caches.get("p", "a").await.unwrap().1, 0, "never cleared");

        caches.clear("p", "a").await.unwrap();
        let (_, a1) = caches.get("p", "a").await.unwrap();
        assert!(a1 > 0);
        assert_eq!(caches.get("p", "b").await.unwrap().1, 0, "only key a");
        let refused = caches
            .put(entry(&caches, "a"), 0, "agent")
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.message().contains("cleared after"), "{refused}");
        caches.put(entry(&caches, "a"), a1, "agent").await.unwrap();

        // A clear of the whole pipeline covers every key, grows even when
        // the clock has not moved, and makes key a's own marker redundant.
        caches.clear("p", "").await.unwrap();
        let (found, all) = caches.get("p", "b").await.unwrap();
        assert!(all > a1, "{all} > {a1}");
        assert_eq!(caches.get("p", "a").await.unwrap(), (None, all));
        assert!(found.is_none());
        let markers = caches.store.caches_cleared("p").unwrap();
        assert_eq!(markers.len(), 1, "{markers:?}");
        assert_eq!(generation_of(&markers, "anything"), all);
    }
}
