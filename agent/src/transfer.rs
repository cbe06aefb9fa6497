//! Moving blobs to and from the coordinator's `ArtifactService`: uploads
//! that ask first (dedup) and downloads that resume after a dropped stream
//! and verify the digest before anyone uses the file. Used by the agent for
//! stage artifacts and by the CLI for sources and `kiln artifacts get`.
//!
//! Files are streamed in 1 MiB chunks; no blob is ever held in memory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_common::archive::{self, ArchiveError, HashingWriter, Limits, PackSummary, UnpackSummary};

use futures::StreamExt;
use kiln_common::channel::KilnChannel;
use kiln_proto::v1 as pb;
use pb::artifact_service_client::ArtifactServiceClient;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes per chunk on the wire.
const CHUNK_BYTES: usize = 1024 * 1024;
/// Times a download resumes after its stream breaks before giving up.
const RESUME_ATTEMPTS: u32 = 5;

/// Failures moving a blob.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("reading or writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the coordinator refused the transfer of {digest}: {status}")]
    Refused {
        digest: String,
        status: String,
        code: tonic::Code,
    },
    #[error("downloaded {digest} but the bytes hash to {actual}; the copy was discarded")]
    Corrupt { digest: String, actual: String },
    #[error(transparent)]
    Archive(#[from] ArchiveError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TransferError + '_ {
    move |source| TransferError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn refused(digest: &str) -> impl FnOnce(tonic::Status) -> TransferError + '_ {
    move |status| TransferError::Refused {
        digest: digest.to_owned(),
        status: status.message().to_owned(),
        code: status.code(),
    }
}

impl TransferError {
    /// True when trying again cannot help: the coordinator judged the blob
    /// itself (too large, wrong digest) or the archive is unsafe.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Refused { code, .. } => matches!(
                code,
                tonic::Code::InvalidArgument
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::OutOfRange
            ),
            Self::Archive(_) => true,
            Self::Io { .. } | Self::Corrupt { .. } => false,
        }
    }
}

/// `sha256:<hex>` and size of a file, streamed.
pub async fn digest_file(path: &Path) -> Result<(String, u64), TransferError> {
    let mut file = tokio::fs::File::open(path).await.map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; CHUNK_BYTES];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer).await.map_err(io_error(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((format!("sha256:{}", hex::encode(hasher.finalize())), size))
}

/// Uploads `path` as the blob `digest` unless the coordinator has it
/// already. Returns whether bytes were sent. `progress` gets the bytes sent
/// so far.
pub async fn upload_file(
    client: &mut ArtifactServiceClient<KilnChannel>,
    path: &Path,
    digest: &str,
    size: u64,
    media_type: &str,
    progress: impl Fn(u64) + Send + 'static,
) -> Result<bool, TransferError> {
    let stat = client
        .stat_blob(pb::StatBlobRequest {
            digest: digest.to_owned(),
        })
        .await
        .map_err(refused(digest))?
        .into_inner();
    if stat.exists {
        progress(size);
        return Ok(false);
    }
    let file = tokio::fs::File::open(path).await.map_err(io_error(path))?;
    let header = pb::UploadChunk {
        part: Some(pb::upload_chunk::Part::Header(pb::UploadHeader {
            digest: digest.to_owned(),
            size,
            media_type: media_type.to_owned(),
        })),
    };
    let data = futures::stream::unfold((file, 0u64), move |(mut file, sent)| async move {
        let mut buffer = vec![0u8; CHUNK_BYTES];
        match file.read(&mut buffer).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buffer.truncate(n);
                let sent = sent + n as u64;
                Some((buffer, (file, sent)))
            }
        }
    });
    let mut sent = 0u64;
    let chunks = futures::stream::iter([header]).chain(data.map(move |data| {
        sent += data.len() as u64;
        progress(sent);
        pb::UploadChunk {
            part: Some(pb::upload_chunk::Part::Data(data)),
        }
    }));
    client.upload_blob(chunks).await.map_err(refused(digest))?;
    Ok(true)
}

/// Downloads blob `digest` to `dest`, resuming where a broken stream left
/// off, and checks the digest before returning. On failure `dest` is
/// removed.
pub async fn download_file(
    client: &mut ArtifactServiceClient<KilnChannel>,
    digest: &str,
    dest: &Path,
    progress: impl Fn(u64),
) -> Result<u64, TransferError> {
    let result = download_verified(client, digest, dest, &progress).await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(dest).await;
    }
    result
}

