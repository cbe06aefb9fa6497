//! The web dashboard, served on the HTTP listener next to `/metrics`.
//!
//! Pages are rendered on the server from askama templates
//! (`coordinator/templates/`, compiled in, like the stylesheet and the one
//! small script in `coordinator/static/`): every byte a page needs is in
//! the binary. Everything reads like the CLI does — runs, lists and logs
//! through the [`Reader`] at the durable watermark, live log lines from the
//! engine's bounded taps — and every action calls the same
//! `ControlService` handler a `kiln` command would, as the signed-in
//! principal, checked against the same rule table and written to the same
//! audit log.
//!
//! # Layout
//! - `session`: sign-in with a Kiln token, session cookies, CSRF tokens,
//!   and the [`session::Signed`] extractor every page takes.
//! - `pages`: the read-only pages; `live`: the raw log and its
//!   Server-Sent Events stream; `actions`: the POST forms.
//! - `dag`, `chart`: SVG drawn in Rust (a run's DAG, metrics over time);
//!   `ansi`: ANSI colours of log lines as HTML.
//! - `format`: small shared helpers for times, states and escaping.

mod actions;
mod ansi;
mod chart;
mod dag;
mod format;
mod live;
mod pages;
mod session;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::{get, post};
use tokio::sync::mpsc;

use crate::auth::layer::Auth;
use crate::blobs::BlobStore;
use crate::control::ControlApi;
use crate::engine::Event;
use crate::provenance::ProvenanceKey;
use crate::read::Reader;

/// What the dashboard's handlers share.
pub(crate) struct Web {
    /// Runs, lists and log pages at the durable watermark.
    reader: Reader,
    /// For log followers (the engine hands out bounded taps).
    events: mpsc::Sender<Event>,
    /// The gRPC handlers, called directly so actions follow the CLI's rules.
    control: Arc<ControlApi>,
    /// Token checks and the audit log.
    auth: Arc<Auth>,
    /// Artifact downloads.
    blobs: Arc<BlobStore>,
    /// Release pages say whether a provenance signature verifies.
    provenance_key: Arc<ProvenanceKey>,
    sessions: session::Sessions,
    /// Cookies get `Secure` when the listener speaks TLS.
    secure_cookies: bool,
}

impl Web {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        reader: Reader,
        events: mpsc::Sender<Event>,
        control: Arc<ControlApi>,
        auth: Arc<Auth>,
        blobs: Arc<BlobStore>,
        provenance_key: Arc<ProvenanceKey>,
        secure_cookies: bool,
    ) -> Self {
        Self {
            reader,
            events,
            control,
            auth,
            blobs,
            provenance_key,
            sessions: session::Sessions::default(),
            secure_cookies,
        }
    }
}

const STYLE_CSS: &str = include_str!("../../static/style.css");
const LIVE_JS: &str = include_str!("../../static/live.js");

/// The dashboard's routes; the paths are part of Kiln's interface.
pub(crate) fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(pages::pipelines))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/runs", get(pages::runs))
        .route("/runs/{run}", get(pages::run))
        .route("/runs/{run}/cancel", post(actions::cancel))
        .route("/runs/{run}/stages/{stage}", get(pages::stage))
        .route("/runs/{run}/stages/{stage}/log", get(live::log))
        .route("/runs/{run}/stages/{stage}/events", get(live::events))
        .route("/runs/{run}/stages/{stage}/retry", post(actions::retry))
        .route("/runs/{run}/stages/{stage}/approve", post(actions::approve))
        .route("/runs/{run}/stages/{stage}/reject", post(actions::reject))
        .route("/blobs/{digest}", get(live::blob))
        .route("/environments", get(pages::environments))
        .route("/environments/{pipeline}/{name}", get(pages::environment))
        .route(
            "/environments/{pipeline}/{name}/rollback",
            post(actions::rollback),
        )
        .route(
            "/environments/{pipeline}/{name}/unfreeze",
            post(actions::unfreeze),
        )
        .route("/releases/{release}", get(pages::release))
        .route("/models", get(pages::models_list))
        .route("/models/{model}", get(pages::model))
        .route("/agents", get(pages::agents))
        .route(
            "/static/style.css",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
                    STYLE_CSS,
                )
            }),
        )
        .route(
            "/static/live.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    LIVE_JS,
                )
            }),
        )
        .with_state(web)
        .layer(axum::middleware::map_response(security_headers))
}

/// Every dashboard response: scripts, styles and frames from this origin
/// only (the pages inline nothing), no content sniffing, no referrer
/// leaving the site.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}
