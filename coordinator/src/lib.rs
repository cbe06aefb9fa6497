//! Kiln's coordinator: stores pipelines, runs and logs, and dispatches each
//! ready stage to an agent.
//!
//! # Layout
//! - [`run`] starts everything in a fixed order and stops it in reverse.
//! - `store`: the [`Store`](store) trait and its sled implementation; the
//!   only module that touches sled.
//! - `commit`: group commit — many transitions, one flush, then the acks;
//!   the only writer of the store once it is open.
//! - `engine`: the single owner of live state (runs, DAG progress, agents,
//!   leases, fencing, dispatch, logs), driven by events.
//! - `agent_service`, `control`: the tonic services, translating requests
//!   into engine events.
//! - `blobs`, `artifact_service`: the content-addressed blob store (files
//!   in the data dir) and its chunked upload/download service.
//! - `http`: `/healthz`, `/metrics`, webhooks and the dashboard;
//!   `tls_listener` serves them over TLS.
//! - `web`: the dashboard — server-rendered pages, live logs over
//!   Server-Sent Events, and buttons that call the control service.
//! - `views`: stored records as wire messages.

mod agent_service;
mod artifact_service;
mod auth;
pub mod backup;
mod blobs;
mod caches;
pub mod clock;
mod commit;
mod control;
mod delivery;
mod engine;

pub use engine::MAX_DELIVERY_KEYS;
mod error;
mod forge_status;
mod gc;
mod http;
mod metrics;
mod models;
mod pipelines;
mod provenance;
mod read;
mod repos;
mod secrets;
mod state;
mod store;
mod tls_listener;
mod triggers;
mod views;
mod web;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::v1::admin_service_server::AdminServiceServer;
use kiln_proto::v1::agent_service_server::AgentServiceServer;
use kiln_proto::v1::artifact_service_server::ArtifactServiceServer;
use kiln_proto::v1::control_service_server::ControlServiceServer;
use tokio::sync::{mpsc, watch};

pub use error::ApiError;
pub use store::StoreError;

/// Everything the coordinator needs to start; the binary builds it from flags.
pub struct Config {
    /// sled database (and later artifact blobs) live here.
    pub data_dir: PathBuf,
    /// gRPC listener for agents and the CLI, already bound (tests bind port 0).
    pub grpc_listener: tokio::net::TcpListener,
    /// HTTP listener for /healthz and /metrics, if any.
    pub http_listener: Option<tokio::net::TcpListener>,
    /// An agent that has not been heard from for this long loses its stages.
    pub lease_ttl: Duration,
    /// How often agents are told to heartbeat.
    pub heartbeat_interval: Duration,
    /// Size limits and retention of artifacts.
    pub artifacts: ArtifactPolicy,
    /// Where alerts go.
    pub alerts: AlertTargets,
    /// Key that seals secrets at rest; `None` = `secrets.key` in the data
    /// dir. Keep it off the database's volume where that matters.
    pub secret_key_file: Option<PathBuf>,
    /// How many agents may be connected with one agent token at once.
    pub max_agents_per_token: usize,
    /// Webhook delivery keys remembered for idempotency; past it the
    /// oldest runs' keys are forgotten ([`MAX_DELIVERY_KEYS`]).
    pub max_delivery_keys: usize,
    /// The dashboard's address as people reach it (`https://kiln.example.org`),
    /// for the links Kiln sends out (commit statuses); `None`: the HTTP
    /// listener's own address.
    pub public_url: Option<String>,
    /// TLS for both listeners (client certificates only on gRPC); `None` =
    /// plain text, which the binary allows only on loopback or with
    /// `--insecure`.
    pub tls: Option<kiln_common::tls::ServerTlsFiles>,
}

/// Alert destinations; none configured = alerts are only logged.
#[derive(Clone, Debug, Default)]
pub struct AlertTargets {
    /// Prometheus Alertmanager root URL (alerts go to `/api/v2/alerts`).
    pub alertmanager_url: Option<String>,
    /// Generic webhook receiving JSON.
    pub webhook_url: Option<String>,
    /// HMAC-SHA256 key for the webhook's `X-Kiln-Signature` header.
    pub webhook_secret: Option<String>,
}

