//! `kiln release provenance`, `kiln verify` and `kiln lineage`.
//!
//! `kiln verify` is the one command that can run without a coordinator:
//! given the public key and the envelope as files it never connects, so a
//! model can be checked where the farm is unreachable (or not trusted).

use std::io::{IsTerminal, Write};
use std::path::Path;

use kiln_common::channel::ClientOptions;
use kiln_common::provenance::{self, ProvenanceError, VerifiedSubject};
use kiln_proto::v1 as pb;
use serde::Serialize;

use crate::args::{OutputFormat, ProvenanceArgs, VerifyArgs};
use crate::client::Coordinator;
use crate::error::{CliError, Outcome};
use crate::output;

/// `kiln release provenance ID [--statement] [--out FILE]`.
///
/// The envelope is written byte for byte as the coordinator stored it, so
/// its sha256 is the release's `provenance_digest`; only a terminal gets a
/// trailing newline. `--output json` changes nothing: both are JSON already.
pub(crate) async fn show(c: &Coordinator, args: &ProvenanceArgs) -> Result<Outcome, CliError> {
    let request = pb::GetReleaseRequest {
        release_id: args.release,
    };
    let signed = c
        .call(|mut rpc| async move { rpc.get_provenance(request).await })
        .await?;
    let text = if args.statement {
        signed.statement_json
    } else {
        signed.envelope_json
    };
    match &args.out {
        Some(path) => std::fs::write(path, &text)
            .map_err(|e| CliError::Input(format!("cannot write `{}`: {e}", path.display())))?,
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            if out.is_terminal() {
                writeln!(out)?;
            }
            out.flush()?;
        }
    }
    Ok(Outcome::Ok)
}

/// `kiln verify`. JSON: `{release_id, name, digest, key_id}`.
#[derive(Debug, Serialize)]
struct VerifiedView {
    release_id: u64,
    name: String,
    digest: String,
    key_id: String,
}

/// A coordinator connection made on first use, so a fully offline
/// `kiln verify` never dials.
struct LazyCoordinator<'a> {
    url: &'a str,
    options: &'a ClientOptions,
    connected: Option<Coordinator>,
}

impl LazyCoordinator<'_> {
    async fn get(&mut self) -> Result<&Coordinator, CliError> {
        if self.connected.is_none() {
            self.connected = Some(Coordinator::connect(self.url, self.options).await?);
        }
        Ok(self.connected.as_ref().expect("connected just above"))
    }
}

/// `kiln verify FILE --release ID [--key PEM] [--provenance ENVELOPE]`:
/// the signature first, then the file's sha256 against the subjects.
pub(crate) async fn verify(
    url: &str,
    options: &ClientOptions,
    format: OutputFormat,
    args: &VerifyArgs,
) -> Result<Outcome, CliError> {
    let mut coordinator = LazyCoordinator {
        url,
        options,
        connected: None,
    };
    let key = match &args.key {
        Some(path) => provenance::load_public_key_pem(&read(path, "public key")?)
            .map_err(|e| CliError::Input(format!("`{}`: {e}", path.display())))?,
        None => {
            let served =
                coordinator
                    .get()
                    .await?
                    .call(|mut rpc| async move {
                        rpc.get_provenance_key(pb::ProvenanceKeyRequest {}).await
                    })
                    .await?;
            eprintln!(
                "warning: no --key given, so this check trusts the coordinator's key {}; pass --key provenance.pub to verify independently",
                served.key_id
            );
            provenance::load_public_key_pem(&served.public_key_pem)
                .map_err(|e| CliError::Coordinator(format!("the coordinator's key: {e}")))?
        }
    };
    let envelope_json = match &args.provenance {
        Some(path) => read(path, "provenance envelope")?,
        None => {
            let request = pb::GetReleaseRequest {
                release_id: args.release,
            };
            coordinator
                .get()
                .await?
                .call(|mut rpc| async move { rpc.get_provenance(request).await })
                .await?
                .envelope_json
        }
    };
    let verified = provenance::verify_path(&args.file, &envelope_json, &key, args.release)
        .map_err(|error| not_verified(&args.file, error))?;
    let VerifiedSubject {
        release_id,
        name,
        digest,
        key_id,
    } = verified;
    let view = VerifiedView {
        release_id,
        name,
        digest: digest.to_string(),
        key_id,
    };
    match format {
        OutputFormat::Json => output::json(&view)?,
        OutputFormat::Table => output::line(format!(
            "verified: {} is {} of release {} ({}), signed by key {}",
            args.file.display(),
            view.name,
            view.release_id,
            view.digest,
            view.key_id
        ))?,
    }
    Ok(Outcome::Ok)
}

