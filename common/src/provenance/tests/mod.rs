//! The provenance module through its public functions, on a real release:
//! a workspace packed with `kiln_common::archive`, a key on disk, a signed
//! envelope.
//!
//! - `keys`: the key file, its mode, the public key PEM and the key id.
//! - `statement`: the in-toto and SLSA field names, subjects, NaN, times.
//! - `dsse`: PAE, signing and what verification refuses.
//! - `verify`: a model file and an archive against the signed provenance,
//!   and one changed byte of either.

mod dsse;
mod keys;
mod statement;
mod verify;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use serde_json::json;

use super::{
    ArchiveListing, ArtifactFacts, DatasetFacts, GateFacts, ImageFacts, PipelineFacts,
    ReleaseFacts, SignedProvenance, SigningKey, SourceFacts, list_archive, load_or_generate,
    public_key_pem, sign_release,
};
use crate::archive::{BlobDigest, Limits, pack};
use crate::ids::RunId;

const MODEL: &[u8] = b"\x80\x04 a pickled model, pretend";
const RELEASE_ID: u64 = 7;

/// A signed release of two artifacts: `train`'s `build/model` directory
/// (holding `model.pkl` and `config.json`) and `evaluate`'s
/// `build/metrics.json` file.
struct Release {
    _dir: tempfile::TempDir,
    /// The workspace the artifacts were packed from.
    workspace: PathBuf,
    /// `train`'s archive, as stored.
    model_archive: PathBuf,
    key: SigningKey,
    public_key_pem: String,
    facts: ReleaseFacts,
    listings: Vec<ArchiveListing>,
    signed: SignedProvenance,
}

impl Release {
    fn new() -> Release {
        let dir = tempfile::tempdir().unwrap();
        let workspace = dir.path().join("workspace");
        write(&workspace.join("build/model/model.pkl"), MODEL);
        write(
            &workspace.join("build/model/config.json"),
            b"{\"layers\": 3}",
        );
        write(
            &workspace.join("build/metrics.json"),
            b"{\"accuracy\": 0.93}",
        );

        let model_archive = dir.path().join("train.tar.zst");
        pack(
            &workspace,
            "build/model",
            File::create(&model_archive).unwrap(),
        )
        .unwrap();
        let metrics_archive = dir.path().join("evaluate.tar.zst");
        pack(
            &workspace,
            "build/metrics.json",
            File::create(&metrics_archive).unwrap(),
        )
        .unwrap();
        let listings: Vec<_> = [&model_archive, &metrics_archive]
            .iter()
            .map(|path| list_archive(File::open(path).unwrap(), &Limits::UNLIMITED).unwrap())
            .collect();

        let (key, created) = load_or_generate(&dir.path().join("keys/provenance.key")).unwrap();
        assert!(created);
        let public_key_pem = public_key_pem(&key.verifying_key());
        let facts = facts(listings[0].digest, listings[1].digest);
        let signed = sign_release(&facts, &listings, &key).unwrap();
        Release {
            _dir: dir,
            workspace,
            model_archive,
            key,
            public_key_pem,
            facts,
            listings,
            signed,
        }
    }

    fn model(&self) -> PathBuf {
        self.workspace.join("build/model/model.pkl")
    }

    /// The signed statement, decoded, as JSON.
    fn statement_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.signed.statement_json).unwrap()
    }
}

fn facts(model_archive: BlobDigest, metrics_archive: BlobDigest) -> ReleaseFacts {
    ReleaseFacts {
        release_id: RELEASE_ID,
        environment: "production".into(),
        pipeline: PipelineFacts {
            name: "churn".into(),
            version: 3,
            spec_sha256: BlobDigest::of(b"stages: ..."),
        },
        run_id: RunId(42),
        triggered_by: "alice".into(),
        params: [("EPOCHS".to_owned(), "20".to_owned())].into(),
        source: SourceFacts {
            repository: "/srv/git/churn".into(),
            commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
            snapshot: None,
        },
        datasets: vec![DatasetFacts {
            source: "/srv/data/raw".into(),
            path: "data/raw".into(),
            digest: BlobDigest::of(b"dataset snapshot"),
        }],
        images: vec![
            ImageFacts {
                reference: "python:3.12-slim".into(),
                digest: BlobDigest::of(b"image"),
            },
            // The same image for a second stage is listed once.
            ImageFacts {
                reference: "python:3.12-slim".into(),
                digest: BlobDigest::of(b"image"),
            },
        ],
        artifacts: vec![
            ArtifactFacts {
                stage: "train".into(),
                path: "build/model".into(),
                digest: model_archive,
            },
            ArtifactFacts {
                stage: "evaluate".into(),
                path: "build/metrics.json".into(),
                digest: metrics_archive,
            },
        ],
        metrics: BTreeMap::from([("accuracy".into(), 0.93), ("auc".into(), f64::NAN)]),
        gates: vec![GateFacts {
            stage: "quality".into(),
            passed: true,
            summary: "accuracy 0.93 >= 0.9".into(),
            checks: json!([{ "metric": "accuracy", "rule": ">= 0.9", "value": 0.93, "passed": true }]),
        }],
        builder_id: "https://kiln.example.com:7070".into(),
        builder_version: "0.1.0".into(),
        started_ms: 1_700_000_000_000,
        finished_ms: 1_700_000_600_123,
    }
}

fn write(path: &Path, contents: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
}

/// Fails with the whole message when `error` does not contain `part`.
fn assert_mentions(error: &impl std::fmt::Display, part: &str) {
    let message = error.to_string();
    assert!(message.contains(part), "expected `{part}` in: {message}");
}
