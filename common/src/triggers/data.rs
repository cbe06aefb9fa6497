//! `data:` triggers: a directory on the coordinator host whose content,
//! once it changes and then holds still, starts a run.
//!
//! [`digest_tree`] condenses the tree into one digest each poll;
//! [`DataWatch`] decides which digests start runs.
//!
//! # Debounce
//! A new digest starts a run only after it has been observed unchanged for
//! `settle`: a file still being copied in changes the digest between polls,
//! which restarts the wait. A digest that started a run never starts another
//! while it is still the latest one; content that changes and later returns
//! to an earlier state is new again (something did change) and, once
//! settled, starts a run. With no run started yet (`None`), the first
//! settled content starts one, so registering a watch on a directory that
//! already holds data builds that data.

use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// A directory tree's content in one digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeDigest {
    /// `sha256:<hex>` over every entry's relative path, type and content.
    pub digest: String,
    /// Regular files and symlinks (everything but directories).
    pub n_files: u64,
    /// Total size of the regular files' content.
    pub n_bytes: u64,
}

/// Why a tree could not be digested; each names the path. A file that
/// disappears mid-walk is an [`DataError::Io`] with `NotFound`: the next
/// poll sees the tree as it then is.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read `{path}`: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("`{path}` is not a directory; `watch` must name a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "`{path}` is a {kind}; a watched directory may hold only files, directories and symlinks"
    )]
    Unsupported { path: PathBuf, kind: &'static str },
}

/// Digests the tree under `root` (which itself may be a symlink to a
/// directory). Entries are visited depth first in byte order of their
/// names; each contributes its path relative to `root`, its type, and for a
/// file the SHA-256 and length of its content, for a symlink its target
/// (never followed). Permissions and times are not part of the digest.
pub fn digest_tree(root: &Path) -> Result<TreeDigest, DataError> {
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| DataError::Io { path, source }
    };
    if !fs::metadata(root).map_err(io_error(root))?.is_dir() {
        return Err(DataError::NotADirectory {
            path: root.to_owned(),
        });
    }
    let mut tree = Sha256::new();
    let (mut n_files, mut n_bytes) = (0, 0);
    // Directories still to list, as paths relative to `root`; an explicit
    // stack so that deep trees cannot overflow ours.
    let mut pending: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(relative_dir) = pending.pop() {
        let dir = root.join(&relative_dir);
        let mut names = fs::read_dir(&dir)
            .map_err(io_error(&dir))?
            .map(|entry| entry.map(|entry| entry.file_name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_error(&dir))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut subdirs = Vec::new();
        for name in names {
            let relative = relative_dir.join(&name);
            let path = root.join(&relative);
            let file_type = fs::symlink_metadata(&path)
                .map_err(io_error(&path))?
                .file_type();
            let record = |tree: &mut Sha256, tag: u8| {
                tree.update([tag]);
                let bytes = relative.as_os_str().as_bytes();
                tree.update((bytes.len() as u64).to_be_bytes());
                tree.update(bytes);
            };
            if file_type.is_dir() {
                record(&mut tree, b'd');
                subdirs.push(relative.clone());
            } else if file_type.is_symlink() {
                let target = fs::read_link(&path).map_err(io_error(&path))?;
                record(&mut tree, b'l');
                let bytes = target.as_os_str().as_bytes();
                tree.update((bytes.len() as u64).to_be_bytes());
                tree.update(bytes);
                n_files += 1;
            } else if file_type.is_file() {
                let mut content = Sha256::new();
                let mut file = File::open(&path).map_err(io_error(&path))?;
                let len = io::copy(&mut file, &mut content).map_err(io_error(&path))?;
                record(&mut tree, b'f');
                tree.update(len.to_be_bytes());
                tree.update(content.finalize());
                n_files += 1;
                n_bytes += len;
            } else {
                return Err(DataError::Unsupported {
                    path,
                    kind: special_kind(&file_type),
                });
            }
        }
        // Popped last-first, so push in reverse to visit in name order.
        pending.extend(subdirs.into_iter().rev());
    }
    Ok(TreeDigest {
        digest: format!("sha256:{}", hex::encode(tree.finalize())),
        n_files,
        n_bytes,
    })
}

fn special_kind(file_type: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_fifo() {
        "fifo"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "device"
    } else {
        "special file"
    }
}

/// The debounce of one data trigger (see the module's policy). Plain state:
/// the coordinator feeds it each poll's digest and persists the digest it
/// returns as the one last triggered.
#[derive(Clone, Debug)]
pub struct DataWatch {
    /// The digest of the last run this trigger started, if any.
    last_triggered: Option<String>,
    /// How long a new digest must hold before it starts a run.
    settle: Duration,
    /// A digest that differs from `last_triggered`, and when (ms since the
    /// epoch) it was first observed in its current stretch.
    candidate: Option<(String, u64)>,
}

impl DataWatch {
    /// `last_triggered_digest` is what the store recorded (`None` before the
    /// first run); `settle` comes from the pipeline's `data.settle`.
    pub fn new(last_triggered_digest: Option<String>, settle: Duration) -> Self {
        Self {
            last_triggered: last_triggered_digest,
            settle,
            candidate: None,
        }
    }

    /// Records one poll's digest at `now_ms` (ms since the Unix epoch) and
    /// returns the digest to start a run for, at most once per settled
    /// change. A clock that goes back counts as no time passing.
    pub fn observe(&mut self, digest: &str, now_ms: u64) -> Option<String> {
        if self.last_triggered.as_deref() == Some(digest) {
            self.candidate = None;
            return None;
        }
        let since_ms = match &self.candidate {
            Some((candidate, since_ms)) if candidate == digest => *since_ms,
            _ => {
                self.candidate = Some((digest.to_owned(), now_ms));
                now_ms
            }
        };
        let held = Duration::from_millis(now_ms.saturating_sub(since_ms));
        if held < self.settle {
            return None;
        }
        self.candidate = None;
        self.last_triggered = Some(digest.to_owned());
        self.last_triggered.clone()
    }

    /// The digest of the last run started, to persist.
    pub fn last_triggered(&self) -> Option<&str> {
        self.last_triggered.as_deref()
    }
}

#[cfg(test)]
mod tests;
