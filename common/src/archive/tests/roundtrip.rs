//! Packing real trees and unpacking them elsewhere.

use std::ffi::CString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::Node::{Dir, Exec, File as F, Link};
use super::{assert_mentions, listing, make_tree, pack_bytes, unpack_bytes};
use crate::archive::{ArtifactKind, Limits, PackSummary, pack, pack_source, pack_with_limits};

#[test]
fn file_artifact_lands_at_the_same_path() {
    let workspace = tempfile::tempdir().unwrap();
    make_tree(
        workspace.path(),
        &[
            ("build/metrics.json", F("{\"loss\": 0.1}")),
            ("build/other", F("not packed")),
        ],
    );
    let mut archive = Vec::new();
    let summary = pack(workspace.path(), "build/metrics.json", &mut archive).unwrap();
    assert_eq!(
        summary,
        PackSummary {
            kind: ArtifactKind::File,
            files: 1,
            bytes_in: 13
        }
    );

    let target = tempfile::tempdir().unwrap();
    let unpacked = unpack_bytes(&archive, target.path()).unwrap();
    assert_eq!((unpacked.files, unpacked.bytes), (1, 13));
    assert_eq!(
        listing(target.path()),
        ["build/", "build/metrics.json: {\"loss\": 0.1}"]
    );
}

#[test]
fn directory_artifact_keeps_contents_modes_empty_dirs_and_inner_links() {
    let workspace = tempfile::tempdir().unwrap();
    make_tree(
        workspace.path(),
        &[
            ("build/model/weights.bin", F("0123456789")),
            ("build/model/run.sh", Exec("#!/bin/sh")),
            ("build/model/nested/deep/x.txt", F("deep")),
            ("build/model/empty", Dir),
            ("build/model/latest", Link("nested/deep/x.txt")),
            ("build/model/nested/up", Link("../weights.bin")),
            ("build/model/tree", Link("nested")),
            ("build/elsewhere.txt", F("not packed")),
        ],
    );
    let mut archive = Vec::new();
    let summary = pack(workspace.path(), "./build/model/", &mut archive).unwrap();
    assert_eq!(
        summary,
        PackSummary {
            kind: ArtifactKind::Dir,
            files: 3,
            bytes_in: 10 + 9 + 4
        }
    );

    let target = tempfile::tempdir().unwrap();
    let unpacked = unpack_bytes(&archive, target.path()).unwrap();
    assert_eq!((unpacked.files, unpacked.symlinks), (3, 3));
    assert_eq!(listing(target.path()), {
        let mut expected = vec!["build/".to_owned()];
        expected.extend(
            listing(workspace.path())
                .into_iter()
                .filter(|l| l.starts_with("build/model")),
        );
        expected
    });
    assert_eq!(
        fs::read_to_string(target.path().join("build/model/tree/up")).unwrap(),
        "0123456789"
    );
}

#[test]
fn artifact_through_a_symlink_inside_the_workspace_is_packed_under_its_name() {
    let workspace = tempfile::tempdir().unwrap();
    make_tree(
        workspace.path(),
        &[
            ("out/v2/weights.bin", F("w")),
            ("build", Link("out")),
            ("out/latest", Link("v2")),
        ],
    );
    let archive = pack_bytes(workspace.path(), "build/latest").unwrap();
    let target = tempfile::tempdir().unwrap();
    unpack_bytes(&archive, target.path()).unwrap();
    assert_eq!(
        listing(target.path()),
        ["build/", "build/latest/", "build/latest/weights.bin: w"]
    );
}

#[test]
fn same_content_packs_to_the_same_bytes() {
    let nodes = [
        ("build/model/a.bin", F("aaaa")),
        ("build/model/run.sh", Exec("#!/bin/sh")),
        ("build/model/sub/b.txt", F("b")),
        ("build/model/sub/empty", Dir),
        ("build/model/link", Link("sub/b.txt")),
    ];
    let first = tempfile::tempdir().unwrap();
    make_tree(first.path(), &nodes);
    let before = pack_bytes(first.path(), "build/model").unwrap();
    assert_eq!(pack_bytes(first.path(), "build/model").unwrap(), before);

    // New times and group/other bits; only the executable bit is kept.
    let later = SystemTime::now() + Duration::from_secs(3600);
    for rel in ["a.bin", "run.sh", "sub", "sub/b.txt", "sub/empty"] {
        File::open(first.path().join("build/model").join(rel))
            .unwrap()
            .set_modified(later)
            .unwrap();
    }
    let set_mode = |rel: &str, mode| {
        let path = first.path().join("build/model").join(rel);
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    };
    set_mode("a.bin", 0o600);
    set_mode("run.sh", 0o700);
    set_mode("sub", 0o700);
    assert_eq!(pack_bytes(first.path(), "build/model").unwrap(), before);

    // Another workspace, made in another order at another time.
    let second = tempfile::tempdir().unwrap();
    let mut reversed = nodes;
    reversed.reverse();
    make_tree(second.path(), &reversed);
    assert_eq!(pack_bytes(second.path(), "build/model").unwrap(), before);
}

