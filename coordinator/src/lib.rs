//! Kiln's coordinator.
//!
//! # Layout
//! (filled in as the modules land)

use std::path::PathBuf;
use std::time::Duration;

/// Everything the coordinator needs to start; the binary builds it from flags.
pub struct Config {
    /// sled database and (later) artifact blobs live here.
    pub data_dir: PathBuf,
    /// gRPC listener for agents and the CLI, already bound (tests bind port 0).
    pub grpc_listener: tokio::net::TcpListener,
    /// HTTP listener for /healthz and /metrics, if any.
    pub http_listener: Option<tokio::net::TcpListener>,
    /// An agent that has not been heard from for this long loses its stages.
    pub lease_ttl: Duration,
    /// How often agents are told to heartbeat.
    pub heartbeat_interval: Duration,
}

/// Runs the coordinator until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let _ = (config, shutdown);
    todo!()
}
