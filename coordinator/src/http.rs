//! The HTTP listener: `/healthz` for load balancers, `/metrics` for
//! Prometheus, `/hooks/{pipeline}` for git servers' push webhooks, and the
//! web dashboard (`web`) on every other path. Over TLS when the
//! coordinator has a certificate (no client certificates here: webhooks
//! come from git servers and people use browsers).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::connect_info::Connected;
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::tls_listener::TlsListener;
use crate::triggers::webhook::{self, Hooks};
use crate::web::{self, Web};

/// The remote address of an HTTP connection, plain or TLS.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer(pub(crate) SocketAddr);

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    metrics: Arc<Metrics>,
    hooks: Hooks,
    web: Arc<Web>,
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
        )
        .merge(web::router(web))
        // The dashboard's audit records name the peer, as gRPC's do.
        .into_make_service_with_connect_info::<Peer>();
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
