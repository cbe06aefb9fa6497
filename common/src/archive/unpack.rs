//! Unpacking an untrusted archive into a directory, checking every entry.

use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::paths::{MAX_NAME_BYTES, lexical_link_problem, resolved_link_problem};
use super::walk::{Kind, Member, copy_contents, walk};
use super::{ArchiveError, Limits, UnpackSummary};

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

    let mut unpacker = Unpacker {
        root,
        summary: UnpackSummary::default(),
        links: Vec::new(),
        checked_dir: None,
    };
    walk(input, limits, |member| unpacker.member(member))?;
    unpacker.create_links()
}

/// State carried from one entry to the next.
struct Unpacker {
    /// The canonical target directory.
    root: PathBuf,
    summary: UnpackSummary,
    /// Symlinks to create once everything else is written: (where, relative
    /// to `root`; target).
    links: Vec<(PathBuf, PathBuf)>,
    /// The last directory checked to be a real directory under `root`;
    /// entries come grouped by directory, so this saves most re-checks.
    checked_dir: Option<PathBuf>,
}

impl Unpacker {
    fn member(&mut self, mut member: Member<'_>) -> Result<(), ArchiveError> {
        match member.kind {
            Kind::File { size, executable } => self.write_file(&mut member, size, executable),
            Kind::Dir => {
                if !member.rel.as_os_str().is_empty() {
                    self.ensure_dir(&member.name, &member.rel)?;
                }
                self.summary.dirs += 1;
                Ok(())
            }
            Kind::Symlink => {
                let target = member.link.ok_or_else(|| {
                    ArchiveError::unsafe_entry(&member.name, "it is a symlink without a target")
                })?;
                self.queue_link(&member.name, member.rel, target)
            }
        }
    }

    fn write_file(
        &mut self,
        member: &mut Member<'_>,
        size: u64,
        executable: bool,
    ) -> Result<(), ArchiveError> {
        let Member {
            name,
            rel,
            contents,
            ..
        } = member;
        let (name, rel) = (name.as_slice(), rel.as_path());
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
        let written = copy_contents(*contents, rel, size, &mut file)?;
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
