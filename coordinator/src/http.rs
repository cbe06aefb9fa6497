//! The HTTP listener: `/healthz` for load balancers, `/metrics` for
//! Prometheus and `/hooks/{pipeline}` for git servers' push webhooks. Over
//! TLS when the coordinator has a certificate (no client certificates
//! here: webhooks come from git servers).

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::triggers::webhook::{self, Hooks};

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    metrics: Arc<Metrics>,
    hooks: Hooks,
    stop: watch::Receiver<bool>,
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
    let stopped = {
        let mut stop = stop.clone();
        async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        }
    };
    let result = match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
        }
        Some(config) => match crate::tls_listener::start(listener, config, stop) {
            Ok((listener, acceptor)) => {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await;
                let _ = acceptor.await;
                served
            }
            Err(error) => Err(error),
        },
    };
    if let Err(error) = result {
        tracing::error!(%error, "HTTP listener failed");
    }
}
