//! Stage caches (`cache: {key, paths, shared}`) on this agent: restored
//! into the workspace before the commands, saved after they succeed when
//! the key was a miss (a key's content never changes once saved, so a hit
//! saves nothing).
//!
//! Each entry is a directory under `work_dir/stage-cache` (`work_dir/cache`
//! is the clone cache), named by a digest of
//! (pipeline, rendered key), holding one archive per path (`0.tar.zst`, ...)
//! and `entry.json`, which is written last and whose modification time is
//! the entry's last use. After every save the least recently used entries
//! go until the whole cache fits `--cache-max-bytes`. A `shared` cache is
//! also looked up in, and saved to, the coordinator's index and blob store,
//! so an agent that never ran the stage gets it. Anything that goes wrong
//! with a cache is logged and the stage runs without it: a cache only ever
//! saves time.
//!
//! Every lookup first asks the coordinator (`GetCache`) for the key's
//! `kiln cache clear` generation; an entry of this agent saved under an
//! older generation is removed instead of restored, so a clear reaches
//! every agent's own copies, even an agent offline when it was made.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use kiln_common::archive::{self, HashingWriter, Limits};
use kiln_common::cache_key::CacheKey;
use kiln_common::channel::KilnChannel;
use kiln_proto::v1 as pb;
use kiln_proto::v1::artifact_service_client::ArtifactServiceClient;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::logs::LogSink;
use crate::transfer;

/// What one restored cache may unpack to.
const LIMITS: Limits = Limits {
    max_bytes: 64 << 30,
    max_entries: 10_000_000,
};
const ENTRY_FILE: &str = "entry.json";

/// This agent's caches.
pub(crate) struct Caches {
    /// `work_dir/stage-cache`.
    dir: PathBuf,
    /// The most all entries together may take; the least recently used go.
    max_bytes: u64,
    /// One save (and eviction) at a time; restores run freely.
    saving: Mutex<()>,
    /// Names temporary directories uniquely.
    n_tmp: AtomicU64,
}

/// What `entry.json` says.
#[derive(Debug, Serialize, Deserialize)]
struct EntryFile {
    pipeline: String,
    key: String,
    /// The path each archive holds, in archive order.
    paths: Vec<String>,
    /// Digests and sizes of the archives, in the same order.
    archives: Vec<(String, u64)>,
    /// The clear generation in force when the entry was looked up (0:
    /// never cleared, or saved before generations were recorded).
    #[serde(default)]
    generation: u64,
}

/// A stage's cache once its key is rendered.
pub(crate) struct Lookup {
    pipeline: String,
    key: String,
    paths: Vec<String>,
    shared: bool,
    /// The clear generation the coordinator gave for the key.
    generation: u64,
    /// Whether it was restored: a hit is not saved again.
    pub(crate) hit: bool,
}

