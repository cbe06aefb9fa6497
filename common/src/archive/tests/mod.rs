//! The archive module through its public functions, on real temporary
//! directories.
//!
//! - `roundtrip`: pack then unpack, determinism, what packing refuses,
//!   `.gitignore` in source trees.
//! - `hostile`: hand-made archives that try to escape the target.
//! - `list`: listing an archive's files by digest, and refusing what
//!   `unpack` refuses.
//! - `streaming`: hundreds of megabytes through a pipe in bounded memory.

mod hostile;
mod list;
mod roundtrip;
mod streaming;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use super::{ArchiveError, Limits, UnpackSummary, pack, unpack};

/// One thing to create on disk for a test tree.
#[derive(Clone, Copy)]
enum Node {
    /// A regular file, mode 0644, with these contents.
    File(&'static str),
    /// A regular file, mode 0755, with these contents.
    Exec(&'static str),
    Dir,
    /// A symlink with this target.
    Link(&'static str),
}

/// Creates `nodes` under `root`, parents first as needed.
fn make_tree(root: &Path, nodes: &[(&str, Node)]) {
    for &(rel, node) in nodes {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        match node {
            Node::File(text) | Node::Exec(text) => {
                fs::write(&path, text).unwrap();
                let mode = if matches!(node, Node::Exec(_)) {
                    0o755
                } else {
                    0o644
                };
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            }
            Node::Dir => fs::create_dir_all(&path).unwrap(),
            Node::Link(target) => symlink(target, &path).unwrap(),
        }
    }
}

/// The tree under `root`, one sorted line per entry, in the terms a round
/// trip must keep: kind, executable bit, contents, symlink target.
fn listing(root: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    list_into(root, root, &mut lines);
    lines
}

fn list_into(root: &Path, dir: &Path, lines: &mut Vec<String>) {
    let mut children: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    children.sort();
    for path in children {
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.file_type().is_symlink() {
            lines.push(format!(
                "{rel} -> {}",
                fs::read_link(&path).unwrap().display()
            ));
        } else if meta.is_dir() {
            lines.push(format!("{rel}/"));
            list_into(root, &path, lines);
        } else {
            let exec = if meta.permissions().mode() & 0o111 != 0 {
                " (exec)"
            } else {
                ""
            };
            let text = String::from_utf8_lossy(&fs::read(&path).unwrap()).into_owned();
            lines.push(format!("{rel}{exec}: {text}"));
        }
    }
}

fn pack_bytes(workspace: &Path, path: &str) -> Result<Vec<u8>, ArchiveError> {
    let mut out = Vec::new();
    pack(workspace, path, &mut out)?;
    Ok(out)
}

fn unpack_bytes(archive: &[u8], target: &Path) -> Result<UnpackSummary, ArchiveError> {
    unpack(archive, target, &Limits::UNLIMITED)
}

/// Fails with the whole message when `error` does not contain `part`.
fn assert_mentions(error: &ArchiveError, part: &str) {
    let message = error.to_string();
    assert!(message.contains(part), "expected `{part}` in: {message}");
}
