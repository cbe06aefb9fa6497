//! A stage's `services:`: a network of the attempt's own, each service's
//! container on it under its name, waited for until its `health` command
//! succeeds; all of it removed when the attempt ends.
//!
//! The network and the service containers carry the stage container's
//! labels (`kiln.agent`, `kiln.run`, `kiln.stage`, `kiln.attempt`, plus
//! `kiln.service`), so the start-up sweep of an agent that was killed finds
//! them like it finds stage containers. The network is `internal` (no way
//! out) unless the stage asks for `network: bridge`.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerState, EndpointSettings, HealthConfig, HealthStatusEnum,
    HostConfig, NetworkCreateRequest, NetworkingConfig,
};
use bollard::query_parameters::{CreateContainerOptionsBuilder, LogsOptionsBuilder};
use futures::StreamExt;
use kiln_common::duration;
use kiln_proto::v1::StageService;
use tokio::time::Instant;
use tracing::warn;

use super::config::{DEFAULT_MEMORY_BYTES, DEFAULT_PIDS};
use super::container::remove;
use super::image;
use crate::error::Error;
use crate::executor::contract::{Job, StopSignal};
use crate::logs::LogSink;

/// How often a starting service is looked at, and how often docker runs its
/// health command.
const HEALTH_EVERY: Duration = Duration::from_millis(500);
/// One run of a health command may take this long.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of a failed service's own output shown in the stage's log.
const OUTPUT_TAIL: &str = "20";
/// Tries at removing the network while the stage's container, removed by
/// another task, may still be attached to it.
const NETWORK_REMOVE_TRIES: u32 = 20;

/// The attempt's network and service containers, once created. Removed by
/// [`Services::remove`], or by a background task when dropped before that.
pub(super) struct Services {
    docker: Docker,
    network: String,
    /// Container names, in start order.
    containers: Vec<String>,
    removed: bool,
}

/// How starting the services ended when it did not end with all of them
/// ready: a message for the stage (`Failed`), or the attempt was stopped.
pub(super) enum NotReady {
    Failed(String),
    Stopped(crate::executor::contract::Stop),
}

impl Services {
    /// Creates the network `network` and starts every service of `job` on
    /// it, then waits until each is ready (its health command succeeds, or
    /// it runs when it has none). `Ok(Err(..))` says why the stage cannot
    /// run; `Err` is an engine failure.
    pub(super) async fn start(
        docker: &Docker,
        stage_container: &str,
        network: &str,
        labels: &HashMap<String, String>,
        job: &Job,
        log: &LogSink,
        stop: &mut StopSignal,
    ) -> Result<(Self, Result<(), NotReady>), Error> {
        let mut services = Services {
            docker: docker.clone(),
            network: network.to_owned(),
            containers: Vec::new(),
            removed: false,
        };
        docker
            .create_network(NetworkCreateRequest {
                name: network.to_owned(),
                driver: Some("bridge".into()),
                internal: Some(job.docker.network != "bridge"),
                labels: Some(labels.clone()),
                ..Default::default()
            })
            .await
            .map_err(Error::docker("network create"))?;
        for service in &job.services {
            let found = tokio::select! {
                found = image::find(docker, &service.image, &job.docker.pull, log) => found?,
                stopped = stop.stopped() => return Ok((services, Err(NotReady::Stopped(stopped)))),
            };
            let image = match found {
                Ok(image) => image,
                Err(missing) => {
                    let message = format!("service `{}`: {missing}", service.name);
                    return Ok((services, Err(NotReady::Failed(message))));
                }
            };
            let name = format!("{stage_container}-svc-{}", service.name);
            let body = service_body(service, &image.id, network, labels);
            let options = CreateContainerOptionsBuilder::default().name(&name).build();
            let created = match docker
                .create_container(Some(options.clone()), body.clone())
                .await
            {
                Err(BollardError::DockerResponseServerError {
                    status_code: 409, ..
                }) => {
                    // A leftover of a crash the start-up sweep did not see.
                    remove(docker, &name)
                        .await
                        .map_err(Error::docker("remove of a leftover service"))?;
                    docker.create_container(Some(options), body).await
                }
                created => created,
            };
            created.map_err(Error::docker("service create"))?;
            services.containers.push(name.clone());
            docker
                .start_container(&name, None)
                .await
                .map_err(Error::docker("service start"))?;
        }
        for (service, name) in job.services.iter().zip(services.containers.clone()) {
            let ready = tokio::select! {
                ready = services.wait_ready(service, &name, log) => ready?,
                stopped = stop.stopped() => Err(NotReady::Stopped(stopped)),
            };
            if let Err(not_ready) = ready {
                return Ok((services, Err(not_ready)));
            }
        }
        Ok((services, Ok(())))
    }