impl Caches {
    pub(crate) async fn open(work_dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let dir = work_dir.join("stage-cache");
        tokio::fs::create_dir_all(&dir).await?;
        // Leftovers of saves a crash interrupted.
        let mut entries = tokio::fs::read_dir(&dir).await?;
        while let Some(entry) = entries.next_entry().await? {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = tokio::fs::remove_dir_all(entry.path()).await;
            }
        }
        Ok(Self {
            dir,
            max_bytes,
            saving: Mutex::new(()),
            n_tmp: AtomicU64::new(0),
        })
    }

    /// Renders the key of `cache` in `dir` and restores the entry into
    /// `dir`, from this agent or (when shared) the coordinator. `None`: the
    /// stage has no usable cache.
    pub(crate) async fn restore(
        &self,
        pipeline: &str,
        cache: &pb::StageCache,
        dir: &Path,
        client: &mut ArtifactServiceClient<KilnChannel>,
        log: &LogSink,
    ) -> Option<Lookup> {
        let rendered = CacheKey::parse(&cache.key).and_then(|key| key.render(dir));
        let key = match rendered {
            Ok(key) => key,
            Err(why) => {
                log.system(format!("cache: {why}; running without it"))
                    .await;
                return None;
            }
        };
        let asked = client
            .get_cache(pb::GetCacheRequest {
                pipeline: pipeline.to_owned(),
                key: key.clone(),
            })
            .await;
        let (shared_entry, generation) = match asked {
            Ok(answer) => {
                let answer = answer.into_inner();
                (answer.entry, answer.cleared_generation)
            }
            Err(status) => {
                // Whether the key was cleared is unknown: no copy is used.
                log.system(format!(
                    "cache `{key}`: cannot ask the coordinator about it ({}); running without it",
                    status.message()
                ))
                .await;
                return None;
            }
        };
        let mut lookup = Lookup {
            pipeline: pipeline.to_owned(),
            key,
            paths: cache.paths.clone(),
            shared: cache.shared,
            generation,
            hit: false,
        };
        let local = self.entry_dir(pipeline, &lookup.key);
        if entry_generation(&local)
            .await
            .is_some_and(|saved| saved < generation)
        {
            log.system(format!(
                "cache `{}`: this agent's copy was cleared by `kiln cache clear`; removing it",
                lookup.key
            ))
            .await;
            let _saving = self.saving.lock().await;
            let _ = tokio::fs::remove_dir_all(&local).await;
        }
        match unpack_entry(&local, dir).await {
            Ok(Some(files)) => {
                touch(&local.join(ENTRY_FILE));
                log.system(format!(
                    "cache `{}`: restored from this agent ({files} files)",
                    lookup.key
                ))
                .await;
                lookup.hit = true;
                return Some(lookup);
            }
            Ok(None) => {}
            Err(why) => {
                log.system(format!(
                    "cache `{}`: cannot restore this agent's copy ({why}); removing it",
                    lookup.key
                ))
                .await;
                let _ = tokio::fs::remove_dir_all(&local).await;
            }
        }
        if let (true, Some(shared)) = (lookup.shared, shared_entry) {
            match self.fetch_shared(&lookup, shared, dir, client).await {
                Ok((files, agent)) => {
                    log.system(format!(
                        "cache `{}`: restored from the coordinator, saved by {agent} ({files} files)",
                        lookup.key
                    ))
                    .await;
                    lookup.hit = true;
                    return Some(lookup);
                }
                Err(why) => {
                    log.system(format!(
                        "cache `{}`: cannot fetch the shared copy ({why})",
                        lookup.key
                    ))
                    .await;
                }
            }
        }
        log.system(format!(
            "cache `{}`: miss; saved after the stage succeeds",
            lookup.key
        ))
        .await;
        Some(lookup)
    }

    /// Packs the cache's paths out of `dir` into an entry of this agent and,
    /// when shared, uploads it and records it at the coordinator.
    pub(crate) async fn save(
        &self,
        lookup: &Lookup,
        dir: &Path,
        client: &mut ArtifactServiceClient<KilnChannel>,
        log: &LogSink,
    ) {
        let _saving = self.saving.lock().await;
        let entry = self.entry_dir(&lookup.pipeline, &lookup.key);
        let saved = self.pack_entry(lookup, dir, &entry).await;
        let file = match saved {
            Ok(Some(file)) => file,
            Ok(None) => {
                log.system(format!(
                    "cache `{}`: none of its paths exist; nothing saved",
                    lookup.key
                ))
                .await;
                return;
            }
            Err(why) => {
                log.system(format!("cache `{}`: not saved: {why}", lookup.key))
                    .await;
                return;
            }
        };
        let size: u64 = file.archives.iter().map(|(_, size)| size).sum();
        log.system(format!(
            "cache `{}`: saved on this agent ({size} bytes packed)",
            lookup.key
        ))
        .await;
        self.evict().await;
        if lookup.shared {
            match share(&entry, &file, client).await {
                Ok(()) => {
                    log.system(format!(
                        "cache `{}`: shared through the coordinator",
                        lookup.key
                    ))
                    .await;
                }
                Err(why) => {
                    log.system(format!("cache `{}`: not shared: {why}", lookup.key))
                        .await;
                }
            }
        }
    }

    fn entry_dir(&self, pipeline: &str, key: &str) -> PathBuf {
        let mut hasher = Sha256::new();
        hasher.update(pipeline.as_bytes());
        hasher.update([0]);
        hasher.update(key.as_bytes());
        self.dir.join(&hex::encode(hasher.finalize())[..32])
    }

    fn tmp_dir(&self) -> PathBuf {
        let n = self.n_tmp.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!(".tmp-{}-{n}", std::process::id()))
    }

    /// Packs each existing path into a temporary directory, then renames it
    /// into place as `entry`. `None` when no path exists.
    async fn pack_entry(
        &self,
        lookup: &Lookup,
        dir: &Path,
        entry: &Path,
    ) -> Result<Option<EntryFile>, String> {
        let tmp = self.tmp_dir();
        let (root, paths, tmp_dir) = (dir.to_path_buf(), lookup.paths.clone(), tmp.clone());
        let packed = tokio::task::spawn_blocking(move || -> Result<_, String> {
            std::fs::create_dir_all(&tmp_dir).map_err(|e| e.to_string())?;
            let mut kept = Vec::new();
            for path in paths {
                if !root.join(&path).exists() {
                    continue;
                }
                let file = tmp_dir.join(format!("{}.tar.zst", kept.len()));
                let out = std::fs::File::create(&file).map_err(|e| e.to_string())?;
                let mut writer = HashingWriter::new(std::io::BufWriter::new(out));
                archive::pack(&root, &path, &mut writer).map_err(|e| e.to_string())?;
                let (out, info) = writer.finish();
                out.into_inner()
                    .map_err(|e| e.to_string())?
                    .sync_all()
                    .map_err(|e| e.to_string())?;
                kept.push((path, (info.digest.to_string(), info.size)));
            }
            Ok(kept)
        })
        .await
        .map_err(|e| e.to_string())?;
        let kept = match packed {
            Ok(kept) if !kept.is_empty() => kept,
            other => {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                return other.map(|_| None);
            }
        };
        let file = EntryFile {
            pipeline: lookup.pipeline.clone(),
            key: lookup.key.clone(),
            paths: kept.iter().map(|(path, _)| path.clone()).collect(),
            archives: kept.into_iter().map(|(_, archive)| archive).collect(),
            generation: lookup.generation,
        };
        let json = serde_json::to_vec(&file).map_err(|e| e.to_string())?;
        let placed = async {
            tokio::fs::write(tmp.join(ENTRY_FILE), json).await?;
            // Another attempt may have saved the same key meanwhile: the
            // newer copy wins.
            let _ = tokio::fs::remove_dir_all(entry).await;
            tokio::fs::rename(&tmp, entry).await
        };
        if let Err(error) = placed.await {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            return Err(error.to_string());
        }
        Ok(Some(file))
    }

    /// Downloads the coordinator's entry (verified by digest) into a local
    /// entry, then restores it; returns the files restored and the agent
    /// that saved it.
    async fn fetch_shared(
        &self,
        lookup: &Lookup,
        shared: pb::CacheEntry,
        dir: &Path,
        client: &mut ArtifactServiceClient<KilnChannel>,
    ) -> Result<(u64, String), String> {
        let tmp = self.tmp_dir();
        let fetched = async {
            tokio::fs::create_dir_all(&tmp)
                .await
                .map_err(|e| e.to_string())?;
            for (idx, archive) in shared.archives.iter().enumerate() {
                let file = tmp.join(format!("{idx}.tar.zst"));
                transfer::download_file(client, &archive.digest, &file, |_| {})
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let file = EntryFile {
                pipeline: lookup.pipeline.clone(),
                key: lookup.key.clone(),
                paths: shared.archives.iter().map(|a| a.path.clone()).collect(),
                archives: shared
                    .archives
                    .iter()
                    .map(|a| (a.digest.clone(), a.size))
                    .collect(),
                generation: lookup.generation,
            };
            let json = serde_json::to_vec(&file).map_err(|e| e.to_string())?;
            tokio::fs::write(tmp.join(ENTRY_FILE), json)
                .await
                .map_err(|e| e.to_string())?;
            let entry = self.entry_dir(&lookup.pipeline, &lookup.key);
            let _saving = self.saving.lock().await;
            let _ = tokio::fs::remove_dir_all(&entry).await;
            tokio::fs::rename(&tmp, &entry)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(entry)
        }
        .await;
        let entry = match fetched {
            Ok(entry) => entry,
            Err(why) => {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                return Err(why);
            }
        };
        self.evict().await;
        let files = unpack_entry(&entry, dir)
            .await?
            .ok_or("the fetched copy vanished")?;
        Ok((files, shared.agent))
    }

    /// Removes the least recently used entries until the rest fit.
    async fn evict(&self) {
        let dir = self.dir.clone();
        let max_bytes = self.max_bytes;
        let _ = tokio::task::spawn_blocking(move || evict_lru(&dir, max_bytes)).await;
    }
}