/// Size limits and retention of stored artifacts.
#[derive(Clone, Copy, Debug)]
pub struct ArtifactPolicy {
    /// Largest single blob accepted.
    pub max_blob_bytes: u64,
    /// Total outputs one run may store.
    pub max_run_bytes: u64,
    /// `kiln gc` keeps outputs of runs finished within this many days.
    pub keep_days: u32,
    /// A shared cache entry is used, and its archives kept, this many days
    /// after it was saved.
    pub cache_keep_days: u32,
    /// The coordinator runs a garbage collection pass (retention, blobs,
    /// caches: what `kiln gc` does) this often; `None`: only `kiln gc`.
    pub gc_every: Option<Duration>,
}

impl Default for ArtifactPolicy {
    fn default() -> Self {
        Self {
            max_blob_bytes: 64 << 30,
            max_run_bytes: 256 << 30,
            keep_days: 30,
            cache_keep_days: 7,
            gc_every: Some(Duration::from_secs(3600)),
        }
    }
}

/// Largest control or agent message accepted: a pipeline file is at most
/// 1 MiB and a log batch a few hundred KiB, so 4 MiB leaves room without
/// letting one message take much memory.
const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// How long open streams get to end after shutdown begins.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Runs the coordinator until `shutdown` completes.
///
/// Start-up order: store, commit thread, tokens and secrets, recovery,
/// engine, gRPC, HTTP. Shutdown runs the other way round; everything
/// acknowledged before it is on disk when this returns.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // First, so a wrong certificate path is reported before anything starts.
    let tls = match &config.tls {
        Some(files) => Some(kiln_common::tls::ServerTls::load(files)?),
        None => None,
    };
    std::fs::create_dir_all(&config.data_dir)?;
    let store: Arc<dyn store::Store> = Arc::new(store::SledStore::open(&config.data_dir)?);
    let blobs = Arc::new(blobs::BlobStore::open(
        &config.data_dir,
        config.artifacts.max_blob_bytes,
    )?);
    let metrics = Arc::new(metrics::Metrics::default());
    // The only writer from here on: even the bootstrap token goes through it.
    let (failed_tx, mut failed_rx) = mpsc::unbounded_channel::<String>();
    let (committer, commit_thread) = commit::Committer::start(store.clone(), move |error| {
        let _ = failed_tx.send(error);
    });
    // Everything but the engine writes through this one handle, closed
    // once at shutdown.
    let writer = commit::Writer::new(committer.clone());
    tracing::info!(data_dir = %config.data_dir.display(), "store opened; commit thread started");
    let tokens = Arc::new(auth::tokens::Tokens::load(&*store, writer.clone())?);
    if let Some(path) = tokens.bootstrap(&config.data_dir).await? {
        tracing::info!(path = %path.display(), "no tokens yet: wrote the bootstrap admin token");
    }
    let secret_key_file = config
        .secret_key_file
        .clone()
        .unwrap_or_else(|| config.data_dir.join("secrets.key"));
    let secrets = Arc::new(secrets::Secrets::load(
        store.clone(),
        writer.clone(),
        &secret_key_file,
    )?);
    let engine_config = engine::EngineConfig {
        lease_ttl: config.lease_ttl,
        heartbeat_interval: config.heartbeat_interval,
        max_run_artifact_bytes: config.artifacts.max_run_bytes,
        max_delivery_keys: config.max_delivery_keys,
    };
    let mut engine = engine::Engine::recover(
        store.clone(),
        blobs.clone(),
        Arc::new(clock::SystemClock),
        engine_config,
        metrics.clone(),
    )?;
    tracing::info!("state recovered");
    engine.with_secrets(secrets.clone());
    let provenance_key = Arc::new(provenance::ProvenanceKey::open(&config.data_dir)?);
    let (signer_tx, signer_rx) = mpsc::unbounded_channel();
    engine.sign_releases_with(signer_tx);

    let (stop_tx, stop_rx) = watch::channel(false);
    let auth = Arc::new(auth::layer::Auth::new(
        tokens.clone(),
        &*store,
        writer.clone(),
    )?);
    let (events_tx, events_rx) = mpsc::channel(16 * 1024);
    let generator = format!("kiln-coordinator://{}", config.grpc_listener.local_addr()?);
    let mut alert_config = delivery::alerts::AlertConfig::new(generator);
    alert_config.alertmanager_url = config.alerts.alertmanager_url.clone();
    alert_config.webhook_url = config.alerts.webhook_url.clone();
    alert_config.webhook_secret = config.alerts.webhook_secret.clone();
    let (alerts, alerter) = delivery::alerts::start(alert_config, metrics.clone(), stop_rx.clone());
    let parsed = engine.parsed_pipelines();
    let starter = triggers::Starter {
        events: events_tx.clone(),
        repos: Arc::new(repos::Repos::new(&config.data_dir)),
        parsed: parsed.clone(),
        store: store.clone(),
    };
    let runtime = engine::DeliveryRuntime {
        http: delivery::http_client(),
        alerts,
        events: events_tx.clone(),
        starter: starter.clone(),
    };
    let view = engine.durable_view();
    let signer = tokio::spawn(provenance::run_signer(
        provenance::Signer {
            store: store.clone(),
            writer: writer.clone(),
            blobs: blobs.clone(),
            key: provenance_key.clone(),
            builder_id: builder_id(),
            parsed: parsed.clone(),
        },
        signer_rx,
        stop_rx.clone(),
    ));
    let compactor = {
        let clock = clock::SystemClock;
        tokio::spawn(delivery::history::run_compactor(
            store.clone(),
            writer.clone(),
            move || clock::Clock::now_ms(&clock),
            stop_rx.clone(),
        ))
    };
    let watcher = tokio::spawn(triggers::run_watcher(
        triggers::Watcher {
            store: store.clone(),
            blobs: blobs.clone(),
            clock: Arc::new(clock::SystemClock),
            view: view.clone(),
            parsed: parsed.clone(),
            repos: starter.repos.clone(),
            writer: writer.clone(),
        },
        events_tx.clone(),
        stop_rx.clone(),
    ));
    let caches = caches::Caches::new(
        store.clone(),
        writer.clone(),
        blobs.clone(),
        config.artifacts.cache_keep_days,
    );
    let status_reporter = {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let dashboard = match (&config.public_url, &config.http_listener) {
            (Some(url), _) => url.trim_end_matches('/').to_owned(),
            (None, Some(listener)) => format!("{scheme}://{}", listener.local_addr()?),
            (None, None) => String::new(),
        };
        tokio::spawn(forge_status::run_reporter(
            forge_status::Reporter {
                store: store.clone(),
                writer: writer.clone(),
                secrets: secrets.clone(),
                http: delivery::http_client(),
                dashboard,
                metrics: metrics.clone(),
            },
            stop_rx.clone(),
        ))
    };
    let reader = read::Reader::new(store.clone(), view.clone(), parsed.clone());
    let engine_task = tokio::spawn(engine::run_engine(
        engine,
        events_rx,
        committer,
        stop_rx.clone(),
        runtime,
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentServiceServer<agent_service::AgentApi>>()
        .await;
    health_reporter
        .set_serving::<ControlServiceServer<control::ControlApi>>()
        .await;
    health_reporter
        .set_serving::<ArtifactServiceServer<artifact_service::ArtifactApi>>()
        .await;
    health_reporter
        .set_serving::<AdminServiceServer<backup::AdminApi>>()
        .await;
    // Both reflection versions: older grpcurl builds only speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(kiln_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    // One control service for the CLI (gRPC) and the dashboard's buttons,
    // so both follow the same rules.
    let collector = gc::Collector {
        reader: reader.clone(),
        blobs: blobs.clone(),
        writer: writer.clone(),
        caches: caches.clone(),
        keep_days: config.artifacts.keep_days,
    };
    let periodic_gc = config
        .artifacts
        .gc_every
        .map(|every| tokio::spawn(gc::run_periodic(collector.clone(), every, stop_rx.clone())));
    let control = Arc::new(control::ControlApi::new(
        starter.clone(),
        reader.clone(),
        blobs.clone(),
        tokens,
        secrets.clone(),
        provenance_key.clone(),
        caches.clone(),
        collector,
    ));
    let web = Arc::new(web::Web::new(
        reader,
        events_tx.clone(),
        control.clone(),
        auth.clone(),
        blobs.clone(),
        provenance_key,
        tls.is_some(),
    ));
    let grpc_addr = config.grpc_listener.local_addr()?;
    let incoming =
        tonic::transport::server::TcpIncoming::from(config.grpc_listener).with_nodelay(Some(true));
    let mut grpc_stop = stop_rx.clone();
    let mut grpc_server = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        grpc_server = grpc_server.tls_config(tls.grpc_config())?;
    }
    let grpc = tokio::spawn(
        grpc_server
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .layer(auth::layer::AuthLayer(auth.clone()))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                AgentServiceServer::new(agent_service::AgentApi::new(
                    events_tx.clone(),
                    config.max_agents_per_token,
                ))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                ArtifactServiceServer::new(artifact_service::ArtifactApi::new(
                    blobs.clone(),
                    caches,
                ))
                .max_decoding_message_size(4 * blobs::CHUNK_BYTES),
            )
            .add_service(
                ControlServiceServer::from_arc(control.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(AdminServiceServer::new(backup::AdminApi::new(
                store.clone(),
                blobs.clone(),
                config.data_dir.clone(),
                secret_key_file.clone(),
            )))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = grpc_stop.changed().await;
            }),
    );
    tracing::info!(
        %grpc_addr,
        tls = tls.is_some(),
        client_certs = tls.as_ref().is_some_and(|tls| tls.requires_client_certs()),
        "gRPC listening"
    );
    let http_tls = match &tls {
        Some(tls) => Some(Arc::new(tls.http_config()?)),
        None => None,
    };
    let http = match config.http_listener {
        Some(listener) => {
            tracing::info!(http_addr = %listener.local_addr()?, tls = http_tls.is_some(), "HTTP listening");
            Some(tokio::spawn(http::serve(
                listener,
                http_tls,
                metrics,
                triggers::webhook::Hooks {
                    secrets: secrets.clone(),
                    starter: starter.clone(),
                    view,
                    auth: auth.clone(),
                },
                web,
                stop_rx.clone(),
            )))
        }
        None => None,
    };

    let failure = tokio::select! {
        () = shutdown => None,
        error = failed_rx.recv() => error,
    };
    tracing::info!("shutting down: engine, background tasks, listeners, then the commit thread");
    let _ = stop_tx.send(true);
    engine_task.await?;
    let _ = tokio::time::timeout(DRAIN_GRACE, alerter).await;
    let _ = tokio::time::timeout(DRAIN_GRACE, signer).await;
    let _ = tokio::time::timeout(DRAIN_GRACE, watcher).await;
    let _ = tokio::time::timeout(DRAIN_GRACE, compactor).await;
    let _ = tokio::time::timeout(DRAIN_GRACE, status_reporter).await;
    if let Some(periodic_gc) = periodic_gc {
        let _ = tokio::time::timeout(DRAIN_GRACE, periodic_gc).await;
    }
    // Streams still open after the grace are cut.
    let mut grpc = grpc;
    if tokio::time::timeout(DRAIN_GRACE, &mut grpc).await.is_err() {
        tracing::warn!("gRPC streams did not end within {DRAIN_GRACE:?}; closing them");
        grpc.abort();
        let _ = grpc.await;
    }
    if let Some(mut http) = http
        && tokio::time::timeout(DRAIN_GRACE, &mut http).await.is_err()
    {
        http.abort();
        let _ = http.await;
    }
    tracing::info!("listeners stopped");
    // The engine dropped its committer handle; this lets go of the one
    // tokens, secrets, audit records and the signer shared (connection
    // tasks may outlive the server and still hold them). Writes already
    // queued are committed; later ones fail as shutting down. The thread
    // exits once it has committed the last group.
    writer.close();
    tokio::task::spawn_blocking(move || commit_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the commit thread panicked"))?;
    store.flush()?;
    tracing::info!("coordinator stopped");
    match failure {
        Some(error) => Err(anyhow::anyhow!("stopped after a storage failure: {error}")),
        None => Ok(()),
    }
}

/// The SLSA builder id: this coordinator, by host name.
fn builder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("kiln-coordinator://{host}")
}
