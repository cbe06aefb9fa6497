//! The in-toto Statement v1 with a SLSA Provenance v1 predicate, built from
//! what the coordinator knows about a release.
//!
//! Field names are exactly the specs' (`_type`, `subject`, `predicateType`,
//! `buildDefinition`, `resolvedDependencies`, `runDetails`, ...); the serde
//! types below are the only place they are spelled.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::ReleaseFacts;
use crate::archive::BlobDigest;

/// `_type` of an in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// `predicateType` of SLSA Provenance v1.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// `buildType` of a Kiln release: a pipeline run whose gated artifacts were
/// promoted to an environment. `externalParameters` holds `release` (`id`,
/// `environment`), `pipeline` (`name`, `version`), `triggeredBy`,
/// `source` (`repository` and `commit`, and/or `snapshot`) and
/// `parameters` (the run's `params:` values);
/// `internalParameters` holds `runId`. Resolved dependencies carry an
/// annotation `kind`: `source`, `pipeline`, `dataset` or `image`.
pub const BUILD_TYPE: &str = "https://kiln.dev/ml-release/v1";

/// An in-toto Statement v1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub statement_type: String,
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: Provenance,
}

/// One thing the statement is about: a released archive or a file in one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    /// `<stage>/<artifact path>.tar.zst` for an archive, `<stage>/<path in
    /// the archive>` for a file in it (see [`super::subjects`]).
    pub name: String,
    /// Always `sha256` for subjects Kiln writes.
    pub digest: DigestSet,
}

impl Subject {
    pub fn new(name: impl Into<String>, digest: BlobDigest) -> Self {
        Subject {
            name: name.into(),
            digest: sha256_digest_set(digest),
        }
    }
}

/// Algorithm name to lowercase hex digest: `{"sha256": "ab..."}`,
/// `{"gitCommit": "..."}`.
pub type DigestSet = BTreeMap<String, String>;

/// The SLSA Provenance v1 predicate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provenance {
    pub build_definition: BuildDefinition,
    pub run_details: RunDetails,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildDefinition {
    pub build_type: String,
    pub external_parameters: Value,
    pub internal_parameters: Value,
    pub resolved_dependencies: Vec<ResourceDescriptor>,
}

