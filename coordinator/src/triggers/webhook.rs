//! `POST /hooks/{pipeline}`: GitHub-, Gitea- and Forgejo-style push
//! webhooks. The body must be signed (HMAC-SHA256) with the kiln secret the
//! pipeline's `triggers.push.secret` names; a matching branch starts a run
//! at the pushed commit. Every correctly signed delivery is audited.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};

use kiln_common::triggers::webhook::{self, PushEvent};
use serde_json::json;

use super::{Starter, TriggeredRun};
use crate::auth::layer::Auth;
use crate::secrets::Secrets;

/// Largest webhook body accepted (GitHub caps payloads at 25 MB, but a
/// push of a few commits is a few KiB).
pub(crate) const MAX_BODY_BYTES: usize = 1 << 20;

/// What the hook handler needs.
#[derive(Clone)]
pub(crate) struct Hooks {
    pub(crate) secrets: Arc<Secrets>,
    /// Starts runs (and parsed each pipeline version's file once).
    pub(crate) starter: Starter,
    pub(crate) auth: Arc<Auth>,
    /// Where the latest durable pipeline versions are read.
    pub(crate) view: Arc<crate::read::DurableView>,
}

type Reply = (StatusCode, Json<serde_json::Value>);

fn reply(status: StatusCode, message: impl Into<String>) -> Reply {
    (status, Json(json!({ "message": message.into() })))
}

pub(crate) async fn push(
    State(hooks): State<Hooks>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let (status, body, target) = handle(&hooks, &name, &headers, &body).await;
    // Like gRPC calls without a valid token, unsigned deliveries are only
    // logged: anyone who reaches the port could otherwise fill the log.
    let before_verification = [
        StatusCode::UNAUTHORIZED,
        StatusCode::NOT_FOUND,
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::INTERNAL_SERVER_ERROR,
    ];
    if before_verification.contains(&status) {
        tracing::warn!(pipeline = %name, reason = %body.0["message"], "refused a webhook before its signature was verified");
        return (status, body);
    }
    hooks
        .auth
        .audit(
            format!("webhook:{name}"),
            "POST /hooks/{pipeline}".to_owned(),
            target,
            (
                status.as_str().to_owned(),
                body.0["message"].as_str().unwrap_or_default().to_owned(),
            ),
            String::new(),
        )
        .await;
    (status, body)
}

async fn handle(
    hooks: &Hooks,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> (StatusCode, Json<serde_json::Value>, String) {
    let target = format!("pipeline {name}");
    let fail = |status, message: String| {
        let (status, body) = reply(status, message);
        (status, body, target.clone())
    };
    let Some(pipeline) = hooks.view.pipeline(name).map(|record| (*record).clone()) else {
        return fail(StatusCode::NOT_FOUND, format!("no pipeline named `{name}`"));
    };
    let push = hooks
        .starter
        .parsed
        .get(&pipeline)
        .ok()
        .and_then(|parsed| parsed.triggers.push.clone());
    let Some(push) = push else {
        return fail(
            StatusCode::NOT_FOUND,
            format!("pipeline `{name}` has no `triggers.push`"),
        );
    };
    let key = match hooks.secrets.reveal([&push.secret]) {
        Ok(mut values) => values.remove(&push.secret).unwrap_or_default(),
        Err(_) => {
            return fail(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the webhook secret `{}` is not set; set it with `kiln secret set {}`",
                    push.secret, push.secret
                ),
            );
        }
    };
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    if let Err(error) = webhook::verify_signature(key.as_bytes(), body, header) {
        return fail(StatusCode::UNAUTHORIZED, error.to_string());
    }
    let event = ["X-GitHub-Event", "X-Gitea-Event", "X-Forgejo-Event"]
        .into_iter()
        .find_map(header)
        .unwrap_or("push");
    if event == "ping" {
        return fail(StatusCode::OK, "pong".into());
    }
    if event != "push" {
        return fail(
            StatusCode::ACCEPTED,
            format!("`{event}` events start no runs"),
        );
    }
    let pushed = match webhook::parse_push(body) {
        Ok(PushEvent::Branch(pushed)) => pushed,
        Ok(PushEvent::Ignored(why)) => return fail(StatusCode::ACCEPTED, why.to_string()),
        Err(error) => return fail(StatusCode::BAD_REQUEST, error.to_string()),
    };
    if !push.accepts(&pushed.branch, &pipeline.branch) {
        return fail(
            StatusCode::ACCEPTED,
            format!("branch `{}` is not one this pipeline builds", pushed.branch),
        );
    }
    let mut run = TriggeredRun::new(
        pipeline,
        Some(pushed.commit.clone()),
        "push",
        format!("push:{}@{}", pushed.pusher, pushed.branch),
    );
    run.variables
        .insert("KILN_BRANCH".to_owned(), pushed.branch.clone());
    match hooks.starter.start(run).await {
        Ok(run) => (
            StatusCode::CREATED,
            Json(json!({
                "message": format!("run {} started for {}", run.id, pushed.commit),
                "run_id": run.id,
            })),
            format!("pipeline {name} run {}", run.id),
        ),
        // A revision that cannot be built is the sender's problem (422);
        // a fault of the coordinator is 500, without its detail.
        Err(error) => fail(status_of(&error), error.public_message()),
    }
}

/// The one mapping of API errors to HTTP statuses.
fn status_of(error: &crate::error::ApiError) -> StatusCode {
    StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}
