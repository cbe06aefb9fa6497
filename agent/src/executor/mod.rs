//! The executors and the one place that picks one: [`build`] turns the
//! agent's config into an `Arc<dyn Executor>`. What an executor is given and
//! gives back is the [`contract`]; [`process`] runs the commands as host
//! processes, [`docker`] in a container per attempt. Executors import the
//! contract, `logs` and the crate's leaves, never each other or anything
//! above them.

use std::sync::Arc;
use std::time::Duration;

use self::contract::Executor;
use crate::config::{Config, ExecutorKind};
use crate::error::Error;

pub(crate) mod contract;
pub(crate) mod docker;
pub(crate) mod process;

/// The executor `config` asks for, ready to run stages. For docker that means
/// the engine answered and what a crash of this agent left there is gone.
pub(crate) async fn build(config: &Config) -> Result<Arc<dyn Executor>, Error> {
    Ok(match &config.executor {
        ExecutorKind::Process => Arc::new(process::ProcessExecutor::new(KILL_GRACE)),
        ExecutorKind::Docker(docker) => {
            Arc::new(docker::DockerExecutor::connect(&config.name, docker, KILL_GRACE).await?)
        }
    })
}

/// Between SIGTERM and SIGKILL: time for the commands to clean up.
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(5);
