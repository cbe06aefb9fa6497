//! `POST /hooks/{pipeline}`: GitHub, Gitea/Forgejo and GitLab webhooks for
//! branch pushes, tag pushes and merge (pull) requests. The body must be
//! signed (HMAC-SHA256; GitLab: its token) with the kiln secret the
//! pipeline's `triggers` name; an event its `push`, `tag` or
//! `merge_request` filters accept starts one run at the commit it names,
//! once per delivery id and per event, ref and commit. Every correctly
//! signed delivery is audited.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};

use kiln_common::spec::Triggers;
use kiln_common::triggers::forge::{self, ForgeEvent};
use kiln_common::triggers::webhook;
use serde_json::json;

use super::{Starter, TriggeredRun};
use crate::auth::layer::Auth;
use crate::error::ApiError;
use crate::secrets::Secrets;
use crate::store::PipelineRecord;

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
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let (status, body, target) = handle(&hooks, &name, &query, &headers, &body).await;
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
    query: &[(String, String)],
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
    let triggers = hooks
        .starter
        .parsed
        .get(&pipeline)
        .map(|parsed| parsed.triggers.clone())
        .unwrap_or_default();
    let Some(secret) = triggers.webhook_secret().map(str::to_owned) else {
        return fail(
            StatusCode::NOT_FOUND,
            format!("pipeline `{name}` has no `triggers.push`, `tag` or `merge_request`"),
        );
    };
    let key = match hooks.secrets.reveal([&secret]) {
        Ok(mut values) => values.remove(&secret).unwrap_or_default(),
        Err(_) => {
            return fail(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the webhook secret `{secret}` is not set; set it with `kiln secret set {secret}`"
                ),
            );
        }
    };
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    if let Err(error) = webhook::verify_signature(key.as_bytes(), body, header) {
        return fail(StatusCode::UNAUTHORIZED, error.to_string());
    }
    let delivery = match forge::read(header, body) {
        Ok(delivery) => delivery,
        Err(error) => return fail(StatusCode::BAD_REQUEST, error.to_string()),
    };
    let run = match wanted_run(&triggers, pipeline, &delivery.event) {
        Ok(run) => run,
        Err((status, why)) => return fail(status, why),
    };
    let Some((mut run, git_ref, commit)) = run else {
        return fail(StatusCode::OK, "pong".into());
    };
    // Parameters come from the hook's URL (`/hooks/train?EPOCHS=20`), set
    // where the forge's webhook is configured; the starter checks them
    // against the file's `params:` like `kiln run -p`.
    for (param, value) in query {
        if run.params.insert(param.clone(), value.clone()).is_some() {
            return fail(
                StatusCode::BAD_REQUEST,
                format!("parameter `{param}` is given twice in the hook's URL; give it once"),
            );
        }
    }
    // One run per delivery id, and per event, ref and commit: a forge
    // that sends again, or two hooks for one push, start nothing more.
    run.deliveries = delivery
        .id
        .iter()
        .map(|id| format!("delivery:{id}"))
        .chain([commit_key(delivery.event.kind(), &git_ref, &commit)])
        .collect();
    match hooks.starter.start(run).await {
        Ok(run) => (
            StatusCode::CREATED,
            Json(json!({
                "message": format!("run {} started for {commit}", run.id),
                "run_id": run.id,
            })),
            format!("pipeline {name} run {}", run.id),
        ),
        Err(ApiError::AlreadyExists(why)) => fail(StatusCode::OK, why),
        // A revision that cannot be built is the sender's problem (422);
        // a fault of the coordinator is 500, without its detail.
        Err(error) => fail(status_of(&error), error.public_message()),
    }
}

/// A run to start, with the ref and commit the event names.
type Wanted = (TriggeredRun, String, String);

/// The run a forge event asks for under the pipeline's `triggers:`, with
/// the ref and commit it names; `Ok(None)` for a ping, `Err` with the
/// answer when it starts none.
fn wanted_run(
    triggers: &Triggers,
    pipeline: PipelineRecord,
    event: &ForgeEvent,
) -> Result<Option<Wanted>, (StatusCode, String)> {
    let ignored = |why: String| Err((StatusCode::ACCEPTED, why));
    let (mut run, git_ref, commit) = match event {
        ForgeEvent::Ping => return Ok(None),
        ForgeEvent::Ignored(why) => return ignored(why.clone()),
        ForgeEvent::Push(push) => {
            let Some(trigger) = &triggers.push else {
                return ignored("the pipeline has no `triggers.push`".to_owned());
            };
            if !trigger.accepts(&push.branch, &pipeline.branch) {
                return ignored(format!(
                    "branch `{}` is not one this pipeline builds",
                    push.branch
                ));
            }
            let by = format!("push:{}@{}", push.pusher, push.branch);
            let mut run = TriggeredRun::new(pipeline, Some(push.commit.clone()), "push", by);
            run.variables
                .insert("KILN_BRANCH".to_owned(), push.branch.clone());
            (run, push.branch.clone(), push.commit.clone())
        }
        ForgeEvent::Tag(tag) => {
            let Some(patterns) = &triggers.tag else {
                return ignored(format!(
                    "tag `{}`: the pipeline has no `triggers.tag`",
                    tag.tag
                ));
            };
            if !patterns
                .iter()
                .any(|pattern| webhook::branch_matches(pattern, &tag.tag))
            {
                return ignored(format!(
                    "tag `{}` matches none of `triggers.tag`: {}",
                    tag.tag,
                    patterns.join(", ")
                ));
            }
            let by = format!("tag:{}@{}", tag.pusher, tag.tag);
            let mut run = TriggeredRun::new(pipeline, Some(tag.commit.clone()), "tag", by);
            run.variables.insert("KILN_TAG".to_owned(), tag.tag.clone());
            (run, format!("refs/tags/{}", tag.tag), tag.commit.clone())
        }
        ForgeEvent::MergeRequest(request) => {
            let Some(trigger) = &triggers.merge_request else {
                return ignored("the pipeline has no `triggers.merge_request`".to_owned());
            };
            if !trigger.accepts(&request.target_branch) {
                return ignored(format!(
                    "merge requests into `{}` are not built",
                    request.target_branch
                ));
            }
            let by = format!("merge_request:{}!{}", request.author, request.id);
            let rev = Some(request.commit.clone());
            let mut run = TriggeredRun::new(pipeline, rev, "merge_request", by);
            run.variables
                .insert("KILN_BRANCH".to_owned(), request.source_branch.clone());
            run.variables
                .insert("KILN_MR_ID".to_owned(), request.id.to_string());
            (run, format!("!{}", request.id), request.commit.clone())
        }
    };
    run.triggered_by.truncate(256);
    Ok(Some((run, git_ref, commit)))
}

/// The one mapping of API errors to HTTP statuses.
fn status_of(error: &crate::error::ApiError) -> StatusCode {
    StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The idempotency key of an event, ref and commit, shared by webhook
/// deliveries and polls (`poll`): the ref is a push's branch name, a
/// tag's `refs/tags/T`, a merge request's `!N`.
pub(crate) fn commit_key(kind: &str, git_ref: &str, commit: &str) -> String {
    format!("{kind}:{git_ref}:{commit}")
}
