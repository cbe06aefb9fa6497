//! What the coordinator knows about a release, as input to the statement.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::archive::BlobDigest;
use crate::ids::RunId;

/// What the coordinator knows about a release when it signs its provenance.
/// Everything here ends up in the statement; nothing is looked up.
#[derive(Clone, Debug, PartialEq)]
pub struct ReleaseFacts {
    pub release_id: u64,
    /// The environment the release went live in, with the pipeline it
    /// belongs to (`credit/production`).
    pub environment: String,
    pub pipeline: PipelineFacts,
    /// The run whose artifacts were released.
    pub run_id: RunId,
    /// Who or what started the run (a user, `schedule`, `data`).
    pub triggered_by: String,
    /// The run's `params:` values (defaults filled in), written as
    /// `externalParameters.parameters`.
    pub params: BTreeMap<String, String>,
    pub source: SourceFacts,
    pub datasets: Vec<DatasetFacts>,
    /// Images the run's stages ran in; duplicates are listed once.
    pub images: Vec<ImageFacts>,
    /// The released artifacts; each archive and every file in it become
    /// subjects.
    pub artifacts: Vec<ArtifactFacts>,
    /// The metrics the gates read, NaN included (written as `"NaN"`, see
    /// [`super::metric_value`]).
    pub metrics: BTreeMap<String, f64>,
    pub gates: Vec<GateFacts>,
    /// This coordinator, as a URI (`https://kiln.example.com:7070`): SLSA's
    /// `builder.id`, and the base of the URIs of Kiln-internal resources
    /// (`<builder>/pipelines/<name>/v<version>`, `<builder>/blobs/<digest>`,
    /// `<builder>/runs/<id>`, `<builder>/releases/<id>/...`).
    pub builder_id: String,
    /// The coordinator's version (`builder.version.kiln`).
    pub builder_version: String,
    /// When the run started and when the release was made, in milliseconds
    /// since the Unix epoch; written as RFC 3339 UTC.
    pub started_ms: u64,
    pub finished_ms: u64,
}

/// The pipeline version the run executed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineFacts {
    pub name: String,
    pub version: u32,
    /// sha256 of the `kiln.yml` text of that version, as registered.
    pub spec_sha256: BlobDigest,
}

/// Where the run's source came from: a git commit, an uploaded snapshot,
/// or both (a snapshot taken from a known commit).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceFacts {
    /// The repository (URL or path) the commit is from; may be empty.
    pub repository: String,
    /// The full git commit id, written as digest `gitCommit`.
    pub commit: Option<String>,
    /// The uploaded source snapshot (a packed tree).
    pub snapshot: Option<BlobDigest>,
}

/// A dataset snapshot the run was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetFacts {
    /// Where it was taken from (`/srv/data/raw`, `s3://bucket/prefix`).
    pub source: String,
    /// The workspace path it was unpacked to.
    pub path: String,
    /// The digest of the packed snapshot.
    pub digest: BlobDigest,
}

/// A container image a stage ran in, by digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFacts {
    /// The reference from the pipeline (`python:3.12-slim`).
    pub reference: String,
    /// The image id docker reported (`sha256:...`).
    pub digest: BlobDigest,
}

/// A released artifact: a stage output, stored as one archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactFacts {
    pub stage: String,
    /// The artifact path in the workspace (`build/model`).
    pub path: String,
    /// The digest of its tar + zstd archive.
    pub digest: BlobDigest,
}

/// A gate's decision on the release.
#[derive(Clone, Debug, PartialEq)]
pub struct GateFacts {
    pub stage: String,
    pub passed: bool,
    pub summary: String,
    /// The checks with the values that decided them, as JSON (numbers
    /// through [`super::metric_value`], so NaN survives).
    pub checks: Value,
}
