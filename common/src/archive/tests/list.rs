//! `list_files` on packed trees and on hand-made hostile archives.

use super::hostile::{Raw, craft};
use super::{Node, assert_mentions, make_tree, pack_bytes};
use crate::archive::{BlobDigest, Limits, list_files};

#[test]
fn lists_regular_files_with_their_digests_in_order() {
    let workspace = tempfile::tempdir().unwrap();
    make_tree(
        workspace.path(),
        &[
            ("build/model/weights.bin", Node::File("weights")),
            ("build/model/nested/config.json", Node::File("{}")),
            ("build/model/run.sh", Node::Exec("#!/bin/sh")),
            ("build/model/empty", Node::Dir),
            ("build/model/latest", Node::Link("weights.bin")),
        ],
    );
    let archive = pack_bytes(workspace.path(), "build/model").unwrap();
    let files = list_files(&archive[..], &Limits::UNLIMITED).unwrap();
    let listed: Vec<_> = files
        .iter()
        .map(|f| (f.path.as_str(), f.digest, f.size))
        .collect();
    assert_eq!(
        listed,
        [
            ("build/model/nested/config.json", BlobDigest::of(b"{}"), 2),
            ("build/model/run.sh", BlobDigest::of(b"#!/bin/sh"), 9),
            ("build/model/weights.bin", BlobDigest::of(b"weights"), 7),
        ]
    );
}

#[test]
fn refuses_what_unpack_refuses() {
    let refused = |members: Vec<Raw>, limits: Limits, message: &str| {
        let error = list_files(&craft(&members)[..], &limits).unwrap_err();
        assert_mentions(&error, message);
    };
    let unlimited = Limits::UNLIMITED;
    refused(
        vec![Raw::File("../evil", "x")],
        unlimited,
        "has a `..` component",
    );
    refused(
        vec![Raw::File("/abs", "x")],
        unlimited,
        "is an absolute path",
    );
    refused(
        vec![Raw::File("a", "a"), Raw::HardLink("b", "a".into())],
        unlimited,
        "it is a hard link",
    );
    refused(
        vec![Raw::LongName("a".repeat(1 << 20)), Raw::File("x", "x")],
        unlimited,
        "it is 1048577 bytes, over the 4097 accepted",
    );
    refused(
        vec![Raw::File("a", "0123456789"), Raw::File("b", "0123456789")],
        Limits {
            max_bytes: 15,
            max_entries: 10,
        },
        "over its max_bytes limit of 15",
    );
    let corrupt = list_files(&b"not zstd at all"[..], &unlimited).unwrap_err();
    assert_mentions(&corrupt, "archive is corrupt or truncated");
}

#[test]
fn a_long_name_names_the_next_file() {
    let long = format!("{}/model.pkl", "d".repeat(200));
    let archive = craft(&[Raw::LongName(long.clone()), Raw::File("x", "pickle")]);
    let files = list_files(&archive[..], &Limits::UNLIMITED).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].path, long);
    assert_eq!(files[0].digest, BlobDigest::of(b"pickle"));
}