/// The clear generation an entry of this agent was saved under; `None`
/// when there is no readable entry.
async fn entry_generation(entry: &Path) -> Option<u64> {
    let json = tokio::fs::read(entry.join(ENTRY_FILE)).await.ok()?;
    let file: EntryFile = serde_json::from_slice(&json).ok()?;
    Some(file.generation)
}

/// Unpacks every archive of the entry at `entry` into `dir`; `None` when
/// there is no such entry. Returns the files restored.
async fn unpack_entry(entry: &Path, dir: &Path) -> Result<Option<u64>, String> {
    let (entry, dir) = (entry.to_path_buf(), dir.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let Ok(json) = std::fs::read(entry.join(ENTRY_FILE)) else {
            return Ok(None);
        };
        let file: EntryFile = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
        let mut files = 0;
        for idx in 0..file.archives.len() {
            let input = std::fs::File::open(entry.join(format!("{idx}.tar.zst")))
                .map_err(|e| e.to_string())?;
            let summary = archive::unpack(std::io::BufReader::new(input), &dir, &LIMITS)
                .map_err(|e| e.to_string())?;
            files += summary.files;
        }
        Ok(Some(files))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Uploads the entry's archives (those the coordinator lacks) and records
/// the entry in its index.
async fn share(
    entry: &Path,
    file: &EntryFile,
    client: &mut ArtifactServiceClient<KilnChannel>,
) -> Result<(), String> {
    let mut archives = Vec::new();
    for (idx, ((digest, size), path)) in file.archives.iter().zip(&file.paths).enumerate() {
        transfer::upload_file(
            client,
            &entry.join(format!("{idx}.tar.zst")),
            digest,
            *size,
            "application/x-kiln-tar+zstd",
            |_| {},
        )
        .await
        .map_err(|e| e.to_string())?;
        archives.push(pb::CacheArchive {
            path: path.clone(),
            digest: digest.clone(),
            size: *size,
        });
    }
    client
        .put_cache(pb::PutCacheRequest {
            entry: Some(pb::CacheEntry {
                pipeline: file.pipeline.clone(),
                key: file.key.clone(),
                archives,
                ..Default::default()
            }),
            cleared_generation: file.generation,
        })
        .await
        .map_err(|status| status.message().to_owned())?;
    Ok(())
}

/// Marks an entry as used now.
fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().write(true).open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

/// Keeps the most recently used entries that fit in `max_bytes`.
fn evict_lru(dir: &Path, max_bytes: u64) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
    for entry in read.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            continue;
        }
        let used = std::fs::metadata(path.join(ENTRY_FILE))
            .and_then(|meta| meta.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let size = std::fs::read_dir(&path)
            .map(|files| {
                files
                    .flatten()
                    .filter_map(|file| file.metadata().ok())
                    .map(|meta| meta.len())
                    .sum()
            })
            .unwrap_or(0);
        entries.push((used, size, path));
    }
    // Newest first: they are kept while they fit.
    entries.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    let mut total = 0u64;
    for (_, size, path) in entries {
        total = total.saturating_add(size);
        if total > max_bytes {
            tracing::info!(entry = %path.display(), "removing a least recently used cache");
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dir: &Path, name: &str, bytes: usize, age_secs: u64) {
        let entry = dir.join(name);
        std::fs::create_dir_all(&entry).unwrap();
        std::fs::write(entry.join("0.tar.zst"), vec![0u8; bytes]).unwrap();
        std::fs::write(entry.join(ENTRY_FILE), b"{}").unwrap();
        let used = SystemTime::now() - std::time::Duration::from_secs(age_secs);
        std::fs::File::options()
            .write(true)
            .open(entry.join(ENTRY_FILE))
            .unwrap()
            .set_modified(used)
            .unwrap();
    }

    #[test]
    fn the_least_recently_used_entries_go_first() {
        let dir = tempfile::tempdir().unwrap();
        entry(dir.path(), "old", 1000, 300);
        entry(dir.path(), "middle", 1000, 200);
        entry(dir.path(), "new", 1000, 100);
        evict_lru(dir.path(), 2100);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["middle", "new"]);
        touch(&dir.path().join("middle").join(ENTRY_FILE));
        entry(dir.path(), "newest", 1000, 0);
        evict_lru(dir.path(), 2100);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["middle", "newest"], "a touched entry is kept");
    }
}
