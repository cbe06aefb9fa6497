//! Provenance and lineage reads: the signed envelope of a release, the
//! release with what it was built from, and every run and release that
//! produced or used a digest.

use kiln_common::archive::BlobDigest;
use kiln_common::ids::RunId;
use kiln_proto::v1 as pb;

use super::ControlApi;
use crate::error::ApiError;
use crate::store::{ReleaseRecord, RunRecord, StageArtifact, Store};
use crate::views;

/// Runs a lineage query scans at most, newest first.
const MAX_RUNS_SCANNED: usize = 100_000;

impl ControlApi {
    pub(super) fn provenance(&self, release: u64) -> Result<pb::Provenance, ApiError> {
        match self.store.provenance(release)? {
            Some(record) => Ok(pb::Provenance {
                release_id: record.release,
                envelope_json: record.envelope_json,
                statement_json: record.statement_json,
                key_id: record.key_id,
            }),
            None if self.store.release(release)?.is_some() => {
                Err(ApiError::FailedPrecondition(format!(
                    "release {release} is not signed yet; the coordinator signs releases moments after they go live, try again"
                )))
            }
            None => Err(ApiError::NotFound(format!(
                "release {release} does not exist"
            ))),
        }
    }
}

/// A release with the datasets, repository and provenance behind it.
pub(super) fn release_view(
    store: &dyn Store,
    record: &ReleaseRecord,
) -> Result<pb::Release, ApiError> {
    let mut view = views::release(record);
    if let Some(run) = store.run(record.run)? {
        view.datasets = run.datasets.iter().map(views::dataset).collect();
    }
    if let Some(pipeline) = store.pipeline(&record.pipeline, record.pipeline_version)? {
        view.repo = pipeline.repo;
    }
    if let Some(provenance) = store.provenance(record.id)? {
        view.provenance_digest = provenance.digest;
    }
    Ok(view)
}

/// Every place `digest` appears: stage outputs (and the stages that took
/// them as inputs), datasets, sources, released artifacts and files inside
/// them (from the signed subjects).
pub(super) fn uses(store: &dyn Store, digest: &str) -> Result<Vec<pb::LineageUse>, ApiError> {
    let wanted = normalize(digest)?;
    let mut uses = Vec::new();
    for run in store
        .runs(None, RunId(u64::MAX), MAX_RUNS_SCANNED)?
        .into_iter()
        .rev()
    {
        run_uses(store, &run, &wanted, &mut uses)?;
    }
    for release in store.releases()? {
        for artifact in &release.artifacts {
            if matches(&artifact.artifact.digest, &wanted) {
                uses.push(released(&release, &artifact.stage, &artifact.artifact.path));
            }
        }
        if let Some(provenance) = store.provenance(release.id)? {
            for (name, subject_digest) in
                file_subjects(&provenance.statement_json, &release.artifacts)
            {
                if subject_digest == wanted.hex() {
                    let stage = name.split('/').next().unwrap_or_default().to_owned();
                    uses.push(released(&release, &stage, &name));
                }
            }
        }
    }
    Ok(uses)
}

fn run_uses(
    store: &dyn Store,
    run: &RunRecord,
    wanted: &Wanted,
    uses: &mut Vec<pb::LineageUse>,
) -> Result<(), ApiError> {
    let found = |stage: &str, relation: &str, path: &str| pb::LineageUse {
        run_id: run.id.0,
        pipeline: run.pipeline.clone(),
        stage: stage.to_owned(),
        relation: relation.to_owned(),
        path: path.to_owned(),
        ..Default::default()
    };
    if run
        .source_digest
        .as_deref()
        .is_some_and(|d| matches(d, wanted))
        || wanted.commit.as_deref() == Some(run.commit.as_str())
    {
        uses.push(found("", "source", &run.rev));
    }
    for dataset in &run.datasets {
        if matches(&dataset.digest, wanted) || matches(&dataset.content_digest, wanted) {
            uses.push(found("", "dataset", &dataset.path));
        }
    }
    let stages = store.stages(run.id)?;
    for stage in &stages {
        for output in stage.outputs.iter().filter(|o| matches(&o.digest, wanted)) {
            uses.push(found(&stage.name, "produced", &output.path));
            for consumer in stages.iter().filter(|s| s.needs.contains(&stage.name)) {
                uses.push(found(&consumer.name, "consumed", &output.path));
            }
        }
    }
    Ok(())
}

