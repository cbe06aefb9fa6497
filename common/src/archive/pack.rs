//! Packing a workspace path or a source tree into a deterministic archive.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ignore::WalkBuilder;
use tar::{EntryType, Header};

use super::paths::{lexical_link_problem, normalize_artifact_path, resolved_link_problem};
use super::{ArchiveError, ArtifactKind, LimitKind, Limits, PackSummary};

/// zstd's default level: it keeps up with a disk, and model weights, the
/// bulk of ML artifacts, gain little from higher levels.
const ZSTD_LEVEL: i32 = 3;

/// Packs `workspace/path`, a file or a directory tree, with entries named
/// relative to `workspace` (`build/model/weights.bin`), so unpacking into
/// another workspace restores the same paths. See [`pack_with_limits`].
pub fn pack(workspace: &Path, path: &str, out: impl Write) -> Result<PackSummary, ArchiveError> {
    pack_with_limits(workspace, path, out, &Limits::UNLIMITED)
}

/// [`pack`], failing once the content is over `limits`.
///
/// `path` must pass [`super::check_artifact_path`] and resolve inside the
/// workspace; a symlinked parent or a symlink as `path` itself is followed
/// only while it stays inside. Symlinks under `path` are stored as symlinks
/// when their target is relative and resolves inside the workspace, and are
/// an error otherwise. Sockets, fifos and devices are an error. Hard links
/// are stored as separate copies of the file.
pub fn pack_with_limits(
    workspace: &Path,
    path: &str,
    out: impl Write,
    limits: &Limits,
) -> Result<PackSummary, ArchiveError> {
    let name = normalize_artifact_path(path)?;
    let root = canonical_dir(workspace, "workspace")?;
    let display = name.display().to_string();
    let source = match fs::canonicalize(root.join(&name)) {
        Ok(source) => source,
        Err(e) if is_missing(&e) => return Err(ArchiveError::Missing { path: display }),
        Err(e) => return Err(ArchiveError::io(format!("resolving `{display}`"), e)),
    };
    if source == root {
        return Err(ArchiveError::InvalidPath {
            path: path.to_owned(),
            reason: "resolves to the workspace itself through a symlink; name what the stage \
                     produces inside it"
                .to_owned(),
        });
    }
    if !source.starts_with(&root) {
        return Err(ArchiveError::OutsideWorkspace { path: display });
    }
    let kind = match fs::metadata(&source) {
        Ok(meta) if meta.is_dir() => ArtifactKind::Dir,
        Ok(_) => ArtifactKind::File,
        Err(e) => return Err(ArchiveError::io(format!("reading `{display}`"), e)),
    };

    let mut writer = ArchiveWriter::new(out, root, *limits, "workspace")?;
    let walk = WalkBuilder::new(&source)
        .standard_filters(false)
        .follow_links(false)
        .sort_by_file_name(OsStr::cmp)
        .build();
    for entry in walk {
        let entry = entry.map_err(|e| walk_error(&display, e))?;
        let rel = entry
            .path()
            .strip_prefix(&source)
            .expect("the walk stays under its root");
        // `join("")` would add a trailing slash.
        let entry_name = if rel.as_os_str().is_empty() {
            name.clone()
        } else {
            name.join(rel)
        };
        writer.add(entry.path(), &entry_name)?;
    }
    writer.finish(kind)
}

/// Packs the tree under `dir` with entries named relative to `dir`, for
/// `kiln run --source`. See [`pack_source_with_limits`].
pub fn pack_source(dir: &Path, out: impl Write) -> Result<PackSummary, ArchiveError> {
    pack_source_with_limits(dir, out, &Limits::UNLIMITED)
}

