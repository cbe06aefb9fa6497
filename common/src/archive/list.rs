//! Listing the regular files of an archive with their digests, without
//! unpacking it.

use std::io::{self, Read};

use tar::{EntryType, PaxExtensions};

use super::paths::{MAX_NAME_BYTES, entry_path};
use super::unpack::{
    MAX_PAX_BYTES, MAX_TRAILER_BYTES, MAX_WINDOW_LOG, corrupt, read_extension, set_once, trim_nul,
};
use super::{ArchiveError, HashingWriter, LimitKind, Limits};
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
/// number of entries, which [`Limits`] caps along with the bytes. Names are
/// checked as [`super::unpack`] checks them, and the same entry kinds are
/// refused (hard links, devices, fifos, sparse files), so an archive lists
/// exactly when it would unpack. Directories and symlinks are not listed:
/// a symlink's target is listed under its own name.
pub fn list_files(input: impl Read, limits: &Limits) -> Result<Vec<ArchivedFile>, ArchiveError> {
    let mut decoder = zstd::Decoder::new(input).map_err(corrupt)?;
    decoder.window_log_max(MAX_WINDOW_LOG).map_err(corrupt)?;
    let mut archive = tar::Archive::new(decoder);
    let mut files = Vec::new();
    let mut entries = 0u64;
    let mut data_bytes = 0u64;
    let mut long_name: Option<Vec<u8>> = None;
    // Read so the next entry's header is found, and otherwise unused.
    let mut long_link: Option<Vec<u8>> = None;

    // Raw, as in `unpack`: extension headers come to us so their size is
    // bounded before they are read into memory.
    for entry in archive.entries().map_err(corrupt)?.raw(true) {
        let mut entry = entry.map_err(corrupt)?;
        let entry_type = entry.header().entry_type();
        let size = entry.size();
        data_bytes = data_bytes.saturating_add(size);
        LimitKind::MaxBytes.check(limits.max_bytes, data_bytes)?;

        match entry_type {
            EntryType::GNULongName => {
                let name = read_extension(&mut entry, MAX_NAME_BYTES as u64 + 1, "long name")?;
                set_once(&mut long_name, trim_nul(name), "long name")?;
                continue;
            }
            EntryType::GNULongLink => {
                let link = read_extension(&mut entry, MAX_NAME_BYTES as u64 + 1, "long link")?;
                set_once(&mut long_link, trim_nul(link), "long link")?;
                continue;
            }
            EntryType::XHeader => {
                let data = read_extension(&mut entry, MAX_PAX_BYTES, "pax header")?;
                for extension in PaxExtensions::new(&data) {
                    let extension = extension.map_err(corrupt)?;
                    let value = extension.value_bytes().to_vec();
                    match extension.key_bytes() {
                        b"path" => set_once(&mut long_name, value, "path")?,
                        b"linkpath" => set_once(&mut long_link, value, "linkpath")?,
                        key @ (b"size" | b"GNU.sparse.size" | b"GNU.sparse.map") => {
                            return Err(ArchiveError::unsafe_entry(
                                b"pax header",
                                format!("it sets `{}`", key.escape_ascii()),
                            ));
                        }
                        _ => {}
                    }
                }
                continue;
            }
            _ => {}
        }

        let name = match long_name.take() {
            Some(name) => name,
            None => entry.header().path_bytes().into_owned(),
        };
        long_link = None;
        entries += 1;
        LimitKind::MaxEntries.check(limits.max_entries, entries)?;
        let refuse = |reason: &str| ArchiveError::unsafe_entry(&name, reason);
        let rel = entry_path(&name).map_err(|reason| refuse(&reason))?;

        match entry_type {
            EntryType::Regular | EntryType::Continuous => {
                if rel.as_os_str().is_empty() || name.ends_with(b"/") {
                    return Err(refuse("it is a file whose name ends in `/`"));
                }
                let mut hashing = HashingWriter::new(io::sink());
                let read = io::copy(&mut entry, &mut hashing).map_err(corrupt)?;
                if read != size {
                    return Err(corrupt(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("`{}` ends early", rel.display()),
                    )));
                }
                let info = hashing.finish().1;
                files.push(ArchivedFile {
                    path: rel.to_string_lossy().into_owned(),
                    digest: info.digest,
                    size: info.size,
                });
            }
            EntryType::Directory | EntryType::Symlink => {}
            other => {
                return Err(refuse(&format!(
                    "its type `{}` is not a file, directory or symlink",
                    other.as_byte().escape_ascii()
                )));
            }
        }
    }
    if long_name.is_some() || long_link.is_some() {
        return Err(corrupt(io::Error::other(
            "the archive ends after a long-name header",
        )));
    }
    // As in `unpack`: reading to the end of the frame checks its checksum.
    let trailer = io::copy(
        &mut archive.into_inner().take(MAX_TRAILER_BYTES + 1),
        &mut io::sink(),
    )
    .map_err(corrupt)?;
    if trailer > MAX_TRAILER_BYTES {
        return Err(corrupt(io::Error::other(
            "data continues after the end of the archive",
        )));
    }
    Ok(files)
}
