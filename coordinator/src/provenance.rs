//! The release signer: every release gets an in-toto statement with a SLSA
//! provenance predicate, in a DSSE envelope signed with the coordinator's
//! ed25519 key.
//!
//! The engine hands over a release id once the release is durable; the
//! signer reads the release, its run, stages and pipeline back from the
//! store, lists the files inside every released archive, signs (on the
//! blocking pool), and writes the envelope (key `V`) through the group
//! committer. At start-up every release without one is
//! signed, so a crash between a release and its signature loses nothing.

use std::path::Path;
use std::sync::Arc;

use kiln_common::archive::{BlobDigest, Limits};
use kiln_common::provenance::{
    self, ArtifactFacts, DatasetFacts, GateFacts, ImageFacts, PipelineFacts, ReleaseFacts,
    SigningKey, SourceFacts,
};

use tokio::sync::{mpsc, watch};

use crate::blobs::BlobStore;
use crate::commit::Writer;
use crate::pipelines::ParsedPipelines;
use crate::store::{Batch, Op, ProvenanceRecord, ReleaseRecord, Store};

/// The key and what verifiers need of it.
pub(crate) struct ProvenanceKey {
    pub(crate) signing: SigningKey,
    pub(crate) key_id: String,
    pub(crate) public_pem: String,
}

impl ProvenanceKey {
    /// Loads `data_dir/provenance.key`, creating it on first start, and
    /// exports the public key next to it as `provenance.pub`.
    pub(crate) fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let (signing, created) = provenance::load_or_generate(&data_dir.join("provenance.key"))?;
        let verifying = signing.verifying_key();
        let public_pem = provenance::public_key_pem(&verifying);
        let key_id = provenance::key_id(&verifying);
        std::fs::write(data_dir.join("provenance.pub"), &public_pem)?;
        if created {
            tracing::info!(%key_id, "created the provenance signing key");
        }
        Ok(Self {
            signing,
            key_id,
            public_pem,
        })
    }
}

/// Signs releases as the engine reports them; stops with `stop`.
pub(crate) async fn run_signer(
    signer: Signer,
    mut releases: mpsc::UnboundedReceiver<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let signer = Arc::new(signer);
    // Releases made before a crash that were never signed.
    match signer.store.releases() {
        Ok(all) => {
            for release in all {
                if matches!(signer.store.provenance(release.id), Ok(None)) {
                    sign_logged(&signer, release.id).await;
                }
            }
        }
        Err(error) => tracing::error!(%error, "cannot list releases to sign"),
    }
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            release = releases.recv() => match release {
                Some(id) => sign_logged(&signer, id).await,
                None => return,
            },
        }
    }
}

/// What the signer task reads and writes with.
pub(crate) struct Signer {
    pub(crate) store: Arc<dyn Store>,
    /// Envelopes are stored through the group committer.
    pub(crate) writer: Writer,
    pub(crate) blobs: Arc<BlobStore>,
    pub(crate) key: Arc<ProvenanceKey>,
    pub(crate) builder_id: String,
    /// Pipeline versions, parsed once (the stages' image references).
    pub(crate) parsed: Arc<ParsedPipelines>,
}

async fn sign_logged(signer: &Arc<Signer>, release: u64) {
    let task = signer.clone();
    let signed = tokio::task::spawn_blocking(move || sign(&task, release)).await;
    let record = match signed {
        Ok(Ok(Some(record))) => record,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            tracing::error!(release, %error, "cannot sign the release's provenance");
            return;
        }
        Err(error) => {
            tracing::error!(release, %error, "the provenance signer panicked");
            return;
        }
    };
    let digest = record.digest.clone();
    let mut batch = Batch::default();
    batch.push(Op::Provenance(record));
    // Not stored (a store failure or shutdown): the next start signs it.
    match signer.writer.write(batch).await {
        Ok(()) => tracing::info!(release, %digest, "signed the release's provenance"),
        Err(error) => {
            tracing::error!(release, %error, "cannot store the release's provenance");
        }
    }
}

