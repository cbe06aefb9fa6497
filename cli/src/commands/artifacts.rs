//! `kiln artifacts ls|get`, `kiln gc`, and the source upload behind
//! `kiln run --source`.

use std::io::IsTerminal;
use std::path::Path;

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_common::archive::{self, Limits};
use kiln_proto::v1 as pb;
use serde::Serialize;

use crate::args::{GcArgs, OutputFormat};
use crate::client::Coordinator;
use crate::error::{CliError, Outcome};
use crate::output;

/// A stored stage output. JSON: `{stage, path, digest, size}`.
#[derive(Debug, Serialize)]
struct ArtifactView {
    stage: String,
    path: String,
    digest: String,
    size: u64,
}

/// `kiln artifacts ls RUN [STAGE]`.
pub(crate) async fn list(
    coordinator: &Coordinator,
    format: OutputFormat,
    run: u64,
    stage: Option<&str>,
) -> Result<Outcome, CliError> {
    let request = pb::ListArtifactsRequest {
        run_id: run,
        stage: stage.unwrap_or_default().to_owned(),
    };
    let artifacts: Vec<ArtifactView> = coordinator
        .list_artifacts(request)
        .await?
        .into_iter()
        .map(|a| ArtifactView {
            stage: a.stage,
            path: a.path,
            digest: a.digest,
            size: a.size,
        })
        .collect();
    match format {
        OutputFormat::Json => output::json(&artifacts)?,
        OutputFormat::Table => {
            let rows: Vec<[String; 4]> = artifacts
                .iter()
                .map(|a| {
                    [
                        a.stage.clone(),
                        a.path.clone(),
                        human_bytes(a.size),
                        a.digest.clone(),
                    ]
                })
                .collect();
            output::line(output::table(["STAGE", "PATH", "SIZE", "DIGEST"], &rows).trim_end())?;
        }
    }
    Ok(Outcome::Ok)
}

/// `kiln artifacts get RUN STAGE PATH [-o DIR]`.
pub(crate) async fn get(
    coordinator: &Coordinator,
    format: OutputFormat,
    run: u64,
    stage: &str,
    path: &str,
    out: &Path,
) -> Result<Outcome, CliError> {
    let request = pb::ListArtifactsRequest {
        run_id: run,
        stage: stage.to_owned(),
    };
    let artifacts = coordinator.list_artifacts(request).await?;
    let Some(artifact) = artifacts.iter().find(|a| a.path == path) else {
        let known: Vec<&str> = artifacts.iter().map(|a| a.path.as_str()).collect();
        return Err(CliError::Input(format!(
            "stage `{stage}` of run {run} stored no artifact `{path}`; it stored: {}",
            if known.is_empty() {
                "nothing".to_owned()
            } else {
                known.join(", ")
            }
        )));
    };
    std::fs::create_dir_all(out)
        .map_err(|e| CliError::Input(format!("cannot create {}: {e}", out.display())))?;
    let bar = progress_bar("downloading", artifact.size);
    let progress = bar.clone();
    let summary = kiln_agent::transfer::download_and_unpack(
        &mut coordinator.artifacts(),
        &artifact.digest,
        &std::env::temp_dir(),
        out,
        Limits::UNLIMITED,
        move |done| progress.set_position(done),
    )
    .await
    .map_err(|error| coordinator.transfer_failed(error))?;
    bar.finish_and_clear();
    let message = format!(
        "unpacked {path} ({} files, {}) into {}",
        summary.files,
        human_bytes(summary.bytes),
        out.display()
    );
    match format {
        OutputFormat::Table => output::line(message)?,
        OutputFormat::Json => output::json(&serde_json::json!({
            "path": path, "digest": artifact.digest, "files": summary.files, "bytes": summary.bytes,
        }))?,
    }
    Ok(Outcome::Ok)
}

/// `kiln gc [--keep-days N] [--dry-run]`.
pub(crate) async fn gc(
    coordinator: &Coordinator,
    format: OutputFormat,
    args: &GcArgs,
) -> Result<Outcome, CliError> {
    let request = pb::GcRequest {
        keep_days: args.keep_days.unwrap_or(0),
        dry_run: args.dry_run,
    };
    let report = coordinator.collect_garbage(request).await?;
    match format {
        OutputFormat::Json => output::json(&serde_json::json!({
            "dry_run": args.dry_run,
            "blobs_deleted": report.blobs_deleted,
            "bytes_freed": report.bytes_freed,
            "blobs_kept": report.blobs_kept,
            "caches_expired": report.caches_expired,
            "runs_deleted": report.runs_deleted,
        }))?,
        OutputFormat::Table => output::line(format!(
            "{} {} blobs ({}), kept {}",
            if args.dry_run {
                "would delete"
            } else {
                "deleted"
            },
            report.blobs_deleted,
            human_bytes(report.bytes_freed),
            report.blobs_kept
        ))?,
    }
    if format == OutputFormat::Table && !report.runs_deleted.is_empty() {
        let runs: Vec<String> = report.runs_deleted.iter().map(u64::to_string).collect();
        output::line(format!(
            "{} {} runs past their pipeline's retention (with their stages and logs): {}",
            if args.dry_run {
                "would delete"
            } else {
                "deleted"
            },
            runs.len(),
            runs.join(", ")
        ))?;
    }
    if format == OutputFormat::Table && report.caches_expired > 0 {
        output::line(format!(
            "{} {} expired shared cache entries",
            if args.dry_run {
                "would forget"
            } else {
                "forgot"
            },
            report.caches_expired
        ))?;
    }
    Ok(Outcome::Ok)
}

/// Packs `dir` (honouring .gitignore) and uploads it; returns its digest.
pub(crate) async fn upload_source(
    coordinator: &Coordinator,
    dir: &Path,
) -> Result<String, CliError> {
    if !dir.is_dir() {
        return Err(CliError::Input(format!(
            "--source {} is not a directory",
            dir.display()
        )));
    }
    let source = dir.to_path_buf();
    let bar = progress_bar("uploading source", 0);
    let progress = bar.clone();
    let (digest, size, summary) = kiln_agent::transfer::pack_and_upload(
        &mut coordinator.artifacts(),
        &std::env::temp_dir(),
        move |out| archive::pack_source(&source, out),
        move |done| progress.set_position(done),
    )
    .await
    .map_err(|error| coordinator.transfer_failed(error))?;
    bar.finish_and_clear();
    eprintln!(
        "uploaded {} ({} files, {} packed) as {digest}",
        dir.display(),
        summary.files,
        human_bytes(size)
    );
    Ok(digest)
}

/// A one-line progress display (bytes, rate, time left) on stderr when
/// stdout is a terminal; hidden otherwise, so scripts and logs stay clean.
/// `total` 0: unknown (a source snapshot is packed while it uploads).
fn progress_bar(label: &'static str, total: u64) -> ProgressBar {
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = if total > 0 {
        (
            ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()),
            "{msg}: {bytes} of {total_bytes} at {bytes_per_sec}, {eta} left",
        )
    } else {
        (
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            "{msg}: {bytes} at {bytes_per_sec}",
        )
    };
    bar.set_style(ProgressStyle::with_template(template).expect("a valid template"));
    bar.set_message(label);
    bar
}

/// Sizes as people write them (`1.50 KiB`).
fn human_bytes(bytes: u64) -> String {
    HumanBytes(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
    }
}
