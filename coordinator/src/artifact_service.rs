//! `ArtifactService`: blob upload, download and existence checks over gRPC,
//! streamed chunk by chunk into and out of the [`BlobStore`].

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use kiln_proto::v1 as pb;
use pb::artifact_service_server::ArtifactService;
use pb::upload_chunk::Part;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Principal;
use crate::blobs::{BlobStore, parse_digest};
use crate::caches::{self, Caches};

pub(crate) struct ArtifactApi {
    blobs: Arc<BlobStore>,
    /// The shared cache index agents read and add to.
    caches: Caches,
}

impl ArtifactApi {
    pub(crate) fn new(blobs: Arc<BlobStore>, caches: Caches) -> Self {
        Self { blobs, caches }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::BlobChunk, Status>> + Send>>;

#[tonic::async_trait]
impl ArtifactService for ArtifactApi {
    async fn stat_blob(
        &self,
        request: Request<pb::StatBlobRequest>,
    ) -> Result<Response<pb::StatBlobResponse>, Status> {
        let digest = parse_digest(&request.into_inner().digest)?;
        let size = self.blobs.stat(&digest);
        Ok(Response::new(pb::StatBlobResponse {
            exists: size.is_some(),
            size: size.unwrap_or_default(),
        }))
    }

    async fn upload_blob(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::BlobInfo>, Status> {
        let mut parts = request.into_inner();
        let Some(pb::UploadChunk {
            part: Some(Part::Header(header)),
        }) = parts.message().await?
        else {
            return Err(Status::invalid_argument(
                "an upload must start with its header (digest and size)",
            ));
        };
        let digest = parse_digest(&header.digest)?;
        let chunks = parts.map(|part| match part?.part {
            Some(Part::Data(data)) => Ok(data),
            Some(Part::Header(_)) => Err(Status::invalid_argument(
                "an upload has exactly one header, first",
            )),
            None => Ok(Vec::new()),
        });
        let (size, existed) = self.blobs.write(&digest, header.size, chunks).await?;
        tracing::debug!(%digest, size, existed, "blob stored");
        Ok(Response::new(pb::BlobInfo {
            digest: digest.to_string(),
            size,
            existed,
        }))
    }

    type DownloadBlobStream = ChunkStream;

    async fn download_blob(
        &self,
        request: Request<pb::DownloadBlobRequest>,
    ) -> Result<Response<Self::DownloadBlobStream>, Status> {
        let request = request.into_inner();
        let digest = parse_digest(&request.digest)?;
        let Some(size) = self.blobs.stat(&digest) else {
            return Err(Status::not_found(format!("blob {} is not stored", digest)));
        };
        if request.offset > size {
            return Err(Status::out_of_range(format!(
                "offset {} is past the end of blob {} ({size} bytes)",
                request.offset, digest
            )));
        }
        let stream = self
            .blobs
            .read(digest, request.offset)
            .map(|chunk| chunk.map(|data| pb::BlobChunk { data }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_cache(
        &self,
        request: Request<pb::GetCacheRequest>,
    ) -> Result<Response<pb::GetCacheResponse>, Status> {
        let request = request.into_inner();
        let (entry, cleared_generation) = self.caches.get(&request.pipeline, &request.key).await?;
        Ok(Response::new(pb::GetCacheResponse {
            entry: entry.as_ref().map(caches::view),
            cleared_generation,
        }))
    }

    async fn put_cache(
        &self,
        request: Request<pb::PutCacheRequest>,
    ) -> Result<Response<pb::PutCacheResponse>, Status> {
        let agent = Principal::of(&request)?.name;
        let request = request.into_inner();
        let entry = request
            .entry
            .ok_or_else(|| Status::invalid_argument("PutCache needs an entry"))?;
        self.caches
            .put(entry, request.cleared_generation, &agent)
            .await?;
        Ok(Response::new(pb::PutCacheResponse {}))
    }
}