/// Packing refuses what could not be restored safely elsewhere, naming it.
#[test]
fn pack_refuses_missing_escaping_and_special_paths() {
    check_refused(
        "build/model",
        |_, _| {},
        "artifact path `build/model` does not exist in the workspace; the stage must create it",
    );
    check_refused(
        "../x",
        |_, _| {},
        "artifact path `../x` has a `..` component",
    );
    check_refused(
        "build/model",
        |ws, _| make_tree(ws, &[("build/model/passwd", Link("/etc/passwd"))]),
        "symlink `build/model/passwd` -> `/etc/passwd` is absolute",
    );
    check_refused(
        "build/model",
        |ws, _| make_tree(ws, &[("build/model/up", Link("../../.."))]),
        "symlink `build/model/up` -> `../../..` points outside; use a relative link that stays inside the workspace",
    );
    // Inside on paper, but `build/root` is the workspace root, so
    // `build/root/..` is its parent.
    check_refused(
        "build/model",
        |ws, _| {
            make_tree(
                ws,
                &[
                    ("build/root", Link("..")),
                    ("build/model/sneaky", Link("../root/..")),
                ],
            )
        },
        "symlink `build/model/sneaky` -> `../root/..` points outside",
    );
    check_refused(
        "build/model",
        |ws, outside| {
            make_tree(outside, &[("model/secret", F("s"))]);
            symlink(outside, ws.join("build")).unwrap();
        },
        "artifact path `build/model` resolves outside the workspace through a symlink",
    );
    check_refused(
        "build/model",
        |ws, _| {
            make_tree(ws, &[("build/model", Dir)]);
            mkfifo(&ws.join("build/model/pipe"));
        },
        "`build/model/pipe` is a fifo",
    );
    check_refused(
        "build/sock",
        |ws, _| {
            make_tree(ws, &[("build", Dir)]);
            // The socket file stays after the listener closes.
            UnixListener::bind(ws.join("build/sock")).unwrap();
        },
        "`build/sock` is a socket",
    );
}

fn mkfifo(path: &Path) {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `path` is a valid NUL-terminated string for the whole call.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
}

fn check_refused(path: &str, setup: impl FnOnce(&Path, &Path), message: &str) {
    let workspace = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    setup(workspace.path(), outside.path());
    let error = pack_bytes(workspace.path(), path).unwrap_err();
    assert_mentions(&error, message);
}

#[test]
fn pack_limits_are_enforced() {
    let workspace = tempfile::tempdir().unwrap();
    make_tree(
        workspace.path(),
        &[("out/a", F("12345")), ("out/b", F("67890"))],
    );
    let pack_limited = |max_bytes, max_entries| {
        let limits = Limits {
            max_bytes,
            max_entries,
        };
        pack_with_limits(workspace.path(), "out", Vec::new(), &limits)
    };
    assert_eq!(pack_limited(10, 3).unwrap().bytes_in, 10);
    assert_mentions(
        &pack_limited(9, 3).unwrap_err(),
        "over its max_bytes limit of 9 (reached 10)",
    );
    assert_mentions(
        &pack_limited(10, 2).unwrap_err(),
        "over its max_entries limit of 2 (reached 3)",
    );
}

#[test]
fn source_tree_honours_gitignore_and_skips_git() {
    let source = tempfile::tempdir().unwrap();
    make_tree(
        source.path(),
        &[
            (".git/config", F("[core]")),
            (".git/HEAD", F("ref: refs/heads/main")),
            (".gitignore", F("target/\n*.log\n")),
            (".github/ci.yml", F("on: push")),
            ("src/main.rs", F("fn main() {}")),
            ("src/.ignore", F("scratch.rs\n")),
            ("src/scratch.rs", F("// local only")),
            ("target/debug/app", Exec("binary")),
            ("debug.log", F("noise")),
            ("kiln.yml", F("pipeline: p")),
        ],
    );
    let mut archive = Vec::new();
    let summary = pack_source(source.path(), &mut archive).unwrap();
    assert_eq!((summary.kind, summary.files), (ArtifactKind::Dir, 5));

    let target = tempfile::tempdir().unwrap();
    unpack_bytes(&archive, target.path()).unwrap();
    assert_eq!(
        listing(target.path()),
        [
            ".github/",
            ".github/ci.yml: on: push",
            ".gitignore: target/\n*.log\n",
            "kiln.yml: pipeline: p",
            "src/",
            "src/.ignore: scratch.rs\n",
            "src/main.rs: fn main() {}",
        ]
    );
}

#[test]
fn source_tree_refuses_escaping_symlinks_too() {
    let source = tempfile::tempdir().unwrap();
    make_tree(
        source.path(),
        &[("src/lib.rs", F("")), ("secrets", Link("/root"))],
    );
    let error = pack_source(source.path(), Vec::new()).unwrap_err();
    assert_mentions(
        &error,
        "symlink `secrets` -> `/root` is absolute; use a relative link that stays inside the source directory",
    );
}

#[test]
fn unpack_over_existing_files_replaces_them() {
    let workspace = tempfile::tempdir().unwrap();
    make_tree(workspace.path(), &[("out/a", F("new"))]);
    let archive = pack_bytes(workspace.path(), "out").unwrap();
    let target = tempfile::tempdir().unwrap();
    make_tree(
        target.path(),
        &[("out/a", Exec("old and longer")), ("src/keep", F("kept"))],
    );
    unpack_bytes(&archive, target.path()).unwrap();
    assert_eq!(
        listing(target.path()),
        ["out/", "out/a: new", "src/", "src/keep: kept"]
    );
}

#[test]
fn corrupt_archives_are_reported_as_such() {
    let workspace = tempfile::tempdir().unwrap();
    make_tree(
        workspace.path(),
        &[("out/a", F("a fairly long line of text\n"))],
    );
    let archive = pack_bytes(workspace.path(), "out").unwrap();
    for bad in [
        &archive[..archive.len() - 3],
        &archive[..20],
        b"not zstd at all",
    ] {
        let target = tempfile::tempdir().unwrap();
        let error = unpack_bytes(bad, target.path()).unwrap_err();
        assert_mentions(&error, "archive is corrupt or truncated");
    }
}
