//! The statement's JSON, by the in-toto Statement v1 and SLSA Provenance v1
//! field names, and its subjects.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{MODEL, RELEASE_ID, Release, assert_mentions};
use crate::archive::{ArchivedFile, BlobDigest};
use crate::provenance::{ProvenanceError, metric_value, rfc3339_utc, subjects};

#[test]
fn the_statement_has_the_in_toto_and_slsa_field_names() {
    let release = Release::new();
    let statement = release.statement_json();

    let keys = |value: &Value| -> Vec<String> {
        let mut keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    assert_eq!(
        keys(&statement),
        ["_type", "predicate", "predicateType", "subject"]
    );
    assert_eq!(statement["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(statement["predicateType"], "https://slsa.dev/provenance/v1");
    assert_eq!(keys(&statement["subject"][0]), ["digest", "name"]);
    assert_eq!(
        statement["subject"][0]["digest"]["sha256"],
        release.listings[0].digest.hex()
    );

    let predicate = &statement["predicate"];
    assert_eq!(keys(predicate), ["buildDefinition", "runDetails"]);
    let definition = &predicate["buildDefinition"];
    assert_eq!(
        keys(definition),
        [
            "buildType",
            "externalParameters",
            "internalParameters",
            "resolvedDependencies"
        ]
    );
    assert_eq!(definition["buildType"], "https://kiln.dev/ml-release/v1");
    assert_eq!(
        definition["externalParameters"],
        json!({
            "release": { "id": RELEASE_ID, "environment": "production" },
            "pipeline": { "name": "churn", "version": 3 },
            "triggeredBy": "alice",
            "source": {
                "repository": "/srv/git/churn",
                "commit": "0123456789abcdef0123456789abcdef01234567",
            },
            "parameters": { "EPOCHS": "20" },
        })
    );
    assert_eq!(definition["internalParameters"], json!({ "runId": 42 }));

    let dependencies = definition["resolvedDependencies"].as_array().unwrap();
    for dependency in dependencies {
        assert!(dependency["uri"].is_string(), "{dependency}");
        assert!(dependency["digest"].is_object(), "{dependency}");
    }
    let summary: Vec<_> = dependencies
        .iter()
        .map(|d| (d["name"].as_str().unwrap(), d["uri"].as_str().unwrap()))
        .collect();
    assert_eq!(
        summary,
        [
            ("source", "git+file:///srv/git/churn"),
            (
                "pipeline",
                "https://kiln.example.com:7070/pipelines/churn/v3"
            ),
            ("data/raw", "file:///srv/data/raw"),
            ("python:3.12-slim", "docker://python:3.12-slim"),
        ]
    );
    assert_eq!(
        dependencies[0]["digest"],
        json!({ "gitCommit": "0123456789abcdef0123456789abcdef01234567" })
    );
    assert_eq!(
        dependencies[1]["digest"]["sha256"],
        BlobDigest::of(b"stages: ...").hex()
    );
    assert_eq!(
        dependencies[3]["digest"]["sha256"],
        BlobDigest::of(b"image").hex()
    );
    assert_eq!(dependencies[3]["annotations"]["kind"], "image");

    let run = &predicate["runDetails"];
    assert_eq!(keys(run), ["builder", "byproducts", "metadata"]);
    assert_eq!(
        run["builder"],
        json!({ "id": "https://kiln.example.com:7070", "version": { "kiln": "0.1.0" } })
    );
    assert_eq!(
        run["metadata"],
        json!({
            "invocationId": "https://kiln.example.com:7070/runs/42",
            "startedOn": "2023-11-14T22:13:20.000Z",
            "finishedOn": "2023-11-14T22:23:20.123Z",
        })
    );
    let gate = &run["byproducts"][1];
    assert_eq!(gate["name"], "gate/quality");
    assert_eq!(gate["annotations"]["passed"], true);
    assert_eq!(gate["annotations"]["checks"][0]["rule"], ">= 0.9");
}

#[test]
fn a_nan_metric_is_kept_as_a_string() {
    let release = Release::new();
    let metrics = &release.statement_json()["predicate"]["runDetails"]["byproducts"][0];
    assert_eq!(metrics["name"], "metrics");
    assert_eq!(
        metrics["annotations"],
        json!({ "accuracy": 0.93, "auc": "NaN" })
    );

    assert_eq!(metric_value(f64::INFINITY), json!("Infinity"));
    assert_eq!(metric_value(f64::NEG_INFINITY), json!("-Infinity"));
    assert_eq!(metric_value(-0.5), json!(-0.5));
}

#[test]
fn subjects_are_each_archive_and_each_file_in_it() {
    let release = Release::new();
    let subjects: Vec<_> = release.statement_json()["subject"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let name = s["name"].as_str().unwrap().to_owned();
            (name, s["digest"]["sha256"].as_str().unwrap().to_owned())
        })
        .collect();
    let names: Vec<_> = subjects.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "train/build/model.tar.zst",
            "train/build/model/config.json",
            "train/build/model/model.pkl",
            "evaluate/build/metrics.json.tar.zst",
            "evaluate/build/metrics.json",
        ]
    );
    assert_eq!(subjects[0].1, release.listings[0].digest.hex());
    assert_eq!(subjects[2].1, BlobDigest::of(MODEL).hex());
    assert_eq!(subjects[3].1, release.listings[1].digest.hex());
}

/// Regression: duplicates were found by a linear search per file, so an
/// artifact of 100 000 files took minutes to sign (the coordinator allows a
/// million); with a set it takes milliseconds.
#[test]
fn subjects_of_a_huge_artifact_take_linear_time_and_stay_unique() {
    let release = Release::new();
    let mut listings = release.listings.clone();
    let n_files: usize = 100_000;
    listings[0].files = (0..n_files)
        .map(|i| ArchivedFile {
            path: format!("build/model/shard-{i:06}.bin"),
            digest: BlobDigest::of(&(i % 1000).to_le_bytes()),
            size: 8,
        })
        .collect();
    // The same file twice (two overlapping artifacts of one stage) is one subject.
    let duplicate = listings[0].files[0].clone();
    listings[0].files.push(duplicate);
    let started = Instant::now();
    let subjects = subjects(&release.facts, &listings).unwrap();
    let took = started.elapsed();
    // archive + files, then the metrics archive and its one file.
    assert_eq!(subjects.len(), 1 + n_files + 2);
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn list_archive_hashes_the_archive_as_stored() {
    let release = Release::new();
    let stored = std::fs::read(&release.model_archive).unwrap();
    assert_eq!(release.listings[0].digest, BlobDigest::of(&stored));
    assert_eq!(release.facts.artifacts[0].digest, BlobDigest::of(&stored));
}

#[test]
fn an_artifact_without_a_listing_is_an_error() {
    let release = Release::new();
    let error = subjects(&release.facts, &release.listings[..1]).unwrap_err();
    assert!(
        matches!(error, ProvenanceError::MissingListing { .. }),
        "{error:?}"
    );
    assert_mentions(&error, "artifact `build/metrics.json` of stage `evaluate`");
}

#[test]
fn times_are_rfc3339_utc() {
    assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
    assert_eq!(rfc3339_utc(951_868_799_999), "2000-02-29T23:59:59.999Z");
    assert_eq!(rfc3339_utc(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
}