/// [`pack_source`], failing once the content is over `limits`.
///
/// Skips what git would: `.gitignore`, `.ignore`, `.git/info/exclude` and
/// git's global excludes file, as the `ignore` crate reads them, also when
/// `dir` is not inside a git repository. Dotfiles are kept; `.git` is always
/// skipped. Symlinks and special files follow the rules of [`pack`].
pub fn pack_source_with_limits(
    dir: &Path,
    out: impl Write,
    limits: &Limits,
) -> Result<PackSummary, ArchiveError> {
    let root = canonical_dir(dir, "source directory")?;
    let display = dir.display().to_string();
    let mut writer = ArchiveWriter::new(out, root.clone(), *limits, "source directory")?;
    let walk = WalkBuilder::new(&root)
        .hidden(false)
        .require_git(false)
        .filter_entry(|entry| entry.file_name() != ".git")
        .sort_by_file_name(OsStr::cmp)
        .build();
    for entry in walk {
        let entry = entry.map_err(|e| walk_error(&display, e))?;
        if entry.depth() == 0 {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(&root)
            .expect("the walk stays under its root");
        writer.add(entry.path(), rel)?;
    }
    writer.finish(ArtifactKind::Dir)
}

/// The tar builder inside the zstd encoder, with the counters for
/// [`Limits`] and the root symlinks must stay inside.
struct ArchiveWriter<W: Write> {
    tar: tar::Builder<zstd::Encoder<'static, W>>,
    /// Canonical; symlink targets are resolved against it.
    root: PathBuf,
    limits: Limits,
    /// What `root` is, for error messages.
    within: &'static str,
    entries: u64,
    files: u64,
    bytes: u64,
}

impl<W: Write> ArchiveWriter<W> {
    fn new(
        out: W,
        root: PathBuf,
        limits: Limits,
        within: &'static str,
    ) -> Result<Self, ArchiveError> {
        let mut encoder = zstd::Encoder::new(out, ZSTD_LEVEL).map_err(write_error)?;
        // Lets `unpack` tell a corrupt download from a hostile archive.
        encoder.include_checksum(true).map_err(write_error)?;
        Ok(ArchiveWriter {
            tar: tar::Builder::new(encoder),
            root,
            limits,
            within,
            entries: 0,
            files: 0,
            bytes: 0,
        })
    }

    /// Adds the directory, file or symlink at `source` (under `root`) as the
    /// entry `name`; a directory's contents are added by later calls.
    fn add(&mut self, source: &Path, name: &Path) -> Result<(), ArchiveError> {
        let context = |action: &str| format!("{action} `{}`", name.display());
        let meta =
            fs::symlink_metadata(source).map_err(|e| ArchiveError::io(context("reading"), e))?;
        self.entries += 1;
        LimitKind::MaxEntries.check(self.limits.max_entries, self.entries)?;
        let file_type = meta.file_type();
        if file_type.is_dir() {
            let mut header = fixed_header(EntryType::Directory, 0o755);
            self.tar
                .append_data(&mut header, name, io::empty())
                .map_err(|e| ArchiveError::io(context("packing"), e))
        } else if file_type.is_symlink() {
            self.add_symlink(source, name)
        } else if file_type.is_file() {
            self.add_file(source, name)
        } else {
            Err(ArchiveError::SpecialFile {
                path: name.display().to_string(),
                kind: special_kind(&meta.file_type()),
            })
        }
    }

    fn add_file(&mut self, source: &Path, name: &Path) -> Result<(), ArchiveError> {
        let context = |action: &str| format!("{action} `{}`", name.display());
        // The walk saw a regular file; O_NOFOLLOW and the fstat below make
        // sure that is still what we read (O_NONBLOCK: a fifo swapped in
        // cannot hang the open).
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(source)
            .map_err(|e| ArchiveError::io(context("opening"), e))?;
        let meta = file
            .metadata()
            .map_err(|e| ArchiveError::io(context("reading"), e))?;
        if !meta.is_file() {
            return Err(ArchiveError::SpecialFile {
                path: name.display().to_string(),
                kind: special_kind(&meta.file_type()),
            });
        }
        let size = meta.len();
        self.bytes = self.bytes.saturating_add(size);
        LimitKind::MaxBytes.check(self.limits.max_bytes, self.bytes)?;
        let executable = meta.permissions().mode() & 0o111 != 0;
        let mut header = fixed_header(EntryType::Regular, if executable { 0o755 } else { 0o644 });
        header.set_size(size);
        let contents = ExactReader {
            file,
            remaining: size,
        };
        self.tar
            .append_data(&mut header, name, contents)
            .map_err(|e| ArchiveError::io(context("packing"), e))?;
        self.files += 1;
        Ok(())
    }

    fn add_symlink(&mut self, source: &Path, name: &Path) -> Result<(), ArchiveError> {
        let context = |action: &str| format!("{action} `{}`", name.display());
        let target = fs::read_link(source).map_err(|e| ArchiveError::io(context("reading"), e))?;
        // Judged twice: where it will live once unpacked (by its text), and
        // where it lives now (following the symlinks around it).
        let name_dir = name.parent().unwrap_or(Path::new(""));
        let source_dir = source
            .parent()
            .and_then(|dir| dir.strip_prefix(&self.root).ok())
            .expect("the walk stays under the root");
        let problem = match lexical_link_problem(name_dir, &target) {
            Some(problem) => Some(problem),
            None => resolved_link_problem(&self.root, source_dir, &target)
                .map_err(|e| ArchiveError::io(context("resolving symlink"), e))?,
        };
        if let Some(reason) = problem {
            return Err(ArchiveError::BadSymlink {
                path: name.display().to_string(),
                target: target.display().to_string(),
                reason,
                within: self.within,
            });
        }
        let mut header = fixed_header(EntryType::Symlink, 0o777);
        self.tar
            .append_link(&mut header, name, &target)
            .map_err(|e| ArchiveError::io(context("packing"), e))
    }

    fn finish(self, kind: ArtifactKind) -> Result<PackSummary, ArchiveError> {
        let encoder = self.tar.into_inner().map_err(write_error)?;
        let mut out = encoder.finish().map_err(write_error)?;
        out.flush().map_err(write_error)?;
        Ok(PackSummary {
            kind,
            files: self.files,
            bytes_in: self.bytes,
        })
    }
}

/// A header with everything that varies between machines or checkouts
/// (times, owners, most mode bits) fixed, so the same content gives the same
/// archive bytes.
fn fixed_header(entry_type: EntryType, mode: u32) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(entry_type);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(0);
    header
}

/// A file's contents, exactly `remaining` bytes of them: a file that grew
/// since its size went into the header is cut there, and one that shrank is
/// an error, since either way the tar stream would no longer line up.
struct ExactReader {
    file: File,
    remaining: u64,
}

impl Read for ExactReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let len = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let read = self.file.read(&mut buf[..len])?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being packed",
            ));
        }
        self.remaining -= read as u64;
        Ok(read)
    }
}

fn canonical_dir(dir: &Path, what: &str) -> Result<PathBuf, ArchiveError> {
    let context = || format!("opening {what} `{}`", dir.display());
    let canonical = fs::canonicalize(dir).map_err(|e| ArchiveError::io(context(), e))?;
    if !canonical.is_dir() {
        return Err(ArchiveError::io(
            context(),
            io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    Ok(canonical)
}

fn is_missing(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(libc::ENOTDIR)
}

fn special_kind(file_type: &fs::FileType) -> &'static str {
    if file_type.is_fifo() {
        "fifo"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

fn walk_error(root: &str, error: ignore::Error) -> ArchiveError {
    ArchiveError::io(format!("walking `{root}`"), io::Error::other(error))
}

fn write_error(error: io::Error) -> ArchiveError {
    ArchiveError::io("writing the archive", error)
}
