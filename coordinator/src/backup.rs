//! Online backup and offline restore.
//!
//! A backup is taken while the farm runs and the commit thread keeps
//! writing; nothing waits for it. It is a *fuzzy scan plus redo*: the store
//! starts recording every write it applies, the backup scans every key in
//! pages, then stops the recording and appends what was recorded. Every
//! write is a blind put or remove of a whole value, so replaying the
//! recorded writes, in order, over the scan gives exactly the store as it
//! was when the recording stopped — whatever the scan saw of writes made
//! while it ran. Blob collection is held off from before the scan until the
//! last blob is copied, so every blob the backed-up store refers to is in
//! the backup (blobs are written before anything refers to them).
//!
//! The file is `MAGIC`, then a zstd stream of frames, each a big-endian
//! `u32` length and a `BackupFrame`: header, store records, the key files,
//! blobs (a `BackupBlob` then its chunks), end. The end frame carries the
//! counts; a file without it is refused as cut short. Restore writes into a
//! new directory beside the target and renames it into place only once
//! everything checked out (each blob against its digest), so a failed
//! restore leaves nothing behind.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::Stream;
use kiln_common::archive::BlobDigest;
use kiln_common::channel::CoordinatorEndpoint;
use kiln_proto::v1 as pb;
use kiln_proto::v1::admin_service_client::AdminServiceClient;
use pb::backup_frame::Frame;
use prost::Message;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::blobs::{BlobStore, CHUNK_BYTES};
use crate::store::{self, Store};

/// The first bytes of every backup file.
const MAGIC: &[u8; 8] = b"KILNBAK\x01";
/// The frame format written and read.
const FORMAT: u32 = 1;
/// Store records per frame, and the bytes after which a page is sent early.
const PAGE_RECORDS: usize = 1_000;
const PAGE_BYTES: usize = 2 << 20;
/// The largest frame restore accepts (a page holds at most one oversized
/// record past `PAGE_BYTES`; a spec is at most 1 MiB).
const MAX_FRAME_BYTES: usize = 64 << 20;
/// The data directory's small files that a coordinator needs to carry on:
/// the secrets key opens sealed secrets, the provenance key signs (its
/// public half verifies old envelopes), and `admin.token` is the bootstrap
/// token's plain copy.
const FILES: [&str; 4] = [
    "secrets.key",
    "provenance.key",
    "provenance.pub",
    "admin.token",
];

/// What a finished backup or restore holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackupSummary {
    pub records: u64,
    pub files: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
}

impl std::fmt::Display for BackupSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} store records, {} key files, {} blobs ({} bytes)",
            self.records, self.files, self.blobs, self.blob_bytes
        )
    }
}

/// `AdminService`: the backup stream. Admin only (`auth::rule`), audited.
pub(crate) struct AdminApi {
    store: Arc<dyn Store>,
    blobs: Arc<BlobStore>,
    data_dir: PathBuf,
    secret_key_file: PathBuf,
}

