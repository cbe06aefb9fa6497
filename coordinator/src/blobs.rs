//! The content-addressed blob store: artifacts and source snapshots as files
//! under `DATA/blobs/sha256/<2 hex>/<64 hex>`, never in sled.
//!
//! An upload is written to `blobs/tmp/` while it is hashed, checked against
//! the digest and size its sender declared, flushed, and renamed into place:
//! a blob under its digest is always complete and correct when written.
//! Reads hash as they go, so a blob corrupted on disk later is reported (the
//! stream ends with an error) rather than served as good. Memory per transfer
//! is one chunk.
//!
//! Every use of a blob touches its modification time. Garbage collection
//! only removes blobs that nothing referenced during its scan and that were
//! not touched since the scan began; it moves a blob aside first and checks
//! the time again, so a blob referenced at the last moment survives.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use kiln_common::archive::BlobDigest;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes per streamed chunk, both ways.
pub(crate) const CHUNK_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum BlobError {
    #[error("`{0}` is not a blob digest; write it as sha256:<64 lowercase hex digits>")]
    BadDigest(String),
    #[error("blob {0} is not stored")]
    Missing(String),
    #[error("upload rejected: declared {declared} but received {actual}")]
    Mismatch { declared: String, actual: String },
    #[error("blob of {size} bytes exceeds the per-artifact limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("blob {digest} is corrupted on disk (it hashes to {actual}); it was not served")]
    Corrupt { digest: String, actual: String },
    #[error("blob storage: {0}")]
    Io(#[from] io::Error),
}

impl From<BlobError> for tonic::Status {
    fn from(error: BlobError) -> Self {
        let message = error.to_string();
        match error {
            BlobError::BadDigest(_) | BlobError::TooLarge { .. } => Self::invalid_argument(message),
            BlobError::Missing(_) => Self::not_found(message),
            BlobError::Mismatch { .. } => Self::failed_precondition(message),
            BlobError::Corrupt { .. } => Self::data_loss(message),
            BlobError::Io(_) => Self::internal(message),
        }
    }
}

/// Parses a wire digest, with the store's error.
pub(crate) fn parse_digest(text: &str) -> Result<BlobDigest, BlobError> {
    text.parse()
        .map_err(|_| BlobError::BadDigest(text.to_owned()))
}

fn digest_of(hasher: Sha256) -> String {
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// What a garbage collection did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct GcReport {
    pub(crate) deleted: u64,
    pub(crate) freed: u64,
    pub(crate) kept: u64,
}

pub(crate) struct BlobStore {
    root: PathBuf,
    max_blob_bytes: u64,
    /// Digests being uploaded right now, with a count per digest.
    in_flight: Mutex<HashMap<String, usize>>,
    next_tmp: AtomicU64,
    /// Collection takes it exclusively; an online backup holds it shared
    /// from before its store scan until its last blob is copied, so no blob
    /// its store refers to is collected under it.
    collection: RwLock<()>,
}

impl BlobStore {
    /// Opens the store under `data_dir`, discarding unfinished uploads.
    pub(crate) fn open(data_dir: &Path, max_blob_bytes: u64) -> io::Result<Self> {
        let root = data_dir.join("blobs");
        let _ = std::fs::remove_dir_all(root.join("tmp"));
        std::fs::create_dir_all(root.join("tmp"))?;
        std::fs::create_dir_all(root.join("sha256"))?;
        Ok(Self {
            root,
            max_blob_bytes,
            in_flight: Mutex::new(HashMap::new()),
            next_tmp: AtomicU64::new(0),
            collection: RwLock::new(()),
        })
    }

    pub(crate) fn path(&self, digest: &BlobDigest) -> PathBuf {
        let hex = digest.hex();
        self.root.join("sha256").join(&hex[..2]).join(&hex)
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()))
    }

    /// Stores what `produce` writes (blocking; the coordinator's own blobs,
    /// like dataset snapshots), hashed in the same pass, and returns it.
    pub(crate) fn store_with(
        &self,
        produce: impl FnOnce(&mut dyn std::io::Write) -> io::Result<()>,
    ) -> io::Result<kiln_common::archive::BlobInfo> {
        use std::io::Write;
        let tmp = self.tmp_path();
        let result = (|| {
            let file = std::fs::File::create(&tmp)?;
            let mut writer = kiln_common::archive::HashingWriter::new(io::BufWriter::new(file));
            produce(&mut writer)?;
            writer.flush()?;
            let (buffered, info) = writer.finish();
            buffered
                .into_inner()
                .map_err(|e| e.into_error())?
                .sync_all()?;
            let target = self.path(&info.digest);
            if target.exists() {
                touch(&target)?;
                return Ok(info);
            }
            let dir = target.parent().expect("blob paths have a parent");
            std::fs::create_dir_all(dir)?;
            std::fs::rename(&tmp, &target)?;
            std::fs::File::open(dir)?.sync_all()?;
            Ok(info)
        })();
        let _ = std::fs::remove_file(&tmp);
        result
    }

    /// The stored size, touching the blob as used.
    pub(crate) fn stat(&self, digest: &BlobDigest) -> Option<u64> {
        let path = self.path(digest);
        touch(&path).ok()?;
        std::fs::metadata(path).ok().map(|meta| meta.len())
    }

    /// Receives a blob. Returns its size and whether it was stored already.
    pub(crate) async fn write(
        &self,
        digest: &BlobDigest,
        declared_size: u64,
        mut chunks: impl Stream<Item = Result<Vec<u8>, tonic::Status>> + Unpin,
    ) -> Result<(u64, bool), tonic::Status> {
        if declared_size > self.max_blob_bytes {
            return Err(BlobError::TooLarge {
                size: declared_size,
                limit: self.max_blob_bytes,
            }
            .into());
        }
        let _guard = InFlight::enter(&self.in_flight, &digest.to_string());
        let tmp = self.tmp_path();
        let result = async {
            let mut file = tokio::fs::File::create(&tmp)
                .await
                .map_err(BlobError::from)?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                size += chunk.len() as u64;
                if size > declared_size {
                    return Err(BlobError::Mismatch {
                        declared: format!("{declared_size} bytes"),
                        actual: format!("more than {declared_size} bytes"),
                    }
                    .into());
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(BlobError::from)?;
            }
            if size != declared_size {
                return Err(BlobError::Mismatch {
                    declared: format!("{declared_size} bytes"),
                    actual: format!("{size} bytes"),
                }
                .into());
            }
            let actual = digest_of(hasher);
            if actual != digest.to_string() {
                return Err(BlobError::Mismatch {
                    declared: digest.to_string(),
                    actual,
                }
                .into());
            }
            file.sync_all().await.map_err(BlobError::from)?;
            let target = self.path(digest);
            if target.exists() {
                touch(&target).map_err(BlobError::from)?;
                return Ok((size, true));
            }
            let dir = target.parent().expect("blob paths have a parent");
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(BlobError::from)?;
            tokio::fs::rename(&tmp, &target)
                .await
                .map_err(BlobError::from)?;
            // The rename is durable only once the directory is.
            sync_dir(dir).await.map_err(BlobError::from)?;
            Ok((size, false))
        }
        .await;
        let _ = tokio::fs::remove_file(&tmp).await;
        result
    }

    /// Streams a blob from `offset`, verifying the whole blob as it goes.
    pub(crate) fn read(
        &self,
        digest: BlobDigest,
        offset: u64,
    ) -> impl Stream<Item = Result<Vec<u8>, tonic::Status>> + Send + 'static {
        let path = self.path(&digest);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            if let Err(status) = send_verified(&path, &digest, offset, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// Reads one small file out of an archive blob (a stage's metrics file),
    /// verifying the blob first. Bounded by `max_bytes` both packed and
    /// unpacked.
    pub(crate) fn read_single_file(
        &self,
        digest: &str,
        path: &str,
        max_bytes: u64,
    ) -> Result<String, String> {
        let digest = parse_digest(digest).map_err(|error| error.to_string())?;
        let file = self.path(&digest);
        let size = std::fs::metadata(&file)
            .map_err(|_| format!("blob {digest} is not stored"))?
            .len();
        if size > max_bytes {
            return Err(format!(
                "its archive is {size} bytes, over the {max_bytes}-byte limit"
            ));
        }
        let bytes = std::fs::read(&file).map_err(|error| error.to_string())?;
        let actual = digest_of(Sha256::new_with_prefix(&bytes));
        if actual != digest.to_string() {
            return Err(BlobError::Corrupt {
                digest: digest.to_string(),
                actual,
            }
            .to_string());
        }
        let scratch =
            tempfile::tempdir_in(self.root.join("tmp")).map_err(|error| error.to_string())?;
        let limits = kiln_common::archive::Limits {
            max_bytes,
            max_entries: 64,
        };
        kiln_common::archive::unpack(&bytes[..], scratch.path(), &limits)
            .map_err(|error| error.to_string())?;
        std::fs::read_to_string(scratch.path().join(path))
            .map_err(|error| format!("cannot read it from its archive: {error}"))
    }

    /// Deletes every blob that is not in `keep`, not being uploaded, and not
    /// used since `cutoff` (the scan's start minus [`GC_GRACE`]).
    pub(crate) fn collect(
        &self,
        keep: &HashSet<String>,
        cutoff: SystemTime,
        dry_run: bool,
    ) -> io::Result<GcReport> {
        let _exclusive = self.collection.write().unwrap_or_else(|e| e.into_inner());
        let mut report = GcReport::default();
        for shard in std::fs::read_dir(self.root.join("sha256"))? {
            for entry in std::fs::read_dir(shard?.path())? {
                let entry = entry?;
                let digest = format!("sha256:{}", entry.file_name().to_string_lossy());
                let meta = entry.metadata()?;
                let used_since_scan = meta.modified()? >= cutoff;
                let uploading = self
                    .in_flight
                    .lock()
                    .expect("in-flight lock")
                    .contains_key(&digest);
                if keep.contains(&digest) || used_since_scan || uploading {
                    report.kept += 1;
                    continue;
                }
                if dry_run {
                    report.deleted += 1;
                    report.freed += meta.len();
                    continue;
                }
                // Move it aside, then look again: a use that raced with the
                // move either touched it before (kept, moved back) or finds
                // it missing afterwards (and reports it missing).
                let aside = self.tmp_path();
                std::fs::rename(entry.path(), &aside)?;
                if std::fs::metadata(&aside)?.modified()? >= cutoff {
                    std::fs::rename(&aside, entry.path())?;
                    report.kept += 1;
                    continue;
                }
                std::fs::remove_file(&aside)?;
                report.deleted += 1;
                report.freed += meta.len();
            }
        }
        Ok(report)
    }
}