    /// Polls the service until it is ready, it stops, or its
    /// `health_timeout` passes; the message names the service and what it
    /// last said.
    async fn wait_ready(
        &self,
        service: &StageService,
        name: &str,
        log: &LogSink,
    ) -> Result<Result<(), NotReady>, Error> {
        let started = Instant::now();
        let limit = Duration::from_millis(service.health_timeout_ms.max(1));
        loop {
            let state = self
                .docker
                .inspect_container(name, None)
                .await
                .map_err(Error::docker("service inspect"))?
                .state
                .unwrap_or_default();
            if state.running != Some(true) {
                let code = state.exit_code.unwrap_or(-1);
                let output = self.output_tail(name).await;
                return Ok(Err(NotReady::Failed(format!(
                    "service `{}` ({}) exited with code {code} before it was ready{output}",
                    service.name, service.image
                ))));
            }
            let healthy = service.health.is_empty()
                || health_status(&state) == Some(HealthStatusEnum::HEALTHY);
            if healthy {
                log.system(format!(
                    "service `{}` ({}) is ready after {} ms",
                    service.name,
                    service.image,
                    started.elapsed().as_millis()
                ))
                .await;
                return Ok(Ok(()));
            }
            if started.elapsed() >= limit {
                let said = last_health_output(&state)
                    .map(|output| format!("; its last health check said: {output}"))
                    .unwrap_or_else(|| "; its health check has not finished once".into());
                return Ok(Err(NotReady::Failed(format!(
                    "service `{}` ({}) was not healthy within {} (`health: {}`){said}; fix the \
                     command or raise `health_timeout`",
                    service.name,
                    service.image,
                    duration::format(limit),
                    service.health
                ))));
            }
            tokio::time::sleep(HEALTH_EVERY).await;
        }
    }

    /// The last lines the service printed, for a message; "" when none.
    async fn output_tail(&self, name: &str) -> String {
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .tail(OUTPUT_TAIL)
            .build();
        let mut logs = self.docker.logs(name, Some(options));
        let mut text = String::new();
        while let Some(Ok(chunk)) = logs.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
        }
        let text = crate::error::one_line(&text);
        if text.is_empty() {
            String::new()
        } else {
            format!("; its last output: {text}")
        }
    }

    /// Removes the services, then their network. Failures are only logged:
    /// the agent's next start removes what is left.
    pub(super) async fn remove(mut self) {
        self.removed = true;
        remove_all(
            &self.docker,
            &std::mem::take(&mut self.containers),
            &self.network,
        )
        .await;
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let docker = self.docker.clone();
        let containers = std::mem::take(&mut self.containers);
        let network = std::mem::take(&mut self.network);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { remove_all(&docker, &containers, &network).await });
        }
    }
}

async fn remove_all(docker: &Docker, containers: &[String], network: &str) {
    for name in containers {
        if let Err(err) = remove(docker, name).await {
            warn!(container = %name, %err, "cannot remove a stage's service");
        }
    }
    let mut tries = 0;
    loop {
        match remove_network(docker, network).await {
            Ok(()) => return,
            // Still in use: the stage's container is being removed too.
            Err(BollardError::DockerResponseServerError {
                status_code: 403 | 409 | 500,
                ..
            }) if tries < NETWORK_REMOVE_TRIES => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(err) => {
                warn!(%network, %err, "cannot remove a stage's network");
                return;
            }
        }
    }
}

/// Removes a network; one already gone is fine.
pub(super) async fn remove_network(docker: &Docker, network: &str) -> Result<(), BollardError> {
    match docker.remove_network(network).await {
        Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        removed => removed,
    }
}

fn health_status(state: &ContainerState) -> Option<HealthStatusEnum> {
    state.health.as_ref().and_then(|health| health.status)
}

fn last_health_output(state: &ContainerState) -> Option<String> {
    let last = state.health.as_ref()?.log.as_ref()?.last()?;
    let output = crate::error::one_line(last.output.as_deref().unwrap_or_default());
    let code = last.exit_code.unwrap_or(-1);
    Some(if output.is_empty() {
        format!("exit code {code}, no output")
    } else {
        format!("exit code {code}: {output}")
    })
}

/// The service's container: its image's user and entrypoint, the stage's
/// default limits, no privileges, on `network` under its name.
fn service_body(
    service: &StageService,
    image: &str,
    network: &str,
    labels: &HashMap<String, String>,
) -> ContainerCreateBody {
    let mut labels = labels.clone();
    labels.insert("kiln.service".into(), service.name.clone());
    let nanos = |every: Duration| i64::try_from(every.as_nanos()).unwrap_or(i64::MAX);
    let healthcheck = (!service.health.is_empty()).then(|| HealthConfig {
        test: Some(vec!["CMD-SHELL".into(), service.health.clone()]),
        interval: Some(nanos(HEALTH_EVERY)),
        timeout: Some(nanos(HEALTH_CHECK_TIMEOUT)),
        // Kiln judges by its own deadline; docker's "unhealthy" is not final.
        retries: Some(i64::from(i32::MAX)),
        start_period: Some(0),
        start_interval: None,
    });
    let memory = i64::try_from(DEFAULT_MEMORY_BYTES).unwrap_or(i64::MAX);
    ContainerCreateBody {
        image: Some(image.to_owned()),
        cmd: (!service.command.is_empty()).then(|| service.command.clone()),
        env: Some(
            service
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
        ),
        labels: Some(labels),
        healthcheck,
        host_config: Some(HostConfig {
            network_mode: Some(network.to_owned()),
            memory: Some(memory),
            memory_swap: Some(memory),
            pids_limit: Some(DEFAULT_PIDS),
            privileged: Some(false),
            security_opt: Some(vec!["no-new-privileges".into()]),
            init: Some(true),
            ..Default::default()
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                network.to_owned(),
                EndpointSettings {
                    aliases: Some(vec![service.name.clone()]),
                    ..Default::default()
                },
            )])),
        }),
        ..Default::default()
    }
}
