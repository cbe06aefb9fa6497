//! The dashboard's buttons: cancel, retry, approve, reject, roll back,
//! unfreeze.
//!
//! Each checks the form's CSRF token, then the signed-in principal's role
//! against the rule of the gRPC method the CLI would call
//! (`auth::rule`), then calls that method's handler in
//! `ControlService` itself, and records the call in the audit log with
//! the same method, target and outcome as the gRPC layer does. So a
//! button can do nothing the CLI could not, and leaves the same trace.

use std::future::Future;
use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use kiln_proto::v1 as pb;
use pb::control_service_server::ControlService;
use serde::Deserialize;
use tonic::{Request, Status};

use super::Web;
use super::format::{status_page, url_encode};
use super::session::{Signed, method_path};
use crate::auth::AuditTarget;
use crate::auth::layer::{outcome_of_status, refusal};
use crate::control::ControlApi;
use crate::http::Peer;

#[derive(Deserialize)]
pub(crate) struct ActionForm {
    csrf: Option<String>,
    /// Why a gate was approved or rejected.
    #[serde(default)]
    reason: String,
}

type Form = Result<axum::Form<ActionForm>, FormRejection>;

/// The form, once its CSRF token is right; a form that does not parse has
/// no token either.
// The refusal is the page to send: axum handlers return it as is.
#[allow(clippy::result_large_err)]
fn checked(signed: &Signed, form: Form) -> Result<ActionForm, Response> {
    let form = form.map(|axum::Form(form)| form).ok();
    signed.check_csrf(form.as_ref().and_then(|f| f.csrf.as_deref()))?;
    Ok(form.unwrap_or(ActionForm {
        csrf: None,
        reason: String::new(),
    }))
}

impl Web {
    /// Calls `ControlService/<method>` as `signed`, as the gRPC layer
    /// would: rule check, handler, audit record (durable when this
    /// returns).
    async fn act<Q, A, F, Fut>(
        &self,
        signed: &Signed,
        method: &str,
        peer: std::net::SocketAddr,
        request: Q,
        call: F,
    ) -> Result<A, Status>
    where
        F: FnOnce(Arc<ControlApi>, Request<Q>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<A>, Status>>,
    {
        let path = method_path(method);
        let rule = crate::auth::rule(&path)
            .ok_or_else(|| Status::internal(format!("no rule for {path}")))?;
        let principal = &signed.principal;
        let result = if rule.allows(principal.role) {
            let mut request = Request::new(request);
            request.extensions_mut().insert(principal.clone());
            call(self.control.clone(), request).await
        } else {
            Err(refusal(principal, &path))
        };
        if rule.audited {
            let target = result
                .as_ref()
                .ok()
                .and_then(|response| response.extensions().get::<AuditTarget>())
                .map(|target| target.0.clone())
                .unwrap_or_default();
            let outcome = outcome_of_status(result.as_ref().err());
            self.auth
                .audit(
                    principal.name.clone(),
                    path,
                    target,
                    outcome,
                    peer.to_string(),
                )
                .await;
        }
        result.map(tonic::Response::into_inner)
    }
}

/// Back to `to` after an action, or a page saying why it was refused.
fn done<A>(signed: &Signed, result: Result<A, Status>, to: &str) -> Response {
    match result {
        Ok(_) => Redirect::to(to).into_response(),
        Err(status) => status_page(Some(signed.chrome()), &status),
    }
}

fn run_page(run: u64) -> String {
    format!("/runs/{run}")
}

fn stage_page(run: u64, stage: &str) -> String {
    format!("/runs/{run}/stages/{}", url_encode(stage))
}

pub(crate) async fn cancel(
    State(web): State<Arc<Web>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    signed: Signed,
    Path(run): Path<u64>,
    form: Form,
) -> Response {
    if let Err(refused) = checked(&signed, form) {
        return refused;
    }
    let request = pb::CancelRunRequest { run_id: run };
    let result = web
        .act(
            &signed,
            "CancelRun",
            peer,
            request,
            |api, request| async move { api.cancel_run(request).await },
        )
        .await;
    done(&signed, result, &run_page(run))
}

pub(crate) async fn retry(
    State(web): State<Arc<Web>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    signed: Signed,
    Path((run, stage)): Path<(u64, String)>,
    form: Form,
) -> Response {
    if let Err(refused) = checked(&signed, form) {
        return refused;
    }
    let request = pb::RetryStageRequest {
        run_id: run,
        stage: stage.clone(),
    };
    let result = web
        .act(
            &signed,
            "RetryStage",
            peer,
            request,
            |api, request| async move { api.retry_stage(request).await },
        )
        .await;
    done(&signed, result, &stage_page(run, &stage))
}

pub(crate) async fn approve(
    State(web): State<Arc<Web>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    signed: Signed,
    Path((run, stage)): Path<(u64, String)>,
    form: Form,
) -> Response {
    decide(&web, peer, &signed, (run, stage), form, true).await
}

pub(crate) async fn reject(
    State(web): State<Arc<Web>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    signed: Signed,
    Path((run, stage)): Path<(u64, String)>,
    form: Form,
) -> Response {
    decide(&web, peer, &signed, (run, stage), form, false).await
}

/// Approves or rejects a waiting gate through the same handler as `kiln
/// approve` / `kiln reject`; a reason, when given, is recorded with it.
async fn decide(
    web: &Web,
    peer: std::net::SocketAddr,
    signed: &Signed,
    (run, stage): (u64, String),
    form: Form,
    approve: bool,
) -> Response {
    let form = match checked(signed, form) {
        Ok(form) => form,
        Err(refused) => return refused,
    };
    let request = pb::DecideStageRequest {
        run_id: run,
        stage,
        comment: form.reason.trim().to_owned(),
        ..Default::default()
    };
    let result = if approve {
        web.act(
            signed,
            "ApproveStage",
            peer,
            request,
            |api, request| async move { api.approve_stage(request).await },
        )
        .await
    } else {
        web.act(
            signed,
            "RejectStage",
            peer,
            request,
            |api, request| async move { api.reject_stage(request).await },
        )
        .await
    };
    done(signed, result, &run_page(run))
}

pub(crate) async fn rollback(
    State(web): State<Arc<Web>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    signed: Signed,
    Path((pipeline, name)): Path<(String, String)>,
    form: Form,
) -> Response {
    if let Err(refused) = checked(&signed, form) {
        return refused;
    }
    let request = pb::RollbackRequest {
        environment: name.clone(),
        pipeline: pipeline.clone(),
        ..Default::default()
    };
    let result = web
        .act(
            &signed,
            "Rollback",
            peer,
            request,
            |api, request| async move { api.rollback(request).await },
        )
        .await;
    done(&signed, result, &environment_page(&pipeline, &name))
}

pub(crate) async fn unfreeze(
    State(web): State<Arc<Web>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    signed: Signed,
    Path((pipeline, name)): Path<(String, String)>,
    form: Form,
) -> Response {
    if let Err(refused) = checked(&signed, form) {
        return refused;
    }
    let request = pb::EnvironmentHistoryRequest {
        environment: name.clone(),
        pipeline: pipeline.clone(),
    };
    let result = web
        .act(
            &signed,
            "UnfreezeEnvironment",
            peer,
            request,
            |api, request| async move { api.unfreeze_environment(request).await },
        )
        .await;
    done(&signed, result, &environment_page(&pipeline, &name))
}

pub(crate) fn environment_page(pipeline: &str, name: &str) -> String {
    format!(
        "/environments/{}/{}",
        url_encode(pipeline),
        url_encode(name)
    )
}
