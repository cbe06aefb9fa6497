//! Listing the regular files of an archive with their digests, without
//! unpacking it.

use std::io::{self, Read};

use super::walk::{Kind, copy_contents, walk};
use super::{ArchiveError, HashingWriter, Limits};
use crate::archive::BlobDigest;

/// One regular file inside an archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchivedFile {
    /// The entry's name as [`super::unpack`] would write it, relative to the
    /// workspace and `/`-separated (`build/model/model.pkl`). A name that is
    /// not UTF-8 is shown lossily; its digest still identifies it.
    pub path: String,
    pub digest: BlobDigest,
    pub size: u64,
}

/// Lists every regular file of a zstd-compressed tar stream with the sha256
/// of its contents, in archive order (sorted, for archives kiln packed).
///
/// Contents stream through the hasher, so memory stays bounded by the
/// number of entries, which [`Limits`] caps along with the bytes. It reads
/// through the same walker as [`super::unpack`] (names, limits, refused
/// kinds), so an archive lists exactly when it would unpack. Directories
/// and symlinks are not listed: a symlink's target is listed under its own
/// name.
pub fn list_files(input: impl Read, limits: &Limits) -> Result<Vec<ArchivedFile>, ArchiveError> {
    let mut files = Vec::new();
    walk(input, limits, |member| {
        if let Kind::File { size, .. } = member.kind {
            let mut hashing = HashingWriter::new(io::sink());
            copy_contents(member.contents, &member.rel, size, &mut hashing)?;
            let info = hashing.finish().1;
            files.push(ArchivedFile {
                path: member.rel.to_string_lossy().into_owned(),
                digest: info.digest,
                size: info.size,
            });
        }
        Ok(())
    })?;
    Ok(files)
}
