//! The tower layer in front of every gRPC service: authenticate, check the
//! method's rule, pass the principal on, and audit state-changing calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::tokens::Tokens;
use super::{AuditTarget, Principal, rule};
use crate::clock::{Clock, SystemClock};
use crate::commit::Writer;
use crate::error::ApiError;
use crate::store::{AuditRecord, Batch, Op, Store};

/// Shared by every connection's copy of the layer.
pub(crate) struct Auth {
    pub(crate) tokens: Arc<Tokens>,
    audit: AuditLog,
}

impl Auth {
    pub(crate) fn new(
        tokens: Arc<Tokens>,
        store: &dyn Store,
        writer: Writer,
    ) -> Result<Self, ApiError> {
        Ok(Self {
            tokens,
            audit: AuditLog::open(store, writer)?,
        })
    }

    /// Records one call (the layer's, and the webhook's, which does not
    /// come through gRPC); durable when this returns.
    pub(crate) async fn audit(
        &self,
        principal: String,
        method: String,
        target: String,
        (outcome, message): (String, String),
        peer: String,
    ) {
        self.audit
            .record(AuditRecord {
                id: 0,
                at_ms: SystemClock.now_ms(),
                principal,
                method,
                target,
                outcome,
                message,
                peer,
            })
            .await;
    }

    /// The principal behind the `authorization` header, if it may call
    /// `method`; a refusal names the caller when its token was valid.
    fn authorize(
        &self,
        method: &str,
        authorization: Option<&http::HeaderValue>,
    ) -> Result<Principal, (Option<String>, Status)> {
        let anonymous_refusal = |status| (None, status);
        let Some(rule) = rule(method) else {
            return Err(anonymous_refusal(Status::unimplemented(format!(
                "unknown method {method}"
            ))));
        };
        let token = authorization
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        let principal = match token {
            Some(token) => self
                .tokens
                .authenticate(token)
                .map_err(|error| anonymous_refusal(Status::from(error)))?,
            None if rule.public => return Ok(anonymous()),
            None => {
                return Err(anonymous_refusal(Status::unauthenticated(
                    "this call needs a token: pass --token or set KILN_TOKEN (header `authorization: Bearer <token>`)",
                )));
            }
        };
        if !rule.allows(principal.role) {
            let status = refusal(&principal, method);
            return Err((Some(principal.name), status));
        }
        Ok(principal)
    }
}

/// The answer to a principal whose role may not call `method`; the web
/// dashboard gives the same one.
pub(crate) fn refusal(principal: &Principal, method: &str) -> Status {
    Status::permission_denied(format!(
        "token `{}` ({}) may not call {method}",
        principal.name,
        role_name(principal.role)
    ))
}

/// The audit outcome of a call answered without going through HTTP (the
/// web dashboard's actions): `OK`, or the status's code name and message.
pub(crate) fn outcome_of_status(status: Option<&Status>) -> (String, String) {
    match status {
        None => (code_name(tonic::Code::Ok), String::new()),
        Some(status) => (code_name(status.code()), status.message().to_owned()),
    }
}

fn anonymous() -> Principal {
    Principal {
        name: "anonymous".into(),
        role: super::Role::Viewer,
        pipeline: None,
    }
}

pub(crate) fn role_name(role: super::Role) -> &'static str {
    match role {
        super::Role::Viewer => "viewer",
        super::Role::Operator => "operator",
        super::Role::Admin => "admin",
        super::Role::Agent => "agent",
        super::Role::Pipeline => "pipeline",
    }
}

/// Appends audit records; each is durable before the call's reply leaves.
/// Records go through the group committer, so they share the flush of the
/// transitions they describe instead of paying for their own.
struct AuditLog {
    /// The group committer, closed at shutdown (see `commit::Writer`).
    writer: Writer,
    next_id: AtomicU64,
}

impl AuditLog {
    fn open(store: &dyn Store, writer: Writer) -> Result<Self, ApiError> {
        let next_id = AtomicU64::new(store.last_audit_id()? + 1);
        Ok(Self { writer, next_id })
    }

    async fn record(&self, mut record: AuditRecord) {
        record.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let method = record.method.clone();
        let mut batch = Batch::default();
        batch.push(Op::Audit(record));
        match self.writer.write(batch).await {
            Ok(()) => {}
            Err(ApiError::ShuttingDown) => {
                tracing::warn!(%method, "stopping: an audit record was not stored");
            }
            // The store failed and the coordinator is stopping.
            Err(error) => tracing::error!(%method, %error, "an audit record could not be stored"),
        }
    }
}

/// Wraps the gRPC router; see the module docs.
#[derive(Clone)]
pub(crate) struct AuthLayer(pub(crate) Arc<Auth>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            auth: self.0.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub(crate) struct AuthService<S> {
    auth: Arc<Auth>,
    inner: S,
}

impl<S> tower::Service<http::Request<Body>> for AuthService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone may not be ready; call the one that was polled.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        let method = request.uri().path().to_owned();
        let peer = peer_of(&request);
        let decision = auth.authorize(&method, request.headers().get(http::header::AUTHORIZATION));
        let audited = rule(&method).is_some_and(|rule| rule.audited);
        Box::pin(async move {
            let (principal, response) = match decision {
                Ok(principal) => {
                    request.extensions_mut().insert(principal.clone());
                    (principal.name, inner.call(request).await?)
                }
                // Callers without a valid token are logged, not stored:
                // anyone who reaches the port could otherwise grow the
                // audit log and keep the disk busy.
                Err((None, status)) => {
                    tracing::warn!(%method, %peer, reason = %status.message(), "refused a call without a valid token");
                    return Ok(status.into_http());
                }
                Err((Some(name), status)) => (name, status.into_http()),
            };
            if audited {
                let target = response
                    .extensions()
                    .get::<AuditTarget>()
                    .map(|target| target.0.clone())
                    .unwrap_or_default();
                auth.audit(principal, method, target, outcome_of(&response), peer)
                    .await;
            }
            Ok(response)
        })
    }
}

/// The status of a response whose headers are in: errors of unary calls
/// come as trailers-only responses, so their status is in the headers;
/// anything else started fine.
fn outcome_of(response: &http::Response<Body>) -> (String, String) {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
    };
    let code = header("grpc-status")
        .and_then(|code| code.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32);
    let message = header("grpc-message")
        .map(percent_decode)
        .unwrap_or_default();
    (code_name(code), message)
}

/// The canonical name of a gRPC status code, as the protocol spells it
/// (`OK`, `PERMISSION_DENIED`): the audit log promises these.
fn code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// grpc-message is percent-encoded.
fn percent_decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = raw
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn peer_of(request: &http::Request<Body>) -> String {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
        .map(|addr| addr.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_use_the_canonical_code_names() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            code_name(tonic::Code::PermissionDenied),
            "PERMISSION_DENIED"
        );
        assert_eq!(code_name(tonic::Code::Unauthenticated), "UNAUTHENTICATED");
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
        let response = Status::permission_denied("token `x` (viewer) may not call y").into_http();
        let (outcome, message) = outcome_of(&response);
        assert_eq!(outcome, "PERMISSION_DENIED");
        assert_eq!(message, "token `x` (viewer) may not call y");
    }
}
