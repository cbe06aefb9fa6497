//! `/runs/RUN/stages/STAGE`: the log, artifacts, metrics and gate checks.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use futures::StreamExt;
use serde::Deserialize;

use super::{ArtifactView, GateView, Page, Signed, Web, fail, finish, gate_view, now_ms};
use crate::web::ansi;
use crate::web::format::{self, Chrome, render, short, url_encode};
use crate::web::live::{attempt_lines, current_stage};

/// Lines a stage page renders; the whole log is at `/log`.
const PAGE_LINES: usize = 20_000;

struct LineView {
    number: u64,
    html: String,
}

#[derive(Template)]
#[template(path = "stage.html")]
struct StagePage {
    chrome: Chrome,
    run_id: u64,
    run_href: String,
    name: String,
    href: String,
    state: &'static str,
    attempt: u32,
    attempts: Vec<u32>,
    agent: String,
    started: String,
    duration: String,
    exit_code: String,
    message: String,
    lines: Vec<LineView>,
    cut: bool,
    /// The live stream's URL while lines may still come, else empty.
    events: String,
    query: String,
    artifacts: Vec<ArtifactView>,
    metrics: Vec<(String, String)>,
    gate: Option<GateView>,
    can_retry: bool,
    can_decide: bool,
}

#[derive(Deserialize)]
pub(crate) struct StageQuery {
    attempt: Option<u32>,
    /// Show only lines containing this text.
    #[serde(default)]
    q: String,
}

pub(crate) async fn stage(
    State(web): State<Arc<Web>>,
    signed: Signed,
    Path((run, name)): Path<(u64, String)>,
    Query(query): Query<StageQuery>,
) -> Response {
    finish(stage_page(&web, &signed, run, &name, query).await)
}

async fn stage_page(
    web: &Web,
    signed: &Signed,
    run_id: u64,
    name: &str,
    query: StageQuery,
) -> Page {
    let (_, stage) = current_stage(web, run_id, name)
        .await
        .map_err(fail(signed))?;
    let attempt = query.attempt.unwrap_or(stage.attempt).max(1);
    let mut lines = Vec::new();
    let mut cut = false;
    let mut stream = attempt_lines(web, run_id, name, attempt, 0, false)
        .await
        .map_err(fail(signed))?;
    let mut next_seq = 0;
    while let Some(entry) = stream.next().await {
        let entry = entry.map_err(fail(signed))?;
        if entry.attempt != attempt {
            break;
        }
        if lines.len() == PAGE_LINES {
            cut = true;
            break;
        }
        next_seq = entry.seq + 1;
        let text = entry.line.map(|line| line.text).unwrap_or_default();
        if query.q.is_empty() || text.contains(&query.q) {
            lines.push(LineView {
                number: entry.seq + 1,
                html: ansi::to_html(&text),
            });
        }
    }
    let state = format::stage_state(stage.state);
    let href = format!("/runs/{run_id}/stages/{}", url_encode(name));
    let finished = format::stage_is_over(stage.state);
    // Live lines only continue an unfiltered, complete current attempt.
    let events = if !finished && !cut && query.q.is_empty() && attempt == stage.attempt {
        format!("{href}/events?attempt={attempt}&from={next_seq}")
    } else {
        String::new()
    };
    let gate = stage.gate.as_ref().map(gate_view);
    let mut metrics: Vec<(String, String)> = stage
        .metrics
        .iter()
        .map(|(k, v)| (k.clone(), format::number(*v)))
        .collect();
    metrics.sort();
    let now = now_ms();
    Ok(render(&StagePage {
        chrome: signed.chrome(),
        run_id,
        run_href: format!("/runs/{run_id}"),
        name: name.to_owned(),
        href,
        state,
        attempt,
        attempts: (1..=stage.attempt).collect(),
        agent: stage.agent.clone(),
        started: format::time(stage.started_ms),
        duration: format::duration(
            stage.started_ms,
            if stage.finished_ms == 0 {
                now
            } else {
                stage.finished_ms
            },
        ),
        exit_code: if finished && stage.started_ms != 0 {
            stage.exit_code.to_string()
        } else {
            String::new()
        },
        message: stage.message.clone(),
        lines,
        cut,
        events,
        query: query.q,
        artifacts: stage
            .outputs
            .iter()
            .map(|a| ArtifactView {
                path: a.path.clone(),
                digest: short(&a.digest),
                size: format::bytes(a.size),
                href: format!("/blobs/{}", a.digest),
            })
            .collect(),
        metrics,
        gate,
        can_retry: signed.can("RetryStage") && finished,
        can_decide: state == "awaiting_approval" && signed.can("ApproveStage"),
    }))
}