fn released(release: &ReleaseRecord, stage: &str, path: &str) -> pb::LineageUse {
    pb::LineageUse {
        run_id: release.run.0,
        pipeline: release.pipeline.clone(),
        stage: stage.to_owned(),
        relation: "released".to_owned(),
        release_id: release.id,
        environment: release.environment.name.clone(),
        path: path.to_owned(),
    }
}

/// What is searched for: a sha256 digest, or a git commit id (40 hex).
struct Wanted {
    digest: Option<BlobDigest>,
    commit: Option<String>,
}

impl Wanted {
    fn hex(&self) -> String {
        self.digest
            .as_ref()
            .map(BlobDigest::hex)
            .unwrap_or_default()
    }
}

fn normalize(digest: &str) -> Result<Wanted, ApiError> {
    let text = digest.trim().to_ascii_lowercase();
    let hex = text.strip_prefix("sha256:").unwrap_or(&text);
    if hex.len() == 40 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(Wanted {
            digest: None,
            commit: Some(hex.to_owned()),
        });
    }
    let digest = format!("sha256:{hex}").parse::<BlobDigest>().map_err(|_| {
        ApiError::InvalidArgument(format!(
            "`{digest}` is not a digest: give sha256:<64 hex digits> or a 40-digit commit"
        ))
    })?;
    Ok(Wanted {
        digest: Some(digest),
        commit: None,
    })
}

fn matches(candidate: &str, wanted: &Wanted) -> bool {
    wanted
        .digest
        .as_ref()
        .is_some_and(|digest| candidate == digest.to_string())
}

/// (name, sha256 hex) of every subject of a stored statement that is a
/// file inside a released archive. The archives' own subjects
/// (`<stage>/<path>.tar.zst`, see `kiln_common::provenance::subjects`) are
/// left out, since `uses` reports them from the release's artifacts; they
/// are recognized by that exact name, not by the `.tar.zst` ending, which a
/// file inside an artifact may have too.
fn file_subjects(statement_json: &str, artifacts: &[StageArtifact]) -> Vec<(String, String)> {
    let Ok(statement) = serde_json::from_str::<serde_json::Value>(statement_json) else {
        return Vec::new();
    };
    let archives: Vec<String> = artifacts
        .iter()
        .map(|a| {
            let path = a.artifact.path.trim_end_matches('/');
            format!("{}/{path}.tar.zst", a.stage)
        })
        .collect();
    statement["subject"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|subject| {
            Some((
                subject["name"].as_str()?.to_owned(),
                subject["digest"]["sha256"].as_str()?.to_owned(),
            ))
        })
        .filter(|(name, _)| !archives.contains(name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ArtifactRecord;

    /// Regression: every subject ending in `.tar.zst` was taken for a
    /// released archive and skipped, so a model shipped as
    /// `build/model/weights.tar.zst` inside an artifact had no lineage.
    #[test]
    fn a_file_named_like_an_archive_is_still_a_released_file() {
        let artifacts = [StageArtifact {
            stage: "train".into(),
            artifact: ArtifactRecord {
                path: "build/model/".into(),
                digest: "sha256:aa".into(),
                size: 1,
            },
        }];
        let statement = serde_json::json!({
            "subject": [
                { "name": "train/build/model.tar.zst", "digest": { "sha256": "aa" } },
                { "name": "train/build/model/weights.tar.zst", "digest": { "sha256": "bb" } },
                { "name": "train/build/model/model.pkl", "digest": { "sha256": "cc" } },
            ]
        });
        let files = file_subjects(&statement.to_string(), &artifacts);
        assert_eq!(
            files,
            [
                (
                    "train/build/model/weights.tar.zst".to_owned(),
                    "bb".to_owned()
                ),
                ("train/build/model/model.pkl".to_owned(), "cc".to_owned()),
            ]
        );
    }
}
