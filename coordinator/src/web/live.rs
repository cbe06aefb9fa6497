//! A stage's raw log (`/log`, text/plain), its live stream (`/events`,
//! Server-Sent Events) and artifact downloads.
//!
//! Both logs read through the same path as `kiln logs`: stored lines in
//! pages from the blocking pool, then — for `/events` — live lines from
//! the engine's bounded tap. Each event's `id:` is the line's sequence
//! number within the attempt, so a browser that lost its connection comes
//! back with `Last-Event-ID` and gets exactly the lines after it: the
//! resume cursor that `kiln logs -f` uses. A follower that falls behind is
//! cut off and resumes the same way.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use kiln_common::ids::RunId;
use kiln_proto::v1 as pb;
use serde::Deserialize;
use tokio_stream::wrappers::ReceiverStream;

use super::Web;
use super::ansi;
use super::format::{error_page, stage_is_over, status_page};
use super::session::Signed;
use crate::read::{LogRequest, stream_logs};

/// How long a browser waits before it reconnects after a cut.
const RETRY: Duration = Duration::from_millis(1000);

#[derive(Deserialize)]
pub(crate) struct LogQuery {
    /// An earlier attempt's log; the current one by default.
    attempt: Option<u32>,
    /// `/events`: the first line wanted when no `Last-Event-ID` is sent
    /// (the page passes the number of lines it already shows).
    from: Option<u64>,
}

/// The stage's current attempt, or a refusal naming what is missing.
pub(super) async fn current_stage(
    web: &Web,
    run: u64,
    stage: &str,
) -> Result<(pb::Run, pb::Stage), tonic::Status> {
    let run = web.reader.run(RunId(run)).await?;
    let found = run
        .stages
        .iter()
        .find(|s| s.name == stage)
        .cloned()
        .ok_or_else(|| {
            tonic::Status::not_found(format!("run {} has no stage `{stage}`", run.id))
        })?;
    Ok((run, found))
}

/// Lines of one attempt of a stage, from `next_seq` on, following live
/// ones when `follow` is set.
pub(super) async fn attempt_lines(
    web: &Web,
    run: u64,
    stage: &str,
    attempt: u32,
    next_seq: u64,
    follow: bool,
) -> Result<ReceiverStream<Result<pb::LogEntry, tonic::Status>>, tonic::Status> {
    let request = LogRequest {
        run: RunId(run),
        stage: Some(stage.to_owned()),
        follow,
        resume: vec![pb::LogCursor {
            stage: stage.to_owned(),
            attempt,
            next_seq,
        }],
    };
    let receiver = stream_logs(&web.reader, &web.events, request).await?;
    Ok(ReceiverStream::new(receiver))
}

/// `GET /runs/RUN/stages/STAGE/log`: the attempt's lines as plain text.
pub(crate) async fn log(
    State(web): State<Arc<Web>>,
    signed: Signed,
    Path((run, stage)): Path<(u64, String)>,
    Query(query): Query<LogQuery>,
) -> Response {
    let plain = |status: &tonic::Status| {
        (
            super::format::http_status(status.code()),
            format!("{}\n", status.message()),
        )
            .into_response()
    };
    let _ = signed;
    let (_, current) = match current_stage(&web, run, &stage).await {
        Ok(found) => found,
        Err(status) => return plain(&status),
    };
    let attempt = query.attempt.unwrap_or(current.attempt);
    let lines = match attempt_lines(&web, run, &stage, attempt, 0, false).await {
        Ok(lines) => lines,
        Err(status) => return plain(&status),
    };
    let body = lines
        .take_while(move |entry| {
            // Later attempts come after this one's last line: stop there.
            let same = !matches!(entry, Ok(entry) if entry.attempt != attempt);
            futures::future::ready(same)
        })
        .map(|entry| match entry {
            Ok(entry) => {
                let mut text = entry.line.map(|line| line.text).unwrap_or_default();
                text.push('\n');
                Ok(Bytes::from(text))
            }
            Err(status) => Err(std::io::Error::other(status.message().to_owned())),
        });
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(body),
    )
        .into_response()
}