impl AdminApi {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        blobs: Arc<BlobStore>,
        data_dir: PathBuf,
        secret_key_file: PathBuf,
    ) -> Self {
        Self {
            store,
            blobs,
            data_dir,
            secret_key_file,
        }
    }
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<pb::BackupFrame, Status>> + Send>>;

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    type BackupStream = FrameStream;

    async fn backup(
        &self,
        _request: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        let source = Source {
            store: self.store.clone(),
            blobs: self.blobs.clone(),
            files: FILES
                .iter()
                .map(|name| {
                    let path = match *name {
                        "secrets.key" => self.secret_key_file.clone(),
                        _ => self.data_dir.join(name),
                    };
                    (*name, path)
                })
                .collect(),
        };
        tokio::task::spawn_blocking(move || {
            let sink = FrameSink(tx.clone());
            match produce(&source, &sink) {
                Ok(summary) => tracing::info!(%summary, "online backup sent"),
                Err(Produce::ClientGone) => {
                    tracing::warn!("online backup abandoned: the client went away");
                }
                Err(Produce::Failed(status)) => {
                    tracing::error!(%status, "online backup failed");
                    let _ = tx.blocking_send(Err(status));
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

struct Source {
    store: Arc<dyn Store>,
    blobs: Arc<BlobStore>,
    files: Vec<(&'static str, PathBuf)>,
}

enum Produce {
    ClientGone,
    Failed(Status),
}

impl From<store::StoreError> for Produce {
    fn from(error: store::StoreError) -> Self {
        Produce::Failed(Status::internal(format!("reading the store: {error}")))
    }
}

struct FrameSink(mpsc::Sender<Result<pb::BackupFrame, Status>>);

impl FrameSink {
    fn send(&self, frame: Frame) -> Result<(), Produce> {
        self.0
            .blocking_send(Ok(pb::BackupFrame { frame: Some(frame) }))
            .map_err(|_| Produce::ClientGone)
    }
}

/// Stops the store's recording however the backup ends.
struct Recording<'a>(&'a dyn Store);

impl Recording<'_> {
    fn stop(self) -> Vec<store::RawWrite> {
        let recorded = self.0.record_writes(false);
        std::mem::forget(self);
        recorded
    }
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        self.0.record_writes(false);
    }
}

/// Sends one whole backup (blocking: the blocking pool runs it).
fn produce(source: &Source, sink: &FrameSink) -> Result<BackupSummary, Produce> {
    let mut summary = BackupSummary::default();
    sink.send(Frame::Header(pb::BackupHeader {
        format: FORMAT,
        schema: store::SCHEMA_VERSION,
        coordinator: env!("CARGO_PKG_VERSION").to_owned(),
        created_ms: now_ms(),
    }))?;
    let _no_collection = source.blobs.hold_collection();
    let recording = {
        source.store.record_writes(true);
        Recording(&*source.store)
    };
    let mut page = Page::default();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let entries = source.store.raw_page(after.as_deref(), PAGE_RECORDS)?;
        let Some((last, _)) = entries.last() else {
            break;
        };
        after = Some(last.clone());
        for (key, value) in entries {
            page.push(key, Some(value), sink, &mut summary)?;
        }
    }
    for (key, value) in recording.stop() {
        page.push(key, value, sink, &mut summary)?;
    }
    page.send(sink)?;

    for (name, path) in &source.files {
        let content = match std::fs::read(path) {
            Ok(content) => content,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => {
                return Err(Produce::Failed(Status::internal(format!(
                    "reading {}: {error}",
                    path.display()
                ))));
            }
        };
        sink.send(Frame::File(pb::BackupFile {
            name: (*name).to_owned(),
            content,
        }))?;
        summary.files += 1;
    }

    let blobs = source
        .blobs
        .list()
        .map_err(|error| Produce::Failed(Status::internal(format!("listing blobs: {error}"))))?;
    for (digest, path, size) in blobs {
        send_blob(&digest, &path, size, sink)?;
        summary.blobs += 1;
        summary.blob_bytes += size;
    }
    sink.send(Frame::End(pb::BackupEnd {
        records: summary.records,
        files: summary.files,
        blobs: summary.blobs,
        blob_bytes: summary.blob_bytes,
    }))?;
    Ok(summary)
}

/// A blob's frames, hashed as they are read: a blob corrupted on disk ends
/// the backup with `DATA_LOSS` rather than being copied.
fn send_blob(digest: &BlobDigest, path: &Path, size: u64, sink: &FrameSink) -> Result<(), Produce> {
    let failed = |error: io::Error| {
        Produce::Failed(Status::internal(format!("reading blob {digest}: {error}")))
    };
    let mut file = File::open(path).map_err(failed)?;
    sink.send(Frame::Blob(pb::BackupBlob {
        digest: digest.to_string(),
        size,
    }))?;
    let mut hasher = Sha256::new();
    let mut sent = 0u64;
    let mut chunk = vec![0u8; CHUNK_BYTES];
    loop {
        let n = file.read(&mut chunk).map_err(failed)?;
        if n == 0 {
            break;
        }
        hasher.update(&chunk[..n]);
        sent += n as u64;
        sink.send(Frame::BlobChunk(chunk[..n].to_vec()))?;
    }
    if sent != size || hex::encode(hasher.finalize()) != digest.hex() {
        return Err(Produce::Failed(Status::data_loss(format!(
            "blob {digest} is corrupted on disk; the backup stopped"
        ))));
    }
    Ok(())
}

#[derive(Default)]
struct Page {
    records: Vec<pb::BackupRecord>,
    bytes: usize,
}

impl Page {
    fn push(
        &mut self,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        sink: &FrameSink,
        summary: &mut BackupSummary,
    ) -> Result<(), Produce> {
        let removed = value.is_none();
        let value = value.unwrap_or_default();
        self.bytes += key.len() + value.len();
        self.records.push(pb::BackupRecord {
            key,
            value,
            removed,
        });
        summary.records += 1;
        if self.records.len() >= PAGE_RECORDS || self.bytes >= PAGE_BYTES {
            self.send(sink)?;
        }
        Ok(())
    }

    fn send(&mut self, sink: &FrameSink) -> Result<(), Produce> {
        if self.records.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        sink.send(Frame::Records(pb::BackupRecords {
            records: std::mem::take(&mut self.records),
        }))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why a backup could not be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot reach the coordinator at {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("the coordinator refused the backup: {0}")]
    Refused(Status),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a Kiln backup: {why}")]
    NotABackup { path: PathBuf, why: String },
    #[error(
        "{path} was written by a newer coordinator (store schema {found}); this one knows up to {known}: restore it with that version"
    )]
    Newer {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("{dir} already holds data; restore into a new or empty directory")]
    NotEmpty { dir: PathBuf },
    #[error("restoring the store: {0}")]
    Store(#[from] store::StoreError),
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Takes an online backup of the coordinator at `endpoint` into `path`
/// (written to `path.partial`, synced, then renamed: `path` appears only
/// whole). Needs an admin token.
pub async fn save(
    endpoint: &CoordinatorEndpoint,
    path: &Path,
) -> Result<BackupSummary, BackupError> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| BackupError::Connect {
            url: endpoint.uri().to_string(),
            source,
        })?;
    let mut client = AdminServiceClient::new(channel).max_decoding_message_size(MAX_FRAME_BYTES);
    let mut frames = client
        .backup(pb::BackupRequest {})
        .await
        .map_err(BackupError::Refused)?
        .into_inner();
    let partial = {
        let mut name = path.as_os_str().to_owned();
        name.push(".partial");
        PathBuf::from(name)
    };
    let result = async {
        let mut out = FrameWriter::create(&partial)?;
        while let Some(frame) = frames.message().await.map_err(BackupError::Refused)? {
            out.push(&frame)?;
        }
        let summary = out.finish()?;
        std::fs::rename(&partial, path).map_err(io_at(path))?;
        Ok(summary)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Writes frames to a backup file, checking their order as they come.
struct FrameWriter<'a> {
    path: &'a Path,
    encoder: zstd::Encoder<'static, BufWriter<File>>,
    check: Check<'a>,
}

impl<'a> FrameWriter<'a> {
    fn create(path: &'a Path) -> Result<Self, BackupError> {
        let file = File::create(path).map_err(io_at(path))?;
        let mut out = BufWriter::new(file);
        out.write_all(MAGIC).map_err(io_at(path))?;
        Ok(Self {
            path,
            encoder: zstd::Encoder::new(out, 3).map_err(io_at(path))?,
            check: Check::new(path),
        })
    }

    fn push(&mut self, frame: &pb::BackupFrame) -> Result<(), BackupError> {
        self.check.see(frame.frame.as_ref())?;
        let bytes = frame.encode_to_vec();
        self.encoder
            .write_all(&(bytes.len() as u32).to_be_bytes())
            .and_then(|()| self.encoder.write_all(&bytes))
            .map_err(io_at(self.path))
    }

    /// Checks the end frame came, and makes the file durable.
    fn finish(self) -> Result<BackupSummary, BackupError> {
        let summary = self.check.finish()?;
        let out = self.encoder.finish().map_err(io_at(self.path))?;
        let file = out
            .into_inner()
            .map_err(|error| io_at(self.path)(error.into_error()))?;
        file.sync_all().map_err(io_at(self.path))?;
        Ok(summary)
    }
}

/// Follows the frame order: header first, blob chunks only after a blob
/// header and adding up to its size, the end's counts equal to what came.
struct Check<'a> {
    path: &'a Path,
    header: Option<pb::BackupHeader>,
    seen: BackupSummary,
    /// The blob being received and the bytes still expected of it.
    blob_left: u64,
    ended: Option<BackupSummary>,
}

impl<'a> Check<'a> {
    fn new(path: &'a Path) -> Self {
        Self {
            path,
            header: None,
            seen: BackupSummary::default(),
            blob_left: 0,
            ended: None,
        }
    }

    fn bad(&self, why: impl Into<String>) -> BackupError {
        BackupError::NotABackup {
            path: self.path.to_owned(),
            why: why.into(),
        }
    }

    fn see(&mut self, frame: Option<&Frame>) -> Result<(), BackupError> {
        let Some(frame) = frame else {
            return Err(self.bad("an empty frame"));
        };
        if self.ended.is_some() {
            return Err(self.bad("frames after the end"));
        }
        if self.blob_left > 0 && !matches!(frame, Frame::BlobChunk(_)) {
            return Err(self.bad("a blob shorter than its declared size"));
        }
        match frame {
            Frame::Header(header) => {
                if self.header.is_some() {
                    return Err(self.bad("a second header"));
                }
                if header.format != FORMAT {
                    return Err(self.bad(format!(
                        "frame format {} (this coordinator reads {FORMAT})",
                        header.format
                    )));
                }
                self.header = Some(header.clone());
                return Ok(());
            }
            _ if self.header.is_none() => return Err(self.bad("no header")),
            Frame::Records(page) => self.seen.records += page.records.len() as u64,
            Frame::File(file) => {
                if !FILES.contains(&file.name.as_str()) {
                    return Err(self.bad(format!("an unknown file {:?}", file.name)));
                }
                self.seen.files += 1;
            }
            Frame::Blob(blob) => {
                self.seen.blobs += 1;
                self.seen.blob_bytes += blob.size;
                self.blob_left = blob.size;
            }
            Frame::BlobChunk(chunk) => {
                let n = chunk.len() as u64;
                if n > self.blob_left {
                    return Err(self.bad("a blob longer than its declared size"));
                }
                self.blob_left -= n;
            }
            Frame::End(end) => {
                let declared = BackupSummary {
                    records: end.records,
                    files: end.files,
                    blobs: end.blobs,
                    blob_bytes: end.blob_bytes,
                };
                if declared != self.seen {
                    return Err(self.bad(format!(
                        "its end counts {declared} but it holds {}",
                        self.seen
                    )));
                }
                self.ended = Some(declared);
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<BackupSummary, BackupError> {
        match self.ended {
            Some(summary) => Ok(summary),
            None => Err(self.bad("it ends before its last frame (cut short)")),
        }
    }
}

/// Restores the backup at `file` into `data_dir`, which must not exist or
/// be empty. Nothing is left behind if it fails. A coordinator started on
/// `data_dir` afterwards carries on from the backed-up state (an older
/// schema is migrated then, as for any data directory).
pub fn restore(file: &Path, data_dir: &Path) -> Result<BackupSummary, BackupError> {
    if std::fs::read_dir(data_dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(BackupError::NotEmpty {
            dir: data_dir.to_owned(),
        });
    }
    let name = data_dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "kiln".to_owned());
    let parent = match data_dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_at(&parent))?;
    let staging = parent.join(format!(".{name}.restoring-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let result = restore_into(file, &staging).and_then(|summary| {
        if data_dir.exists() {
            std::fs::remove_dir(data_dir).map_err(io_at(data_dir))?;
        }
        std::fs::rename(&staging, data_dir).map_err(io_at(data_dir))?;
        Ok(summary)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

fn restore_into(file: &Path, dir: &Path) -> Result<BackupSummary, BackupError> {
    let not_backup = |why: &str| BackupError::NotABackup {
        path: file.to_owned(),
        why: why.to_owned(),
    };
    let mut input = BufReader::new(File::open(file).map_err(io_at(file))?);
    let mut magic = [0u8; 8];
    input
        .read_exact(&mut magic)
        .map_err(|_| not_backup("it is shorter than the file header"))?;
    if &magic != MAGIC {
        return Err(not_backup("it does not start with a Kiln backup header"));
    }
    let mut frames = zstd::Decoder::with_buffer(input).map_err(io_at(file))?;
    std::fs::create_dir_all(dir).map_err(io_at(dir))?;
    let mut writer = store::RawWriter::create(dir)?;
    let blobs = BlobStore::open(dir, u64::MAX).map_err(io_at(dir))?;
    let mut check = Check::new(file);
    // The blob being received: its declared digest, and its bytes so far.
    let mut blob: Option<(String, u64, tempfile::NamedTempFile)> = None;
    loop {
        let mut length = [0u8; 4];
        match frames.read_exact(&mut length) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(error) => return Err(not_backup(&format!("its compressed stream: {error}"))),
        }
        let length = u32::from_be_bytes(length) as usize;
        if length > MAX_FRAME_BYTES {
            return Err(not_backup(&format!("a frame of {length} bytes")));
        }
        let mut bytes = vec![0u8; length];
        frames
            .read_exact(&mut bytes)
            .map_err(|_| not_backup("it ends inside a frame (cut short)"))?;
        let frame = pb::BackupFrame::decode(bytes.as_slice())
            .map_err(|error| not_backup(&format!("a frame does not decode: {error}")))?;
        check.see(frame.frame.as_ref())?;
        match frame.frame.expect("checked") {
            Frame::Header(header) => {
                if header.schema > store::SCHEMA_VERSION {
                    return Err(BackupError::Newer {
                        path: file.to_owned(),
                        found: header.schema,
                        known: store::SCHEMA_VERSION,
                    });
                }
            }
            Frame::Records(page) => {
                for record in page.records {
                    let value = (!record.removed).then_some(record.value);
                    writer.write(&record.key, value.as_deref())?;
                }
            }
            Frame::File(file) => {
                kiln_common::files::write_private(&dir.join(&file.name), &file.content)
                    .map_err(io_at(&dir.join(&file.name)))?;
            }
            Frame::Blob(header) => {
                let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_at(dir))?;
                blob = Some((header.digest, header.size, tmp));
            }
            Frame::BlobChunk(chunk) => {
                let Some((_, _, tmp)) = blob.as_mut() else {
                    return Err(not_backup("blob bytes before any blob"));
                };
                tmp.write_all(&chunk).map_err(io_at(dir))?;
            }
            Frame::End(_) => {}
        }
        if check.blob_left == 0
            && let Some((digest, _, tmp)) = blob.take()
        {
            store_blob(&blobs, &digest, tmp, file)?;
        }
    }
    let summary = check.finish()?;
    writer.finish()?;
    Ok(summary)
}

/// Moves a received blob into the blob store if its content has the
/// digest it was declared with.
fn store_blob(
    blobs: &BlobStore,
    digest: &str,
    tmp: tempfile::NamedTempFile,
    file: &Path,
) -> Result<(), BackupError> {
    let mut source = File::open(tmp.path()).map_err(io_at(tmp.path()))?;
    let info = blobs
        .store_with(|out| io::copy(&mut source, out).map(|_| ()))
        .map_err(io_at(tmp.path()))?;
    if info.digest.to_string() != digest {
        let _ = std::fs::remove_file(blobs.path(&info.digest));
        return Err(BackupError::NotABackup {
            path: file.to_owned(),
            why: format!(
                "blob {digest} holds content whose digest is {}",
                info.digest
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::store::{AuditRecord, Batch, Op, SledStore, TriggerStateRecord};

    /// Batch `i`: audit record `i` and the counter at `i`, atomically.
    fn batch(i: u64) -> Batch {
        Batch {
            ops: vec![
                Op::Audit(AuditRecord {
                    id: i,
                    at_ms: i,
                    principal: "writer".into(),
                    method: "/test".into(),
                    target: format!("write {i}"),
                    outcome: "OK".into(),
                    message: String::new(),
                    peer: String::new(),
                }),
                Op::TriggerState(TriggerStateRecord {
                    pipeline: "counter".into(),
                    last_fired_ms: Some(i),
                    data_digest: None,
                    refs: None,
                }),
            ],
        }
    }

    /// The scan runs while another thread keeps committing batches; the
    /// restored store is the state after some whole batch: the counter
    /// says `n` and audit records 1..=n are all there, none beyond.
    #[test]
    fn a_backup_taken_under_writes_restores_a_state_that_existed() {
        let live = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(live.path()).unwrap());
        let blobs = Arc::new(BlobStore::open(live.path(), u64::MAX).unwrap());
        // Enough to make the scan take many pages.
        for i in 1..=5_000 {
            store.apply(&batch(i)).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 5_000;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    store.apply(&batch(i)).unwrap();
                }
                i
            })
        };
        let (tx, mut rx) = mpsc::channel(8);
        let source = Source {
            store: store.clone(),
            blobs,
            files: Vec::new(),
        };
        let producer = std::thread::spawn(move || {
            let sink = FrameSink(tx);
            produce(&source, &sink).map_err(|_| "produce failed")
        });
        let backups = tempfile::tempdir().unwrap();
        let file = backups.path().join("backup");
        let mut out = FrameWriter::create(&file).unwrap();
        while let Some(frame) = rx.blocking_recv() {
            out.push(&frame.unwrap()).unwrap();
        }
        let summary = out.finish().unwrap();
        producer.join().unwrap().unwrap();
        stop.store(true, Ordering::Relaxed);
        let written = writer.join().unwrap();
        assert!(written > 5_000, "the writer wrote during the backup");

        let restored_dir = backups.path().join("restored");
        assert_eq!(restore(&file, &restored_dir).unwrap(), summary);
        let restored = SledStore::open(&restored_dir).unwrap();
        let counter = restored
            .trigger_state("counter")
            .unwrap()
            .and_then(|state| state.last_fired_ms)
            .unwrap();
        assert!(counter >= 5_000, "{counter}");
        let ids: Vec<u64> = restored
            .audit(usize::MAX)
            .unwrap()
            .iter()
            .map(|record| record.id)
            .collect();
        assert_eq!(
            ids.len() as u64,
            counter,
            "audit records beside counter {counter}"
        );
        assert!(ids.iter().all(|id| (1..=counter).contains(id)));
    }

    #[test]
    fn restore_refuses_what_is_not_a_backup_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-backup");
        std::fs::write(&file, b"hello, this is text").unwrap();
        let target = dir.path().join("data");
        let error = restore(&file, &target).unwrap_err();
        assert!(
            error.to_string().contains("is not a Kiln backup"),
            "{error}"
        );
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
