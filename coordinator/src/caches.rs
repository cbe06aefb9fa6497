//! Shared stage caches (`cache: {..., shared: true}`): an index from a
//! pipeline's rendered cache key to the archives an agent saved, which are
//! ordinary blobs. Agents ask for an entry before a stage (`GetCache`) and
//! record one after a stage that missed it (`PutCache`, written through the
//! commit thread once every archive is in the blob store). An entry lives
//! `cache_keep_days` after it was saved: older ones are misses, and `kiln gc`
//! forgets them and lets their blobs go.

use std::sync::Arc;

use kiln_common::cache_key::MAX_KEY_LEN;
use kiln_proto::v1 as pb;
use tonic::Status;

use crate::blobs::{BlobStore, parse_digest};
use crate::commit::Writer;
use crate::store::{ArtifactRecord, Batch, CacheRecord, Op, Store};

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

    /// The live entry of `pipeline` under `key`, if any (read on the
    /// blocking pool).
    pub(crate) async fn get(
        &self,
        pipeline: &str,
        key: &str,
    ) -> Result<Option<CacheRecord>, Status> {
        let (store, pipeline, key) = (self.store.clone(), pipeline.to_owned(), key.to_owned());
        let found = tokio::task::spawn_blocking(move || store.cache(&pipeline, &key))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(internal)?;
        let keep_days = self.keep_days;
        Ok(found.filter(|entry| !expired(entry, now_ms(), keep_days)))
    }

    /// Records `entry`, saved by `agent`, once each of its archives is a
    /// stored blob of the size it claims.
    pub(crate) async fn put(&self, entry: pb::CacheEntry, agent: &str) -> Result<(), Status> {
        let record = record_of(entry, agent, now_ms())?;
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
    pub(crate) async fn clear(&self, pipeline: &str, key: &str) -> Result<u32, Status> {
        let entries = self.list(pipeline).await?;
        let mut batch = Batch::default();
        for entry in entries
            .iter()
            .filter(|entry| key.is_empty() || entry.key == key)
        {
            batch.push(Op::RemoveCache(entry.pipeline.clone(), entry.key.clone()));
        }
        let removed = batch.ops.len() as u32;
        if removed > 0 {
            self.writer.write(batch).await.map_err(Status::from)?;
        }
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
