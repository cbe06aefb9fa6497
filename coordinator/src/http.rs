//! The HTTP listener: `/healthz` for load balancers, `/metrics` for
//! Prometheus and `/hooks/{pipeline}` for git servers' push webhooks.

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::triggers::webhook::{self, Hooks};

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    hooks: Hooks,
    mut stop: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let body = metrics.render();
                async move { ([("content-type", "text/plain; version=0.0.4")], body) }
            }),
        )
        .route(
            "/hooks/{pipeline}",
            post(webhook::push)
                .with_state(hooks)
                .layer(DefaultBodyLimit::max(webhook::MAX_BODY_BYTES)),
        );
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "HTTP listener failed");
    }
}
