//! Artifact and source archives: tar streams compressed with zstd, stored
//! content-addressed by sha256.
//!
//! A stage's artifact is a path inside its workspace (`build/model`,
//! `build/metrics.json`). The agent [`pack`]s it into an archive whose entries
//! are named relative to the workspace, so [`unpack`]ing it into a dependent
//! stage's workspace restores the same paths. The CLI packs a whole source
//! directory with [`pack_source`], honouring `.gitignore`.
//!
//! Everything streams through `std::io`: no archive and no file is ever held
//! in memory whole, so memory stays bounded whatever the size. The functions
//! block; async callers run them in `spawn_blocking`.
//!
//! **Architecture Invariant:** packing the same content gives the same bytes
//! (sorted entries, mtime 0, uid/gid 0, modes reduced to 0o644/0o755/0o777),
//! so identical artifacts share one digest and one stored blob.
//!
//! **Architecture Invariant:** archives come from untrusted stages, and
//! [`unpack`] writes nothing outside its target directory. It never follows a
//! symlink while writing: every parent directory is checked to be a real
//! directory, and files are created fresh with `O_EXCL | O_NOFOLLOW` after
//! removing whatever was at their path. Symlink entries are created last,
//! after every file is written, and each must resolve inside the target.
//!
//! # Layout
//! - `paths`: the static rule for artifact paths ([`check_artifact_path`]),
//!   entry names, and where a symlink resolves.
//! - `pack`: [`pack`] and [`pack_source`], one writer behind both.
//! - `unpack`: [`unpack`], which checks every entry itself.
//! - `list`: [`list_files`], the regular files of an archive with their
//!   digests, checked like `unpack` but written nowhere.
//! - `digest`: [`BlobDigest`], [`HashingWriter`] and [`sha256_file`].
//! - `error`: [`ArchiveError`].

mod digest;
mod error;
mod list;
mod pack;
mod paths;
mod unpack;
mod walk;

#[cfg(test)]
mod tests;

pub use digest::{BlobDigest, BlobInfo, HashingWriter, sha256_file};
pub use error::{ArchiveError, LimitKind};
pub use list::{ArchivedFile, list_files};
pub use pack::{pack, pack_source, pack_source_with_limits, pack_with_limits};
pub use paths::check_artifact_path;
pub use unpack::unpack;

/// Caps on what one archive may hold, checked while streaming so a hostile or
/// runaway stage cannot fill the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Total uncompressed bytes of entry data (file contents, and any data
    /// the archive attaches to other entries).
    pub max_bytes: u64,
    /// Files, directories and symlinks together.
    pub max_entries: u64,
}

impl Limits {
    /// No cap; for packing, where the content is already on the local disk.
    pub const UNLIMITED: Limits = Limits {
        max_bytes: u64::MAX,
        max_entries: u64::MAX,
    };
}

/// Whether an artifact path named a single file or a directory tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArtifactKind {
    File,
    Dir,
}

/// What [`pack`] put into an archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackSummary {
    /// A source tree is always [`ArtifactKind::Dir`].
    pub kind: ArtifactKind,
    /// Regular files packed (directories and symlinks are not counted).
    pub files: u64,
    /// Uncompressed bytes of file contents packed.
    pub bytes_in: u64,
}

/// What [`unpack`] wrote into its target directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnpackSummary {
    /// Regular files written.
    pub files: u64,
    /// Directory entries in the archive (parents created on the way are not
    /// counted).
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Uncompressed bytes of file contents written.
    pub bytes: u64,
}