/// SLSA's ResourceDescriptor, with the fields Kiln fills.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResourceDescriptor {
    pub uri: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub digest: DigestSet,
    pub name: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub annotations: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunDetails {
    pub builder: Builder,
    pub metadata: BuildMetadata,
    /// The metrics and the gate decisions: outputs of the run that are not
    /// released, described by annotations.
    #[serde(default)]
    pub byproducts: Vec<ResourceDescriptor>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Builder {
    pub id: String,
    /// Component name to version; SLSA v1 makes this a map.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub version: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildMetadata {
    /// `<builder>/runs/<run id>`.
    pub invocation_id: String,
    pub started_on: String,
    pub finished_on: String,
}

impl Statement {
    /// The release this statement is about, from
    /// `externalParameters.release.id`.
    pub fn release_id(&self) -> Option<u64> {
        self.predicate.build_definition.external_parameters["release"]["id"].as_u64()
    }
}

/// The statement for a release whose subjects are already known (see
/// [`super::subjects`]).
pub fn statement(facts: &ReleaseFacts, subject: Vec<Subject>) -> Statement {
    let builder = facts.builder_id.trim_end_matches('/');
    let release_uri = format!("{builder}/releases/{}", facts.release_id);

    let mut source = Map::new();
    if !facts.source.repository.is_empty() {
        source.insert("repository".into(), json!(facts.source.repository));
    }
    if let Some(commit) = &facts.source.commit {
        source.insert("commit".into(), json!(commit));
    }
    if let Some(snapshot) = &facts.source.snapshot {
        source.insert("snapshot".into(), json!(snapshot.to_string()));
    }
    let external_parameters = json!({
        "release": { "id": facts.release_id, "environment": facts.environment },
        "pipeline": { "name": facts.pipeline.name, "version": facts.pipeline.version },
        "triggeredBy": facts.triggered_by,
        "source": source,
        "parameters": facts.params,
    });
    let internal_parameters = json!({ "runId": facts.run_id.0 });

    let mut byproducts = vec![ResourceDescriptor {
        uri: format!("{release_uri}/metrics"),
        digest: DigestSet::new(),
        name: "metrics".into(),
        annotations: facts
            .metrics
            .iter()
            .map(|(name, value)| (name.clone(), metric_value(*value)))
            .collect(),
    }];
    byproducts.extend(facts.gates.iter().map(|gate| ResourceDescriptor {
        uri: format!("{release_uri}/gates/{}", gate.stage),
        digest: DigestSet::new(),
        name: format!("gate/{}", gate.stage),
        annotations: annotations(&[
            ("passed", json!(gate.passed)),
            ("summary", json!(gate.summary)),
            ("checks", gate.checks.clone()),
        ]),
    }));

    Statement {
        statement_type: STATEMENT_TYPE.into(),
        subject,
        predicate_type: PREDICATE_TYPE.into(),
        predicate: Provenance {
            build_definition: BuildDefinition {
                build_type: BUILD_TYPE.into(),
                external_parameters,
                internal_parameters,
                resolved_dependencies: resolved_dependencies(facts, builder),
            },
            run_details: RunDetails {
                builder: Builder {
                    id: facts.builder_id.clone(),
                    version: BTreeMap::from([("kiln".into(), facts.builder_version.clone())]),
                },
                metadata: BuildMetadata {
                    invocation_id: format!("{builder}/runs/{}", facts.run_id),
                    started_on: rfc3339_utc(facts.started_ms),
                    finished_on: rfc3339_utc(facts.finished_ms),
                },
                byproducts,
            },
        },
    }
}

/// Source, pipeline, datasets and images, in that order.
fn resolved_dependencies(facts: &ReleaseFacts, builder: &str) -> Vec<ResourceDescriptor> {
    let mut deps = Vec::new();
    let source = &facts.source;
    if let Some(commit) = &source.commit {
        deps.push(ResourceDescriptor {
            uri: format!("git+{}", as_uri(&source.repository)),
            digest: DigestSet::from([("gitCommit".into(), commit.clone())]),
            name: "source".into(),
            annotations: annotations(&[("kind", json!("source"))]),
        });
    }
    if let Some(snapshot) = source.snapshot {
        deps.push(ResourceDescriptor {
            uri: format!("{builder}/blobs/{snapshot}"),
            digest: sha256_digest_set(snapshot),
            name: "source-snapshot".into(),
            annotations: annotations(&[("kind", json!("source"))]),
        });
    }
    let pipeline = &facts.pipeline;
    deps.push(ResourceDescriptor {
        uri: format!(
            "{builder}/pipelines/{}/v{}",
            pipeline.name, pipeline.version
        ),
        digest: sha256_digest_set(pipeline.spec_sha256),
        name: "pipeline".into(),
        annotations: annotations(&[
            ("kind", json!("pipeline")),
            ("pipeline", json!(pipeline.name)),
            ("version", json!(pipeline.version)),
        ]),
    });
    for dataset in &facts.datasets {
        deps.push(ResourceDescriptor {
            uri: as_uri(&dataset.source),
            digest: sha256_digest_set(dataset.digest),
            name: dataset.path.clone(),
            annotations: annotations(&[("kind", json!("dataset")), ("path", json!(dataset.path))]),
        });
    }
    let mut seen = Vec::new();
    for image in &facts.images {
        if seen.contains(&image) {
            continue;
        }
        seen.push(image);
        deps.push(ResourceDescriptor {
            uri: format!("docker://{}", image.reference),
            digest: sha256_digest_set(image.digest),
            name: image.reference.clone(),
            annotations: annotations(&[("kind", json!("image"))]),
        });
    }
    deps
}

/// A metric as JSON, which has no NaN or infinities: finite values are
/// numbers; NaN, +inf and -inf are the strings `"NaN"`, `"Infinity"` and
/// `"-Infinity"`, as in the protobuf JSON mapping that SLSA's own schema
/// uses. A NaN metric is kept rather than dropped: a gate may have decided
/// on it.
pub fn metric_value(value: f64) -> Value {
    if value.is_nan() {
        json!("NaN")
    } else if value == f64::INFINITY {
        json!("Infinity")
    } else if value == f64::NEG_INFINITY {
        json!("-Infinity")
    } else {
        json!(value)
    }
}

fn sha256_digest_set(digest: BlobDigest) -> DigestSet {
    DigestSet::from([("sha256".into(), digest.hex())])
}

fn annotations(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), value.clone()))
        .collect()
}

/// An absolute local path as a `file://` URI; anything else as given.
fn as_uri(location: &str) -> String {
    if location.starts_with('/') {
        format!("file://{location}")
    } else {
        location.to_owned()
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds
/// (`2024-02-29T12:00:00.000Z`).
pub fn rfc3339_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (hour, minute, second) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let days = (secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:03}Z",
        unix_ms % 1000
    )
}
