//! Unpacking an untrusted archive into a directory, checking every entry.

use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tar::{EntryType, PaxExtensions};

use super::paths::{MAX_NAME_BYTES, entry_path, lexical_link_problem, resolved_link_problem};
use super::{ArchiveError, LimitKind, Limits, UnpackSummary};

/// Largest zstd window accepted, as a power of two (16 MiB). Our packer's
/// level needs far less; the default (128 MiB) would let a crafted frame make
/// us allocate that much before writing a byte.
pub(super) const MAX_WINDOW_LOG: u32 = 24;

/// Largest pax extension header read into memory.
pub(super) const MAX_PAX_BYTES: u64 = 64 * 1024;

/// Decompressed bytes read after the end-of-archive marker, to let zstd
/// verify its checksum; our packer leaves at most a few blocks of padding.
pub(super) const MAX_TRAILER_BYTES: u64 = 1 << 20;

/// Unpacks a zstd-compressed tar stream into `target` (created if missing),
/// checking every entry itself rather than trusting the tar crate:
///
/// - names must be relative, without `..`, at most 4096 bytes;
/// - no entry is written through a symlink: each parent must be a real
///   directory (a symlink there, even one that was in `target` before, is an
///   error), and files are created anew with `O_EXCL | O_NOFOLLOW` after
///   removing whatever file or symlink was at their path;
/// - symlinks must have a relative target that stays inside `target`, both
///   by its text and once every symlink in `target` is followed; they are
///   created after all other entries, so nothing is ever written through
///   one;
/// - hard links are refused, all of them: the packer never writes one, and
///   a link to an inode outside `target` would let a later entry write there;
/// - character and block devices, fifos, sparse files and pax global headers
///   are refused, as is a pax `size` (which would make readers disagree on
///   where entries start);
/// - [`Limits`] bound the entry count and the total data, checked before
///   any data of an entry is written.
///
/// Modes are reduced to 0o644, or 0o755 when any execute bit is set;
/// owners and times are not restored.
///
/// On error the caller must discard `target`: whatever was written stays
/// there (and only there).
pub fn unpack(
    input: impl Read,
    target: &Path,
    limits: &Limits,
) -> Result<UnpackSummary, ArchiveError> {
    let target_display = target.display().to_string();
    fs::create_dir_all(target)
        .map_err(|e| ArchiveError::io(format!("creating `{target_display}`"), e))?;
    let root = fs::canonicalize(target)
        .map_err(|e| ArchiveError::io(format!("opening `{target_display}`"), e))?;

    let mut decoder = zstd::Decoder::new(input).map_err(corrupt)?;
    decoder.window_log_max(MAX_WINDOW_LOG).map_err(corrupt)?;
    let mut archive = tar::Archive::new(decoder);
    let mut unpacker = Unpacker {
        root,
        limits: *limits,
        summary: UnpackSummary::default(),
        entries: 0,
        data_bytes: 0,
        long_name: None,
        long_link: None,
        links: Vec::new(),
        checked_dir: None,
    };
    // Raw: extension headers (long names, pax) come to us unparsed, so we
    // can bound what they make us hold in memory; the tar crate would read
    // any size.
    for entry in archive.entries().map_err(corrupt)?.raw(true) {
        let mut entry = entry.map_err(corrupt)?;
        unpacker.entry(&mut entry)?;
    }
    if unpacker.long_name.is_some() || unpacker.long_link.is_some() {
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
    unpacker.create_links()
}

/// State carried from one entry to the next.
struct Unpacker {
    /// The canonical target directory.
    root: PathBuf,
    limits: Limits,
    summary: UnpackSummary,
    /// Entries seen, extension headers not counted.
    entries: u64,
    /// Data bytes of every entry, extension headers and skipped data
    /// included, so no kind of entry escapes `max_bytes`.
    data_bytes: u64,
    /// From a GNU long-name header or a pax `path`, for the next entry.
    long_name: Option<Vec<u8>>,
    /// From a GNU long-link header or a pax `linkpath`, for the next entry.
    long_link: Option<Vec<u8>>,
    /// Symlinks to create once everything else is written: (where, relative
    /// to `root`; target).
    links: Vec<(PathBuf, PathBuf)>,
    /// The last directory checked to be a real directory under `root`;
    /// entries come grouped by directory, so this saves most re-checks.
    checked_dir: Option<PathBuf>,
}

impl Unpacker {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ArchiveError> {
        let entry_type = entry.header().entry_type();
        let size = entry.size();
        self.data_bytes = self.data_bytes.saturating_add(size);
        LimitKind::MaxBytes.check(self.limits.max_bytes, self.data_bytes)?;

        match entry_type {
            EntryType::GNULongName => {
                let name = read_extension(entry, MAX_NAME_BYTES as u64 + 1, "long name")?;
                return set_once(&mut self.long_name, trim_nul(name), "long name");
            }
            EntryType::GNULongLink => {
                let link = read_extension(entry, MAX_NAME_BYTES as u64 + 1, "long link")?;
                return set_once(&mut self.long_link, trim_nul(link), "long link");
            }
            EntryType::XHeader => return self.pax_header(entry),
            _ => {}
        }

        let header = entry.header().clone();
        let name = match self.long_name.take() {
            Some(name) => name,
            None => header.path_bytes().into_owned(),
        };
        let link = match self.long_link.take() {
            Some(link) => Some(link),
            None => header.link_name_bytes().map(|link| link.into_owned()),
        };
        self.entries += 1;
        LimitKind::MaxEntries.check(self.limits.max_entries, self.entries)?;
        let refuse = |reason: &str| ArchiveError::unsafe_entry(&name, reason);
        let rel = entry_path(&name).map_err(|reason| refuse(&reason))?;

        match entry_type {
            EntryType::Regular | EntryType::Continuous => {
                if rel.as_os_str().is_empty() || name.ends_with(b"/") {
                    return Err(refuse("it is a file whose name ends in `/`"));
                }
                let executable = header.mode().map_err(corrupt)? & 0o111 != 0;
                self.write_file(&name, &rel, entry, size, executable)
            }
            EntryType::Directory => {
                if !rel.as_os_str().is_empty() {
                    self.ensure_dir(&name, &rel)?;
                }
                self.summary.dirs += 1;
                Ok(())
            }
            EntryType::Symlink => {
                let target = link.ok_or_else(|| refuse("it is a symlink without a target"))?;
                self.queue_link(&name, rel, target)
            }
            EntryType::Link => Err(refuse(
                "it is a hard link; kiln archives never contain hard links",
            )),
            EntryType::Char => Err(refuse("it is a character device")),
            EntryType::Block => Err(refuse("it is a block device")),
            EntryType::Fifo => Err(refuse("it is a fifo")),
            EntryType::GNUSparse => Err(refuse("it is a sparse file")),
            EntryType::XGlobalHeader => Err(refuse("it is a pax global header")),
            other => Err(refuse(&format!(
                "its type `{}` is not a file, directory or symlink",
                other.as_byte().escape_ascii()
            ))),
        }
    }

    /// Takes `path` and `linkpath` from a pax header for the next entry.
    fn pax_header<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ArchiveError> {
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
        Ok(())
    }

    fn write_file(
        &mut self,
        name: &[u8],
        rel: &Path,
        contents: &mut impl Read,
        size: u64,
        executable: bool,
    ) -> Result<(), ArchiveError> {
        if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            self.ensure_dir(name, parent)?;
        }
        let path = self.root.join(rel);
        let context = |action: &str| format!("{action} `{}`", rel.display());
        self.clear_for(name, &path)?;
        let mode = if executable { 0o755 } else { 0o644 };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| ArchiveError::io(context("creating"), e))?;
        let written = io::copy(contents, &mut file).map_err(corrupt)?;
        if written != size {
            return Err(corrupt(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("`{}` ends early", rel.display()),
            )));
        }
        // The umask may have taken bits from `mode`; fchmod, so no symlink
        // is followed.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| ArchiveError::io(context("setting the mode of"), e))?;
        self.summary.files += 1;
        self.summary.bytes += written;
        Ok(())
    }

    /// Checks the symlink's target by its text now (so the error names the
    /// entry early) and creates it after everything else.
    fn queue_link(
        &mut self,
        name: &[u8],
        rel: PathBuf,
        target: Vec<u8>,
    ) -> Result<(), ArchiveError> {
        let refuse = |reason: String| ArchiveError::unsafe_entry(name, reason);
        if rel.as_os_str().is_empty() {
            return Err(refuse(
                "it is a symlink in place of the target directory".to_owned(),
            ));
        }
        if target.is_empty() || target.len() > MAX_NAME_BYTES || target.contains(&0) {
            return Err(refuse(format!(
                "its symlink target is empty, has a NUL byte or is longer than {MAX_NAME_BYTES} bytes"
            )));
        }
        let target = PathBuf::from(std::ffi::OsStr::from_bytes(&target));
        let dir = rel.parent().unwrap_or(Path::new(""));
        if let Some(problem) = lexical_link_problem(dir, &target) {
            return Err(self.bad_link(&rel, &target, problem));
        }
        if !dir.as_os_str().is_empty() {
            self.ensure_dir(name, dir)?;
        }
        self.links.push((rel, target));
        Ok(())
    }

    /// Creates the queued symlinks, then checks that each resolves inside
    /// the root with all of them (and any that were there before) in place.
    fn create_links(mut self) -> Result<UnpackSummary, ArchiveError> {
        let links = std::mem::take(&mut self.links);
        for (rel, target) in &links {
            let path = self.root.join(rel);
            self.clear_for(rel.as_os_str().as_bytes(), &path)?;
            std::os::unix::fs::symlink(target, &path).map_err(|e| {
                ArchiveError::io(format!("creating symlink `{}`", rel.display()), e)
            })?;
            self.summary.symlinks += 1;
        }
        for (rel, target) in &links {
            let dir = rel.parent().unwrap_or(Path::new(""));
            let problem = resolved_link_problem(&self.root, dir, target).map_err(|e| {
                ArchiveError::io(format!("resolving symlink `{}`", rel.display()), e)
            })?;
            if let Some(problem) = problem {
                return Err(self.bad_link(rel, target, problem));
            }
        }
        Ok(self.summary)
    }

    /// Makes `rel` a real directory under the root, creating what is
    /// missing, and refuses a symlink or a file anywhere on the way.
    fn ensure_dir(&mut self, name: &[u8], rel: &Path) -> Result<(), ArchiveError> {
        if self.checked_dir.as_deref() == Some(rel) {
            return Ok(());
        }
        let mut path = self.root.clone();
        for component in rel.components() {
            path.push(component);
            let shown = || {
                path.strip_prefix(&self.root)
                    .unwrap_or(&path)
                    .display()
                    .to_string()
            };
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_dir() => {}
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(ArchiveError::unsafe_entry(
                        name,
                        format!(
                            "`{}` on its path is a symlink, and entries are never written through symlinks",
                            shown()
                        ),
                    ));
                }
                Ok(_) => {
                    return Err(ArchiveError::unsafe_entry(
                        name,
                        format!("`{}` on its path is not a directory", shown()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // mkdir never follows a symlink at its last component.
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&path)
                        .map_err(|e| ArchiveError::io(format!("creating `{}`", shown()), e))?;
                }
                Err(e) => return Err(ArchiveError::io(format!("reading `{}`", shown()), e)),
            }
        }
        self.checked_dir = Some(rel.to_owned());
        Ok(())
    }

    /// Removes a file or symlink at `path` so an entry can be created there
    /// fresh; a directory there is an error.
    fn clear_for(&self, name: &[u8], path: &Path) -> Result<(), ArchiveError> {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => Err(ArchiveError::unsafe_entry(
                name,
                "a directory is already at its path",
            )),
            Ok(_) => fs::remove_file(path).map_err(|e| {
                ArchiveError::io(format!("replacing `{}`", String::from_utf8_lossy(name)), e)
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ArchiveError::io(
                format!("reading `{}`", String::from_utf8_lossy(name)),
                e,
            )),
        }
    }

    fn bad_link(&self, rel: &Path, target: &Path, reason: &'static str) -> ArchiveError {
        ArchiveError::BadSymlink {
            path: rel.display().to_string(),
            target: target.display().to_string(),
            reason,
            within: "target directory",
        }
    }
}

/// Reads an extension header's data, refusing more than `max` bytes.
pub(super) fn read_extension<R: Read>(
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

pub(super) fn set_once(
    slot: &mut Option<Vec<u8>>,
    value: Vec<u8>,
    what: &str,
) -> Result<(), ArchiveError> {
    if slot.is_some() {
        return Err(ArchiveError::unsafe_entry(
            what.as_bytes(),
            "two of them describe the same entry",
        ));
    }
    *slot = Some(value);
    Ok(())
}

pub(super) fn trim_nul(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    bytes
}

pub(super) fn corrupt(source: io::Error) -> ArchiveError {
    ArchiveError::Corrupt { source }
}