/// Signs one release; `None` if it already has its provenance.
fn sign(signer: &Signer, release_id: u64) -> anyhow::Result<Option<ProvenanceRecord>> {
    let store = &*signer.store;
    if store.provenance(release_id)?.is_some() {
        return Ok(None);
    }
    let release = store
        .release(release_id)?
        .ok_or_else(|| anyhow::anyhow!("release {release_id} does not exist"))?;
    let facts = facts(store, &signer.parsed, &release, &signer.builder_id)?;
    let mut listings = Vec::new();
    for artifact in &facts.artifacts {
        let file = std::fs::File::open(signer.blobs.path(&artifact.digest)).map_err(|error| {
            anyhow::anyhow!("artifact {} is not readable: {error}", artifact.digest)
        })?;
        let limits = Limits {
            max_bytes: u64::MAX,
            max_entries: 1_000_000,
        };
        let listing = provenance::list_archive(std::io::BufReader::new(file), &limits)?;
        anyhow::ensure!(
            listing.digest == artifact.digest,
            "artifact {} is corrupt on disk (it hashes to {})",
            artifact.digest,
            listing.digest
        );
        listings.push(listing);
    }
    let signed = provenance::sign_release(&facts, &listings, &signer.key.signing)?;
    Ok(Some(ProvenanceRecord {
        release: release_id,
        envelope_json: signed.envelope_json,
        statement_json: signed.statement_json,
        key_id: signed.key_id,
        digest: signed.digest.to_string(),
    }))
}

/// What went into a release, read back from the store.
fn facts(
    store: &dyn Store,
    parsed: &ParsedPipelines,
    release: &ReleaseRecord,
    builder_id: &str,
) -> anyhow::Result<ReleaseFacts> {
    let run = store
        .run(release.run)?
        .ok_or_else(|| anyhow::anyhow!("run {} of the release is gone", release.run))?;
    let pipeline = store
        .pipeline(&release.pipeline, release.pipeline_version)?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "pipeline {} v{} is gone",
                release.pipeline,
                release.pipeline_version
            )
        })?;
    let parsed = parsed.get(&pipeline).ok();
    let stages = store.stages(release.run)?;
    let images = stages
        .iter()
        .filter_map(|stage| {
            let digest: BlobDigest = stage.image_digest.as_deref()?.parse().ok()?;
            let reference = parsed
                .as_ref()
                .and_then(|p| p.stages.iter().find(|s| s.name == stage.name))
                .and_then(|s| s.image.clone())
                .unwrap_or_else(|| stage.name.clone());
            Some(ImageFacts { reference, digest })
        })
        .collect();
    let artifacts = release
        .artifacts
        .iter()
        .map(|a| {
            Ok(ArtifactFacts {
                stage: a.stage.clone(),
                path: a.artifact.path.clone(),
                digest: a.artifact.digest.parse()?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let datasets = run
        .datasets
        .iter()
        .map(|d| {
            Ok(DatasetFacts {
                source: d.source.clone(),
                path: d.path.clone(),
                digest: d.digest.parse()?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let gates = release
        .gates
        .iter()
        .map(|(stage, decision)| GateFacts {
            stage: stage.clone(),
            passed: decision.passed,
            summary: decision.summary.clone(),
            checks: serde_json::to_value(&decision.checks).unwrap_or_default(),
        })
        .collect();
    let snapshot = release
        .source_digest
        .as_deref()
        .map(str::parse::<BlobDigest>)
        .transpose()?;
    Ok(ReleaseFacts {
        release_id: release.id,
        environment: release.environment.to_string(),
        pipeline: PipelineFacts {
            name: pipeline.name.clone(),
            version: pipeline.version,
            spec_sha256: BlobDigest::of(pipeline.spec_yaml.as_bytes()),
        },
        run_id: release.run,
        triggered_by: run.triggered_by.clone(),
        params: run.params.clone(),
        source: SourceFacts {
            repository: pipeline.repo.clone(),
            commit: Some(release.commit.clone()).filter(|c| !c.is_empty()),
            snapshot,
        },
        datasets,
        images,
        artifacts,
        metrics: release
            .metrics
            .iter()
            .map(|(name, value)| (name.clone(), value.unwrap_or(f64::NAN)))
            .collect(),
        gates,
        builder_id: builder_id.to_owned(),
        builder_version: env!("CARGO_PKG_VERSION").to_owned(),
        started_ms: run.created_ms,
        finished_ms: release.created_ms,
    })
}
