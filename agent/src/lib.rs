//! Kiln's agent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Which executor runs stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecutorKind {
    /// Host processes under `sh -e`.
    Process,
}

/// Everything the agent needs to start; the binary builds it from flags.
pub struct Config {
    /// e.g. `http://127.0.0.1:7700`.
    pub coordinator: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: u32,
    /// Workspaces and the clone cache live here.
    pub work_dir: PathBuf,
    pub executor: ExecutorKind,
    /// After shutdown is requested, running stages get this long to finish
    /// before they are handed back.
    pub drain_timeout: Duration,
}

/// Runs the agent until `shutdown` completes and its stages are finished or
/// handed back.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let _ = (config, shutdown);
    todo!()
}