/// An unreadable file or key is an input error (exit 2); anything the
/// check itself refused is "not verified" (exit 4).
fn not_verified(file: &Path, error: ProvenanceError) -> CliError {
    match error {
        ProvenanceError::Io { .. } | ProvenanceError::InvalidPublicKey { .. } => {
            CliError::Input(error.to_string())
        }
        error => CliError::NotVerified(format!("{} did not verify: {error}", file.display())),
    }
}

fn read(path: &Path, what: &str) -> Result<String, CliError> {
    std::fs::read_to_string(path)
        .map_err(|e| CliError::Input(format!("cannot read {what} `{}`: {e}", path.display())))
}

/// A place a digest appears. JSON: `{run_id, pipeline, stage, relation,
/// release_id, environment, path}`, `release_id` and `environment` null
/// unless `relation` is `released`.
#[derive(Debug, Serialize)]
struct LineageView {
    run_id: u64,
    pipeline: String,
    stage: Option<String>,
    relation: String,
    release_id: Option<u64>,
    environment: Option<String>,
    path: String,
}

impl From<pb::LineageUse> for LineageView {
    fn from(found: pb::LineageUse) -> Self {
        LineageView {
            run_id: found.run_id,
            pipeline: found.pipeline,
            stage: Some(found.stage).filter(|s| !s.is_empty()),
            relation: found.relation,
            release_id: (found.release_id != 0).then_some(found.release_id),
            environment: Some(found.environment).filter(|e| !e.is_empty()),
            path: found.path,
        }
    }
}

/// `kiln lineage DIGEST`.
pub(crate) async fn lineage(
    c: &Coordinator,
    format: OutputFormat,
    digest: &str,
) -> Result<Outcome, CliError> {
    let request = pb::LineageRequest {
        digest: digest.to_owned(),
    };
    let uses: Vec<LineageView> = c
        .call(|mut rpc| async move { rpc.lineage(request).await })
        .await?
        .uses
        .into_iter()
        .map(LineageView::from)
        .collect();
    match format {
        OutputFormat::Json => output::json(&uses)?,
        OutputFormat::Table if uses.is_empty() => {
            output::line(format!("no run or release has {digest}"))?
        }
        OutputFormat::Table => output::line(lineage_table(&uses).trim_end())?,
    }
    Ok(Outcome::Ok)
}

fn lineage_table(uses: &[LineageView]) -> String {
    let dash = |text: Option<&str>| text.unwrap_or("-").to_owned();
    let rows: Vec<[String; 6]> = uses
        .iter()
        .map(|u| {
            let release = match (u.release_id, &u.environment) {
                (Some(id), Some(env)) => format!("{id}/{env}"),
                (Some(id), None) => id.to_string(),
                (None, _) => "-".to_owned(),
            };
            [
                u.run_id.to_string(),
                u.pipeline.clone(),
                dash(u.stage.as_deref()),
                u.relation.clone(),
                release,
                u.path.clone(),
            ]
        })
        .collect();
    output::table(
        [
            "RUN",
            "PIPELINE",
            "STAGE",
            "RELATION",
            "RELEASE/ENV",
            "PATH",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lineage_rows_show_the_release_and_dash_what_is_missing() {
        let uses = [
            LineageView::from(pb::LineageUse {
                run_id: 4,
                pipeline: "model".into(),
                stage: "train".into(),
                relation: "produced".into(),
                path: "build/model".into(),
                ..Default::default()
            }),
            LineageView::from(pb::LineageUse {
                run_id: 4,
                pipeline: "model".into(),
                relation: "released".into(),
                release_id: 2,
                environment: "staging".into(),
                path: "train/build/model/model.bin".into(),
                ..Default::default()
            }),
        ];
        let table = lineage_table(&uses);
        let lines: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0],
            [
                "RUN",
                "PIPELINE",
                "STAGE",
                "RELATION",
                "RELEASE/ENV",
                "PATH"
            ]
        );
        assert_eq!(
            lines[1],
            ["4", "model", "train", "produced", "-", "build/model"]
        );
        assert_eq!(
            lines[2],
            [
                "4",
                "model",
                "-",
                "released",
                "2/staging",
                "train/build/model/model.bin"
            ]
        );
    }

    #[test]
    fn a_refused_check_is_not_verified_and_an_unreadable_file_is_input() {
        let refused = not_verified(
            Path::new("model.bin"),
            ProvenanceError::BadSignature {
                key_id: "ab".into(),
            },
        );
        assert!(matches!(refused, CliError::NotVerified(_)), "{refused:?}");
        assert!(
            refused
                .to_string()
                .starts_with("model.bin did not verify: ")
        );
        let missing = not_verified(
            Path::new("model.bin"),
            ProvenanceError::InvalidPublicKey {
                reason: "bad".into(),
            },
        );
        assert!(matches!(missing, CliError::Input(_)), "{missing:?}");
    }
}
