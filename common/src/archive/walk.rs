//! The one reader of an untrusted archive's entries, shared by
//! [`super::unpack`] and [`super::list_files`], so an archive lists exactly
//! when it would unpack.
//!
//! It decompresses with a bounded window, reads extension headers itself
//! (GNU long names and links, pax `path` and `linkpath`) with their size
//! bounded before they are read into memory, resolves each member's name,
//! checks it (relative, no `..`, bounded), counts entries and bytes against
//! [`Limits`], refuses every kind of entry Kiln never writes, and at the end
//! reads to the end of the zstd frame so its checksum is verified.

use std::io::{self, Read};
use std::path::PathBuf;

use tar::{EntryType, PaxExtensions};

use super::paths::{MAX_NAME_BYTES, entry_path};
use super::{ArchiveError, LimitKind, Limits};

/// Largest zstd window accepted, as a power of two (16 MiB). Our packer's
/// level needs far less; the default (128 MiB) would let a crafted frame make
/// us allocate that much before writing a byte.
const MAX_WINDOW_LOG: u32 = 24;

/// Largest pax extension header read into memory.
const MAX_PAX_BYTES: u64 = 64 * 1024;

/// Decompressed bytes read after the end-of-archive marker, to let zstd
/// verify its checksum; our packer leaves at most a few blocks of padding.
const MAX_TRAILER_BYTES: u64 = 1 << 20;

/// What a member is; every other kind of entry is refused by the walker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    File { size: u64, executable: bool },
    Dir,
    Symlink,
}

/// One member of the archive, its extension headers applied.
pub(super) struct Member<'a> {
    /// The name as stored, for error messages.
    pub(super) name: Vec<u8>,
    /// The checked relative path (empty for the archive's root directory).
    pub(super) rel: PathBuf,
    pub(super) kind: Kind,
    /// A symlink's target as stored (checked by whoever creates it).
    pub(super) link: Option<Vec<u8>>,
    /// A file's contents; read exactly `size` bytes or fewer.
    pub(super) contents: &'a mut dyn Read,
}

