//! The one error type of the archive module.

use std::fmt;
use std::io;

/// Why packing, unpacking or hashing failed. Messages are lowercase, name the
/// path or entry at fault and say what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// The artifact path breaks the rule of [`super::check_artifact_path`].
    #[error("artifact path `{path}` {reason}")]
    InvalidPath { path: String, reason: String },

    /// The stage finished without creating its artifact.
    #[error("artifact path `{path}` does not exist in the workspace; the stage must create it")]
    Missing { path: String },

    /// The path reaches outside the workspace through a symlinked parent.
    #[error(
        "artifact path `{path}` resolves outside the workspace through a symlink; \
         artifacts must be inside the workspace, so write them there or copy them in"
    )]
    OutsideWorkspace { path: String },

    /// A symlink that would point outside the tree once unpacked elsewhere.
    #[error(
        "symlink `{path}` -> `{target}` {reason}; use a relative link that stays inside \
         the {within}, or copy the file instead"
    )]
    BadSymlink {
        path: String,
        target: String,
        /// "is absolute", "points outside", "loops".
        reason: &'static str,
        /// "workspace", "source directory" or "target directory".
        within: &'static str,
    },

    /// A socket, fifo or device node, which has no meaning in another
    /// workspace.
    #[error(
        "`{path}` is a {kind}; only regular files, directories and symlinks can be \
         archived, so remove it or move it out of the way"
    )]
    SpecialFile { path: String, kind: &'static str },

    /// An archive entry that [`super::unpack`] refuses.
    #[error(
        "archive entry `{entry}` is refused: {reason}; the archive was not made by kiln or was tampered with"
    )]
    UnsafeEntry { entry: String, reason: String },

    /// The archive or the tree being packed is over one of its [`super::Limits`].
    #[error(
        "archive is over its {limit} limit of {max} (reached {reached}); raise the limit or make the artifact smaller"
    )]
    LimitExceeded {
        limit: LimitKind,
        max: u64,
        reached: u64,
    },

    /// Text that is not `sha256:` and 64 lowercase hex digits.
    #[error("`{text}` is not a blob digest; write `sha256:` followed by 64 lowercase hex digits")]
    InvalidDigest { text: String },

    /// The archive stream is not zstd, not tar, or ends early.
    #[error("archive is corrupt or truncated ({source}); download or upload it again")]
    Corrupt {
        #[source]
        source: io::Error,
    },

    /// A filesystem or stream error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What failed, naming the path: "reading `build/model/x`".
        context: String,
        #[source]
        source: io::Error,
    },
}

/// Which of the [`super::Limits`] was exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    MaxBytes,
    MaxEntries,
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitKind::MaxBytes => "max_bytes",
            LimitKind::MaxEntries => "max_entries",
        })
    }
}

impl LimitKind {
    /// Fails once `reached` is over `max`.
    pub(crate) fn check(self, max: u64, reached: u64) -> Result<(), ArchiveError> {
        if reached > max {
            return Err(ArchiveError::LimitExceeded {
                limit: self,
                max,
                reached,
            });
        }
        Ok(())
    }
}

impl ArchiveError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ArchiveError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn unsafe_entry(entry: &[u8], reason: impl Into<String>) -> Self {
        ArchiveError::UnsafeEntry {
            entry: String::from_utf8_lossy(entry).into_owned(),
            reason: reason.into(),
        }
    }
}
