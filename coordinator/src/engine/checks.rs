//! Work the engine's decisions need but its loop must not do, run by the
//! runner on the blocking pool and reported back as events:
//!
//! - [`OutputCheck`]: what a completion needs from the blob store — that
//!   every reported output was uploaded (and its size), and the stage's
//!   parsed `metrics:` file ([`Event::OutputsChecked`]). The stage stays
//!   running meanwhile; a repeated completion waits for the check in
//!   flight.
//! - [`SecretsToOpen`]: the values of an assigned stage's secrets
//!   ([`Event::SecretsOpened`]); its `Assign` leaves only with them, and a
//!   secret that cannot be opened fails the stage before it reaches the
//!   agent.

use std::collections::BTreeMap;

use kiln_proto::v1 as pb;

use kiln_common::ids::StageKey;

use super::Event;
use crate::blobs::{BlobStore, parse_digest};
use crate::secrets::Secrets;
use crate::store::ArtifactRecord;

/// Largest metrics file the coordinator reads.
const MAX_METRICS_BYTES: u64 = 1 << 20;

/// A completion whose outputs are still to be looked at.
pub(crate) struct OutputCheck {
    pub(super) agent: String,
    pub(super) finished: pb::StageFinished,
    /// The stage's `metrics:` file, read only when the stage succeeded.
    pub(super) metrics_path: Option<String>,
}

/// What the blob store said.
#[derive(Debug)]
pub(crate) struct Checked {
    pub(super) outputs: Result<Vec<ArtifactRecord>, String>,
    pub(super) metrics: Result<BTreeMap<String, Option<f64>>, String>,
}

impl Checked {
    /// Nothing was reported, nothing to read.
    pub(super) fn nothing() -> Self {
        Self {
            outputs: Ok(Vec::new()),
            metrics: Ok(BTreeMap::new()),
        }
    }
}

impl OutputCheck {
    /// Does the I/O; blocking.
    pub(crate) fn run(self, blobs: &BlobStore) -> Event {
        let outputs = stat_outputs(blobs, &self.finished.outputs);
        let metrics = match (&outputs, &self.metrics_path) {
            (Ok(records), Some(path)) => read_metrics(blobs, records, path),
            _ => Ok(BTreeMap::new()),
        };
        Event::OutputsChecked {
            agent: self.agent,
            finished: self.finished,
            checked: Checked { outputs, metrics },
        }
    }
}

/// An assignment waiting for its secrets.
pub(crate) struct SecretsToOpen {
    pub(super) agent: String,
    pub(super) key: StageKey,
    pub(super) attempt: u32,
    pub(super) names: Vec<String>,
    /// Everything but the secrets.
    pub(super) assign: pb::Assign,
}

impl SecretsToOpen {
    /// Opens the secrets; blocking. The error names the secret, never a
    /// value.
    pub(crate) fn run(self, secrets: Option<&Secrets>) -> Event {
        let opened = match secrets {
            Some(secrets) => secrets
                .reveal(&self.names)
                .map_err(|error| error.to_string()),
            None => Err("this coordinator has no secrets store".to_owned()),
        };
        Event::SecretsOpened {
            agent: self.agent,
            key: self.key,
            attempt: self.attempt,
            assign: Box::new(self.assign),
            opened,
        }
    }
}

/// Each output's size, from the blob store (which also marks it used, so
/// GC keeps off it).
fn stat_outputs(
    blobs: &BlobStore,
    outputs: &[pb::Artifact],
) -> Result<Vec<ArtifactRecord>, String> {
    outputs
        .iter()
        .map(|output| {
            let digest = parse_digest(&output.digest).map_err(|error| error.to_string())?;
            let size = blobs.stat(&digest).ok_or_else(|| {
                format!(
                    "artifact `{}` ({}) was never uploaded",
                    output.path, output.digest
                )
            })?;
            Ok(ArtifactRecord {
                path: output.path.clone(),
                digest: output.digest.clone(),
                size,
            })
        })
        .collect()
}

/// The stage's `metrics:` file, parsed.
fn read_metrics(
    blobs: &BlobStore,
    outputs: &[ArtifactRecord],
    path: &str,
) -> Result<BTreeMap<String, Option<f64>>, String> {
    let digest = outputs
        .iter()
        .find(|output| output.path == path)
        .map(|output| output.digest.clone())
        .ok_or_else(|| {
            format!("metrics file `{path}` was not uploaded; the stage must write it")
        })?;
    let text = blobs
        .read_single_file(&digest, path, MAX_METRICS_BYTES)
        .map_err(|error| format!("metrics file `{path}`: {error}"))?;
    super::delivery::parse_metrics(&text).map_err(|error| format!("metrics file `{path}`: {error}"))
}