/// `GET /runs/RUN/stages/STAGE/events`: the attempt's lines from
/// `Last-Event-ID` + 1 (or `?from=`), then live ones until the stage ends.
///
/// Events: a line (`id:` its sequence number, data its HTML); `attempt`
/// when a newer attempt started (the page offers to reload); `end` when
/// the stage finished (the page stops listening). A stream cut for any
/// other reason ends without `end`, and the browser reconnects.
pub(crate) async fn events(
    State(web): State<Arc<Web>>,
    signed: Signed,
    Path((run, stage)): Path<(u64, String)>,
    Query(query): Query<LogQuery>,
    headers: HeaderMap,
) -> Response {
    let (_, current) = match current_stage(&web, run, &stage).await {
        Ok(found) => found,
        Err(status) => return status_page(Some(signed.chrome()), &status),
    };
    let attempt = query.attempt.unwrap_or(current.attempt);
    let last_seen = headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    let next_seq = last_seen.map_or(query.from.unwrap_or(0), |seq| seq + 1);
    let lines = match attempt_lines(&web, run, &stage, attempt, next_seq, true).await {
        Ok(lines) => lines,
        Err(status) => return status_page(Some(signed.chrome()), &status),
    };
    let start =
        futures::stream::once(async { Ok(SseEvent::default().retry(RETRY).comment("kiln")) });
    let follow = Follow {
        web,
        run,
        stage,
        attempt,
        lines,
        done: false,
    };
    let body = futures::stream::unfold(follow, |mut follow| async move {
        let event = follow.next().await?;
        Some((Ok::<_, std::convert::Infallible>(event), follow))
    });
    Sse::new(start.chain(body))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// One browser following one attempt of a stage.
struct Follow {
    web: Arc<Web>,
    run: u64,
    stage: String,
    attempt: u32,
    lines: ReceiverStream<Result<pb::LogEntry, tonic::Status>>,
    /// `end` or `attempt` was sent: close after it.
    done: bool,
}

impl Follow {
    /// The next event, or `None` to close the stream (without `end`, the
    /// browser reconnects and resumes from its `Last-Event-ID`).
    async fn next(&mut self) -> Option<SseEvent> {
        if self.done {
            return None;
        }
        match self.lines.next().await {
            Some(Ok(entry)) if entry.attempt != self.attempt => {
                self.done = true;
                Some(
                    SseEvent::default()
                        .event("attempt")
                        .data(entry.attempt.to_string()),
                )
            }
            Some(Ok(entry)) => {
                let text = entry.line.map(|line| line.text).unwrap_or_default();
                Some(
                    SseEvent::default()
                        .id(entry.seq.to_string())
                        .data(ansi::to_html(&text)),
                )
            }
            // Fallen behind, or the read failed.
            Some(Err(status)) => {
                tracing::debug!(run = self.run, stage = %self.stage, reason = %status.message(), "a web log follower was cut off");
                None
            }
            // The tap also closes when the coordinator stops: only a stage
            // that is over (or retried) ends the page's log.
            None => {
                self.done = true;
                match current_stage(&self.web, self.run, &self.stage).await {
                    Ok((_, stage))
                        if stage.attempt != self.attempt || stage_is_over(stage.state) =>
                    {
                        // An event without data is never dispatched.
                        Some(SseEvent::default().event("end").data("end"))
                    }
                    _ => None,
                }
            }
        }
    }
}

/// `GET /blobs/sha256:…`: an artifact, verified by digest as it streams.
pub(crate) async fn blob(
    State(web): State<Arc<Web>>,
    signed: Signed,
    Path(digest): Path<String>,
) -> Response {
    let allowed = crate::auth::rule("/kiln.v1.ArtifactService/DownloadBlob")
        .is_some_and(|rule| rule.allows(signed.principal.role));
    if !allowed {
        return error_page(
            Some(signed.chrome()),
            StatusCode::FORBIDDEN,
            "this token may not download artifacts",
        );
    }
    let parsed = match crate::blobs::parse_digest(&digest) {
        Ok(parsed) => parsed,
        Err(error) => {
            return error_page(
                Some(signed.chrome()),
                StatusCode::BAD_REQUEST,
                &error.to_string(),
            );
        }
    };
    let Some(size) = web.blobs.stat(&parsed) else {
        return error_page(
            Some(signed.chrome()),
            StatusCode::NOT_FOUND,
            &format!("no blob {digest} is stored (collected, or never uploaded)"),
        );
    };
    let body = web.blobs.read(parsed, 0).map(|chunk| {
        chunk
            .map(Bytes::from)
            .map_err(|status| std::io::Error::other(status.message().to_owned()))
    });
    let name = format!(
        "attachment; filename=\"{}.tar.zst\"",
        super::format::short(&digest)
    );
    (
        [
            (header::CONTENT_TYPE, "application/zstd".to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
            (header::CONTENT_DISPOSITION, name),
        ],
        Body::from_stream(body),
    )
        .into_response()
}
