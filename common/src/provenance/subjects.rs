//! The subjects of a release: each released archive, and every regular file
//! inside it.

use std::collections::HashSet;
use std::io::{self, Read, Write};

use super::{ProvenanceError, ReleaseFacts, Subject};
use crate::archive::{ArchivedFile, BlobDigest, HashingWriter, Limits, list_files};

/// An artifact archive as [`list_archive`] read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveListing {
    /// The sha256 of the archive bytes as read, not as claimed, so a listing
    /// can only be matched to the archive it came from.
    pub digest: BlobDigest,
    pub files: Vec<ArchivedFile>,
}

/// Reads a tar + zstd artifact archive to its end, hashing it whole and each
/// regular file inside, in one streaming pass (memory is bounded by the
/// number of entries, which `limits` caps).
pub fn list_archive(
    archive: impl Read,
    limits: &Limits,
) -> Result<ArchiveListing, ProvenanceError> {
    let mut hashing = HashingReader {
        inner: archive,
        hashing: HashingWriter::new(io::sink()),
    };
    let files = list_files(&mut hashing, limits)?;
    // The decoder stops at the end of the zstd frame; whatever follows is
    // still part of the blob whose digest we report.
    io::copy(&mut hashing, &mut io::sink())
        .map_err(|e| ProvenanceError::io("reading the rest of the archive", e))?;
    let digest = hashing.hashing.finish().1.digest;
    Ok(ArchiveListing { digest, files })
}

/// The subjects of a release, in artifact order: for each artifact, its
/// archive as `<stage>/<artifact path>.tar.zst`, then each file in it as
/// `<stage>/<path in the archive>` (archive paths are relative to the
/// workspace, so `train/build/model/model.pkl`). The stage prefix keeps
/// names unique across stages; a file listed twice (two artifacts of one
/// stage that overlap) is listed once.
///
/// `listings` must hold one listing per artifact digest, from
/// [`list_archive`]; an artifact without one is an error, since its files
/// would silently not be verifiable.
pub fn subjects(
    facts: &ReleaseFacts,
    listings: &[ArchiveListing],
) -> Result<Vec<Subject>, ProvenanceError> {
    let mut subjects: Vec<Subject> = Vec::new();
    // A set, not `subjects.contains`: an artifact may hold up to
    // `max_entries` (a million) files, and a linear search per file made
    // signing such a release quadratic.
    let mut seen: HashSet<(String, BlobDigest)> = HashSet::new();
    let mut push = |name: String, digest: BlobDigest| {
        if seen.insert((name.clone(), digest)) {
            subjects.push(Subject::new(name, digest));
        }
    };
    for artifact in &facts.artifacts {
        let listing = listings
            .iter()
            .find(|listing| listing.digest == artifact.digest)
            .ok_or_else(|| ProvenanceError::MissingListing {
                stage: artifact.stage.clone(),
                path: artifact.path.clone(),
                digest: artifact.digest,
            })?;
        let path = artifact.path.trim_end_matches('/');
        push(
            format!("{}/{path}.tar.zst", artifact.stage),
            artifact.digest,
        );
        for file in &listing.files {
            push(format!("{}/{}", artifact.stage, file.path), file.digest);
        }
    }
    Ok(subjects)
}

/// A [`Read`] adapter that hashes every byte read through it.
struct HashingReader<R> {
    inner: R,
    hashing: HashingWriter<io::Sink>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.hashing.write_all(&buf[..read])?;
        Ok(read)
    }
}