/// Calls `each` for every member of the zstd-compressed tar stream
/// `input`, in archive order, stopping at the first error.
pub(super) fn walk(
    input: impl Read,
    limits: &Limits,
    mut each: impl FnMut(Member<'_>) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let mut decoder = zstd::Decoder::new(input).map_err(corrupt)?;
    decoder.window_log_max(MAX_WINDOW_LOG).map_err(corrupt)?;
    let mut archive = tar::Archive::new(decoder);
    let mut headers = Headers::default();
    let mut entries = 0u64;
    // Data bytes of every entry, extension headers and skipped data
    // included, so no kind of entry escapes `max_bytes`.
    let mut data_bytes = 0u64;
    // Raw: extension headers come to us unparsed, so we can bound what they
    // make us hold in memory; the tar crate would read any size.
    for entry in archive.entries().map_err(corrupt)?.raw(true) {
        let mut entry = entry.map_err(corrupt)?;
        let entry_type = entry.header().entry_type();
        let size = entry.size();
        data_bytes = data_bytes.saturating_add(size);
        LimitKind::MaxBytes.check(limits.max_bytes, data_bytes)?;
        if headers.take_extension(entry_type, &mut entry)? {
            continue;
        }
        let header = entry.header().clone();
        let name = match headers.long_name.take() {
            Some(name) => name,
            None => header.path_bytes().into_owned(),
        };
        let link = match headers.long_link.take() {
            Some(link) => Some(link),
            None => header.link_name_bytes().map(|link| link.into_owned()),
        };
        entries += 1;
        LimitKind::MaxEntries.check(limits.max_entries, entries)?;
        let refuse = |reason: &str| ArchiveError::unsafe_entry(&name, reason);
        let rel = entry_path(&name).map_err(|reason| refuse(&reason))?;
        let kind = match entry_type {
            EntryType::Regular | EntryType::Continuous => {
                if rel.as_os_str().is_empty() || name.ends_with(b"/") {
                    return Err(refuse("it is a file whose name ends in `/`"));
                }
                let executable = header.mode().map_err(corrupt)? & 0o111 != 0;
                Kind::File { size, executable }
            }
            EntryType::Directory => Kind::Dir,
            EntryType::Symlink => Kind::Symlink,
            EntryType::Link => {
                return Err(refuse(
                    "it is a hard link; kiln archives never contain hard links",
                ));
            }
            EntryType::Char => return Err(refuse("it is a character device")),
            EntryType::Block => return Err(refuse("it is a block device")),
            EntryType::Fifo => return Err(refuse("it is a fifo")),
            EntryType::GNUSparse => return Err(refuse("it is a sparse file")),
            EntryType::XGlobalHeader => return Err(refuse("it is a pax global header")),
            other => {
                return Err(refuse(&format!(
                    "its type `{}` is not a file, directory or symlink",
                    other.as_byte().escape_ascii()
                )));
            }
        };
        each(Member {
            name,
            rel,
            kind,
            link,
            contents: &mut entry,
        })?;
    }
    if headers.long_name.is_some() || headers.long_link.is_some() {
        return Err(corrupt(io::Error::other(
            "the archive ends after a long-name header",
        )));
    }
    // Reading to the end of the zstd frame makes zstd verify its checksum.
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
    Ok(())
}

/// Names carried from extension headers to the entry they describe.
#[derive(Default)]
struct Headers {
    /// From a GNU long-name header or a pax `path`.
    long_name: Option<Vec<u8>>,
    /// From a GNU long-link header or a pax `linkpath`.
    long_link: Option<Vec<u8>>,
}

impl Headers {
    /// Reads `entry` if it is an extension header; `true` when it was one.
    fn take_extension<R: Read>(
        &mut self,
        entry_type: EntryType,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<bool, ArchiveError> {
        match entry_type {
            EntryType::GNULongName => {
                let name = read_extension(entry, MAX_NAME_BYTES as u64 + 1, "long name")?;
                set_once(&mut self.long_name, trim_nul(name), "long name")?;
            }
            EntryType::GNULongLink => {
                let link = read_extension(entry, MAX_NAME_BYTES as u64 + 1, "long link")?;
                set_once(&mut self.long_link, trim_nul(link), "long link")?;
            }
            EntryType::XHeader => {
                let data = read_extension(entry, MAX_PAX_BYTES, "pax header")?;
                for extension in PaxExtensions::new(&data) {
                    let extension = extension.map_err(corrupt)?;
                    let value = extension.value_bytes().to_vec();
                    match extension.key_bytes() {
                        b"path" => set_once(&mut self.long_name, value, "path")?,
                        b"linkpath" => set_once(&mut self.long_link, value, "linkpath")?,
                        key @ (b"size" | b"GNU.sparse.size" | b"GNU.sparse.map") => {
                            return Err(ArchiveError::unsafe_entry(
                                b"pax header",
                                format!("it sets `{}`", key.escape_ascii()),
                            ));
                        }
                        // Times, owners, xattrs, comments: nothing we restore.
                        _ => {}
                    }
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Reads an extension header's data, refusing more than `max` bytes.
fn read_extension<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    max: u64,
    what: &str,
) -> Result<Vec<u8>, ArchiveError> {
    let size = entry.size();
    if size > max {
        return Err(ArchiveError::unsafe_entry(
            what.as_bytes(),
            format!("it is {size} bytes, over the {max} accepted"),
        ));
    }
    let mut data = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut data).map_err(corrupt)?;
    Ok(data)
}

fn set_once(slot: &mut Option<Vec<u8>>, value: Vec<u8>, what: &str) -> Result<(), ArchiveError> {
    if slot.is_some() {
        return Err(ArchiveError::unsafe_entry(
            what.as_bytes(),
            "two of them describe the same entry",
        ));
    }
    *slot = Some(value);
    Ok(())
}

fn trim_nul(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    bytes
}

pub(super) fn corrupt(source: io::Error) -> ArchiveError {
    ArchiveError::Corrupt { source }
}

/// Reads a file member's `contents` into `out`, checking that all `size`
/// bytes were there (`rel` names the member in the error).
pub(super) fn copy_contents(
    contents: &mut dyn Read,
    rel: &std::path::Path,
    size: u64,
    out: &mut impl io::Write,
) -> Result<u64, ArchiveError> {
    let read = io::copy(contents, out).map_err(corrupt)?;
    if read != size {
        return Err(corrupt(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("`{}` ends early", rel.display()),
        )));
    }
    Ok(read)
}
