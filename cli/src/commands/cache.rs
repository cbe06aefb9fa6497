//! `kiln cache ls [--pipeline P]` and `kiln cache clear PIPELINE [--key K]`:
//! the coordinator's shared stage caches (`cache: {..., shared: true}`).
//! Each agent's own copies live under its `--work-dir`/stage-cache, bounded by
//! `--cache-max-bytes`.

use kiln_proto::v1 as pb;
use serde::Serialize;

use crate::args::OutputFormat;
use crate::client::Coordinator;
use crate::error::{CliError, Outcome};
use crate::{output, timefmt};

#[derive(Serialize)]
struct CacheView {
    pipeline: String,
    key: String,
    paths: Vec<String>,
    bytes: u64,
    agent: String,
    created_ms: u64,
}

/// `kiln cache ls`.
pub(crate) async fn list(
    coordinator: &Coordinator,
    format: OutputFormat,
    pipeline: Option<&str>,
) -> Result<Outcome, CliError> {
    let entries = coordinator
        .control()
        .list_caches(pb::ListCachesRequest {
            pipeline: pipeline.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(|status| coordinator.failed(status))?
        .into_inner()
        .entries;
    let views: Vec<CacheView> = entries
        .into_iter()
        .map(|entry| CacheView {
            pipeline: entry.pipeline,
            key: entry.key,
            paths: entry.archives.iter().map(|a| a.path.clone()).collect(),
            bytes: entry.archives.iter().map(|a| a.size).sum(),
            agent: entry.agent,
            created_ms: entry.created_ms,
        })
        .collect();
    match format {
        OutputFormat::Json => output::json(&views)?,
        OutputFormat::Table => output::line(table(&views, timefmt::now_ms()).trim_end())?,
    }
    Ok(Outcome::Ok)
}

/// `kiln cache clear PIPELINE [--key K]`.
pub(crate) async fn clear(
    coordinator: &Coordinator,
    format: OutputFormat,
    pipeline: &str,
    key: Option<&str>,
) -> Result<Outcome, CliError> {
    let removed = coordinator
        .control()
        .clear_caches(pb::ClearCachesRequest {
            pipeline: pipeline.to_owned(),
            key: key.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(|status| coordinator.failed(status))?
        .into_inner()
        .removed;
    match format {
        OutputFormat::Json => output::json(&serde_json::json!({ "removed": removed }))?,
        OutputFormat::Table => output::line(format!(
            "forgot {removed} shared cache entries of {pipeline}; their blobs go at the next \
             garbage collection, and agents drop their own copies at their next use"
        ))?,
    }
    Ok(Outcome::Ok)
}

fn table(views: &[CacheView], now_ms: u64) -> String {
    if views.is_empty() {
        return "no shared caches\n".into();
    }
    let rows: Vec<[String; 6]> = views
        .iter()
        .map(|view| {
            [
                view.pipeline.clone(),
                view.key.clone(),
                view.bytes.to_string(),
                view.agent.clone(),
                timefmt::age(view.created_ms, now_ms),
                view.paths.join(","),
            ]
        })
        .collect();
    output::table(
        ["PIPELINE", "KEY", "BYTES", "AGENT", "SAVED", "PATHS"],
        &rows,
    )
}