impl BlobStore {
    /// Keeps collection from deleting anything while the guard lives.
    pub(crate) fn hold_collection(&self) -> RwLockReadGuard<'_, ()> {
        self.collection.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Every stored blob: its digest, path and size.
    pub(crate) fn list(&self) -> io::Result<Vec<(BlobDigest, PathBuf, u64)>> {
        let mut blobs = Vec::new();
        for shard in std::fs::read_dir(self.root.join("sha256"))? {
            for entry in std::fs::read_dir(shard?.path())? {
                let entry = entry?;
                let name = format!("sha256:{}", entry.file_name().to_string_lossy());
                let Ok(digest) = parse_digest(&name) else {
                    continue;
                };
                blobs.push((digest, entry.path(), entry.metadata()?.len()));
            }
        }
        blobs.sort_by_key(|blob| blob.0.hex());
        Ok(blobs)
    }
}

/// Marks a blob as used now.
fn touch(path: &Path) -> io::Result<()> {
    std::fs::File::options()
        .write(true)
        .open(path)?
        .set_modified(SystemTime::now())
}

async fn send_verified(
    path: &Path,
    digest: &BlobDigest,
    offset: u64,
    tx: &tokio::sync::mpsc::Sender<Result<Vec<u8>, tonic::Status>>,
) -> Result<(), tonic::Status> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(BlobError::Missing(digest.to_string()).into());
        }
        Err(error) => return Err(BlobError::from(error).into()),
    };
    let _ = touch(path);
    let mut hasher = Sha256::new();
    let mut position = 0u64;
    let mut buffer = vec![0u8; CHUNK_BYTES];
    loop {
        let n = file.read(&mut buffer).await.map_err(BlobError::from)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        let end = position + n as u64;
        if end > offset {
            let start = offset.saturating_sub(position) as usize;
            if tx.send(Ok(buffer[start..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
        position = end;
    }
    let actual = digest_of(hasher);
    if actual != digest.to_string() {
        tracing::error!(%digest, %actual, "corrupted blob on disk");
        return Err(BlobError::Corrupt {
            digest: digest.to_string(),
            actual,
        }
        .into());
    }
    Ok(())
}

/// Counts an upload as in flight for as long as it lives.
struct InFlight<'a> {
    map: &'a Mutex<HashMap<String, usize>>,
    digest: String,
}

impl<'a> InFlight<'a> {
    fn enter(map: &'a Mutex<HashMap<String, usize>>, digest: &str) -> Self {
        *map.lock()
            .expect("in-flight lock")
            .entry(digest.to_owned())
            .or_default() += 1;
        Self {
            map,
            digest: digest.to_owned(),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("in-flight lock");
        if let Some(count) = map.get_mut(&self.digest) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.digest);
            }
        }
    }
}

async fn sync_dir(dir: &Path) -> io::Result<()> {
    tokio::fs::File::open(dir).await?.sync_all().await
}

/// How long GC leaves a blob nothing references yet: an upload finishes
/// before the stage that made it reports, so a fresh blob is not garbage.
pub(crate) const GC_GRACE: Duration = Duration::from_secs(60 * 60);