async fn download_verified(
    client: &mut ArtifactServiceClient<KilnChannel>,
    digest: &str,
    dest: &Path,
    progress: &impl Fn(u64),
) -> Result<u64, TransferError> {
    let mut file = tokio::fs::File::create(dest)
        .await
        .map_err(io_error(dest))?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut attempts = 0;
    loop {
        let request = pb::DownloadBlobRequest {
            digest: digest.to_owned(),
            offset: received,
        };
        let outcome = async {
            let mut stream = client.download_blob(request).await?.into_inner();
            while let Some(chunk) = stream.message().await? {
                hasher.update(&chunk.data);
                file.write_all(&chunk.data)
                    .await
                    .map_err(|error| tonic::Status::internal(error.to_string()))?;
                received += chunk.data.len() as u64;
                progress(received);
            }
            Ok::<(), tonic::Status>(())
        }
        .await;
        match outcome {
            Ok(()) => break,
            // A broken connection resumes from what arrived; an answer from
            // the coordinator (missing, corrupt) is final.
            Err(status) if is_transient(&status) && attempts < RESUME_ATTEMPTS => {
                attempts += 1;
                tracing::warn!(digest, received, %status, "download interrupted; resuming");
                tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(attempts)))
                    .await;
            }
            Err(status) => return Err(refused(digest)(status)),
        }
    }
    file.flush().await.map_err(io_error(dest))?;
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if actual != digest {
        return Err(TransferError::Corrupt {
            digest: digest.to_owned(),
            actual,
        });
    }
    Ok(received)
}

fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// Scratch files get unique names within one process.
static SCRATCH: AtomicU64 = AtomicU64::new(0);

/// A scratch file removed when dropped, so a transfer cancelled mid-way
/// (the stage was cancelled, the agent is stopping) leaves nothing behind.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn scratch_file(dir: &Path, what: &str) -> PathBuf {
    let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".kiln-{what}-{}-{n}", std::process::id()))
}

/// Packs with `pack` (into a scratch file in `scratch_dir`, hashing as it
/// writes) and uploads the result unless the coordinator has it. Returns
/// the digest, the blob size and what was packed.
pub async fn pack_and_upload<P>(
    client: &mut ArtifactServiceClient<KilnChannel>,
    scratch_dir: &Path,
    pack: P,
    progress: impl Fn(u64) + Send + 'static,
) -> Result<(String, u64, PackSummary), TransferError>
where
    P: FnOnce(&mut dyn Write) -> Result<PackSummary, ArchiveError> + Send + 'static,
{
    let scratch = Scratch(scratch_file(scratch_dir, "pack"));
    let file = scratch.0.clone();
    let packed = {
        let file = file.clone();
        tokio::task::spawn_blocking(move || -> Result<_, TransferError> {
            let out = std::fs::File::create(&file).map_err(io_error(&file))?;
            let mut writer =
                HashingWriter::new(std::io::BufWriter::with_capacity(CHUNK_BYTES, out));
            let summary = pack(&mut writer)?;
            let (mut out, info) = writer.finish();
            out.flush().map_err(io_error(&file))?;
            Ok((info, summary))
        })
        .await
        .expect("packing does not panic")
    };
    let result = async {
        let (info, summary) = packed?;
        let digest = info.digest.to_string();
        upload_file(
            client,
            &file,
            &digest,
            info.size,
            "application/x-kiln-tar+zstd",
            progress,
        )
        .await?;
        Ok((digest, info.size, summary))
    }
    .await;
    drop(scratch);
    result
}

/// Downloads the archive `digest` (verified) into a scratch file in
/// `scratch_dir` and unpacks it into `target` within `limits`.
pub async fn download_and_unpack(
    client: &mut ArtifactServiceClient<KilnChannel>,
    digest: &str,
    scratch_dir: &Path,
    target: &Path,
    limits: Limits,
    progress: impl Fn(u64),
) -> Result<UnpackSummary, TransferError> {
    let scratch = Scratch(scratch_file(scratch_dir, "unpack"));
    let file = scratch.0.clone();
    let result = async {
        download_file(client, digest, &file, progress).await?;
        let (file, target) = (file.clone(), target.to_path_buf());
        tokio::task::spawn_blocking(move || -> Result<_, TransferError> {
            let input = std::fs::File::open(&file).map_err(io_error(&file))?;
            let reader = std::io::BufReader::with_capacity(CHUNK_BYTES, input);
            Ok(archive::unpack(reader, &target, &limits)?)
        })
        .await
        .expect("unpacking does not panic")
    }
    .await;
    drop(scratch);
    result
}
