//! Runs a stage's commands in a container of their own on a Docker engine,
//! through the engine's API (bollard), never the `docker` CLI.
//!
//! One attempt is one container: the image is found (or pulled), the
//! container created with the workspace bind-mounted at `/workspace`, limits,
//! `no-new-privileges` and the labels `kiln.agent`, `kiln.run`, `kiln.stage`,
//! `kiln.attempt`, attached to before it starts (so no output is missed), and
//! waited for. A timeout or stop is `docker stop` with the grace period
//! (SIGTERM, SIGKILL after it); the container runs under docker's init, so
//! the shell, which is not PID 1, dies of the SIGTERM. Whatever happens, the
//! container is removed before the attempt ends (and by a background task if
//! the attempt's future is dropped); containers a crashed agent of the same
//! name left are removed when the agent starts. A stage with `services:`
//! first gets a network of its own and its services, ready (`services`);
//! they go after its container, and a crashed agent's with it.
//!
//! # Decisions
//!
//! - A missing image that cannot be pulled fails the stage (`FAILED`, with
//!   one line naming the image and how to provide it) rather than being an
//!   infrastructure error: retrying on the same farm would not make it
//!   appear, and the fix is the operator's (`docker load`) or the
//!   pipeline's. Unreachable engines and failing API calls are
//!   infrastructure errors and are retried.
//! - File ownership: an agent running as root lets the container run as the
//!   image's user (root, usually), and can remove whatever it wrote into the
//!   workspace. An agent running as another user runs the container as its
//!   own uid:gid, so everything written to the workspace stays removable by
//!   the agent (an image that needs root then fails visibly, in its log).
//! - The script goes to `sh -e -c` as one argument instead of a mounted
//!   file, so nothing but the workspace is mounted; Linux caps one argument
//!   at 128 KiB, which is checked up front.

use std::collections::HashMap;
use std::pin::pin;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
    ListNetworksOptionsBuilder, StopContainerOptionsBuilder,
};
use futures::future::BoxFuture;
use kiln_common::duration;
use tokio::time::{Instant, timeout};
use tracing::{info, warn};

use crate::config::{AllowedMount, DockerConfig};
use crate::error::{Error, one_line};
use crate::executor::contract::{
    Ended, Executor, Exit, Job, Stop, StopSignal, out_of_memory_message,
};
use crate::logs::LogSink;
use crate::timer::sleep_until_some;

mod config;
mod container;
mod image;
mod services;

use container::{Container, forward_output, remove, wait_for_exit};
use services::{NotReady, Services};

/// Linux's limit on one argument (`MAX_ARG_STRLEN`), which the script is.
const MAX_SCRIPT_BYTES: usize = 128 * 1024 - 1;
/// How long output may keep arriving after the container is gone.
const OUTPUT_DRAIN: Duration = Duration::from_secs(10);
/// Engine calls that are not streams must answer within this.
const API_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) struct DockerExecutor {
    /// The engine's API client; cheap to clone, one connection per call.
    docker: Docker,
    /// The agent's name: the `kiln.agent` label and part of container names.
    agent: String,
    /// What every container gets besides its stage's own settings.
    host: config::HostSettings,
    /// Between SIGTERM and SIGKILL (`docker stop -t`), whole seconds.
    grace: Duration,
}

impl DockerExecutor {
    /// Connects to the engine at `docker.host`, checks the allowed mounts and
    /// removes the containers an earlier run of agent `agent` left behind.
    pub(crate) async fn connect(
        agent: &str,
        docker: &DockerConfig,
        grace: Duration,
    ) -> Result<Self, Error> {
        let connect_error = |detail: String| Error::DockerConnect {
            host: docker.host.clone(),
            detail,
        };
        let client = Docker::connect_with_host(&docker.host)
            .map_err(|err| connect_error(one_line(&err.to_string())))?
            .with_timeout(API_TIMEOUT);
        // The engine may speak an older API than bollard's default.
        let client = client
            .negotiate_version()
            .await
            .map_err(|err| connect_error(one_line(&err.to_string())))?;
        let info = client
            .info()
            .await
            .map_err(|err| connect_error(one_line(&err.to_string())))?;
        check_mounts(&docker.allow_mounts).await?;
        let executor = DockerExecutor {
            docker: client,
            agent: agent.to_owned(),
            host: config::HostSettings {
                n_cpus: info.ncpu.unwrap_or(1).max(1) as f64,
                allow_mounts: docker.allow_mounts.clone(),
                // SAFETY: geteuid and getegid cannot fail and touch no memory.
                user: match unsafe { libc::geteuid() } {
                    0 => None,
                    uid => Some(format!("{uid}:{}", unsafe { libc::getegid() })),
                },
            },
            grace,
        };
        executor
            .remove_orphans()
            .await
            .map_err(|err| connect_error(one_line(&err.to_string())))?;
        Ok(executor)
    }

    /// Containers (stages and their services) and networks labelled with
    /// this agent's name belong to attempts that a crash of this agent
    /// abandoned: nobody waits for them any more.
    async fn remove_orphans(&self) -> Result<(), BollardError> {
        let filters = HashMap::from([("label", vec![format!("kiln.agent={}", self.agent)])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let orphans = self.docker.list_containers(Some(options)).await?;
        for orphan in orphans {
            let Some(id) = orphan.id else { continue };
            let name = orphan.names.unwrap_or_default().join(",");
            info!(container = %name, "removing a container an earlier run of this agent left");
            if let Err(err) = remove(&self.docker, &id).await {
                warn!(container = %name, %err, "cannot remove an orphaned container");
            }
        }
        // Networks last: a network is removable once no container uses it.
        let options = ListNetworksOptionsBuilder::default()
            .filters(&filters)
            .build();
        for network in self.docker.list_networks(Some(options)).await? {
            let Some(name) = network.name else { continue };
            info!(%name, "removing a stage network an earlier run of this agent left");
            if let Err(err) = services::remove_network(&self.docker, &name).await {
                warn!(%name, %err, "cannot remove an orphaned network");
            }
        }
        Ok(())
    }

    async fn run_job(&self, job: Job, log: LogSink, mut stop: StopSignal) -> Result<Ended, Error> {
        if job.image.trim().is_empty() {
            return Err(Error::NoImage);
        }
        let script = script_of(&job.commands);
        if script.len() > MAX_SCRIPT_BYTES {
            let message = format!(
                "the stage's commands are {} KiB, more than the 128 KiB the docker executor can \
                 pass to `sh -c`; move the long parts into a script in the repository",
                script.len() / 1024
            );
            log.system(message.clone()).await;
            return Ok(Exit::CannotStart(message).into());
        }
        let found = tokio::select! {
            found = image::find(&self.docker, &job.image, &job.docker.pull, &log) => found?,
            stop = stop.stopped() => {
                log.system(format!("{stop}; not starting the container")).await;
                return Ok(Exit::Stopped(stop).into());
            }
        };
        let image = match found {
            Ok(image) => image,
            Err(missing) => {
                log.system(missing.clone()).await;
                return Ok(Exit::CannotStart(missing).into());
            }
        };

        log.system(config::describe(
            &job,
            &image.digest,
            &self.host,
            &self.agent,
        ))
        .await;
        let name = config::container_name(&self.agent, &job);
        let services = match config::services_network(&self.agent, &job) {
            None => None,
            Some(network) => {
                let labels = config::labels(&self.agent, &job);
                let (services, ready) = Services::start(
                    &self.docker,
                    &name,
                    &network,
                    &labels,
                    &job,
                    &log,
                    &mut stop,
                )
                .await?;
                if let Err(not_ready) = ready {
                    services.remove().await;
                    let exit = match not_ready {
                        NotReady::Failed(message) => {
                            log.system(message.clone()).await;
                            Exit::CannotStart(message)
                        }
                        NotReady::Stopped(stop) => {
                            log.system(format!("{stop}; not starting the container"))
                                .await;
                            Exit::Stopped(stop)
                        }
                    };
                    return Ok(exit.into());
                }
                Some(services)
            }
        };
        let body = config::container_body(&job, &image.id, script, &self.agent, &self.host);
        let limit_bytes = config::memory_limit(&job.docker);
        let container = self.create(&name, body, &log).await?;
        let ran = self
            .run_container(&container, &job, limit_bytes, &log, &mut stop)
            .await;
        container.remove().await;
        if let Some(services) = services {
            services.remove().await;
        }
        let (exit, started_at) = match ran {
            Err(Error::Docker { action, detail })
                if !job.gpus.is_empty() && detail.contains("capabilities: [[gpu]]") =>
            {
                // No retry makes a GPU runtime appear; say what to do.
                let message = format!(
                    "the stage asks for gpus {:?} and the docker engine cannot give them \
                     ({action}: {detail}); install the NVIDIA Container Toolkit on this agent's \
                     machine, or start the agent with --gpus none so gpu stages go elsewhere",
                    job.gpus
                );
                log.system(message.clone()).await;
                return Ok(Exit::CannotStart(message).into());
            }
            ran => ran?,
        };
        Ok(Ended {
            exit,
            image_digest: image.digest,
            started_at: Some(started_at),
        })
    }

    /// Creates the container; one left with the same name (by a crash that
    /// start-up did not see) is replaced.
    async fn create(
        &self,
        name: &str,
        body: bollard::models::ContainerCreateBody,
        log: &LogSink,
    ) -> Result<Container, Error> {
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        let created = self
            .docker
            .create_container(Some(options.clone()), body.clone())
            .await;
        let created = match created {
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => {
                log.system(format!("removing a leftover container named {name}"))
                    .await;
                remove(&self.docker, name)
                    .await
                    .map_err(Error::docker("remove of a leftover container"))?;
                self.docker.create_container(Some(options), body).await
            }
            created => created,
        };
        created.map_err(Error::docker("container create"))?;
        Ok(Container::new(self.docker.clone(), name.to_owned()))
    }

    /// Starts the container and follows it to its end; the caller removes it.
    /// Returns how it ended and when it started.
    async fn run_container(
        &self,
        container: &Container,
        job: &Job,
        limit_bytes: u64,
        log: &LogSink,
        stop: &mut StopSignal,
    ) -> Result<(Exit, Instant), Error> {
        let name = container.name.as_str();
        // Attached before the start, so not one line is missed (and there
        // is no log to replay: the container has no logging driver).
        let attach_options = AttachContainerOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .stream(true)
            .build();
        let attached = self
            .docker
            .attach_container(name, Some(attach_options))
            .await
            .map_err(Error::docker("container attach"))?;
        let mut output = pin!(forward_output(attached.output, log.clone()));
        self.docker
            .start_container(name, None)
            .await
            .map_err(Error::docker("container start"))?;
        let started_at = Instant::now();
        let mut exited = pin!(wait_for_exit(&self.docker, name));
        let mut output_done = false;

        let deadline = job.timeout.map(|limit| Instant::now() + limit);
        let ending = loop {
            tokio::select! {
                () = &mut output, if !output_done => output_done = true,
                code = &mut exited => break Ending::Exited(code?),
                () = sleep_until_some(deadline) => break Ending::TimedOut(job.timeout.unwrap_or_default()),
                stop = stop.stopped() => break Ending::Stopped(stop),
            }
        };

        let exit = match ending {
            Ending::Exited(0) => Exit::Code(0),
            Ending::Exited(code) => {
                if self.oom_killed(name).await? {
                    log.system(out_of_memory_message(limit_bytes)).await;
                    Exit::OutOfMemory { limit_bytes }
                } else {
                    Exit::Code(i32::try_from(code).unwrap_or(-1))
                }
            }
            Ending::TimedOut(limit) => {
                let described = duration::format(limit);
                log.system(format!(
                    "timed out after {described}; stopping the container"
                ))
                .await;
                self.stop(name, &mut output, &mut output_done, log).await?;
                Exit::TimedOut(limit)
            }
            Ending::Stopped(stop) => {
                log.system(format!("{stop}; stopping the container")).await;
                self.stop(name, &mut output, &mut output_done, log).await?;
                Exit::Stopped(stop)
            }
        };
        // The attach stream ends with the container; this only guards
        // against an engine that keeps it open.
        if !output_done && timeout(OUTPUT_DRAIN, &mut output).await.is_err() {
            log.system("the container's output stayed open after it stopped; not waiting for it")
                .await;
        }
        Ok((exit, started_at))
    }

    /// `docker stop -t grace`: SIGTERM, SIGKILL after the grace, while the
    /// output keeps flowing.
    async fn stop(
        &self,
        name: &str,
        output: &mut (impl Future<Output = ()> + Unpin),
        output_done: &mut bool,
        log: &LogSink,
    ) -> Result<(), Error> {
        let grace_secs = self.grace.as_secs().max(1);
        let options = StopContainerOptionsBuilder::default()
            .t(i32::try_from(grace_secs).unwrap_or(i32::MAX))
            .build();
        let started = Instant::now();
        let mut stopping = pin!(self.docker.stop_container(name, Some(options)));
        let stopped = loop {
            tokio::select! {
                () = &mut *output, if !*output_done => *output_done = true,
                stopped = &mut stopping => break stopped,
            }
        };
        stopped.map_err(Error::docker("container stop"))?;
        if started.elapsed() >= Duration::from_secs(grace_secs) {
            let grace = duration::format(Duration::from_secs(grace_secs));
            log.system(format!(
                "the container was still running {grace} after SIGTERM; docker sent SIGKILL"
            ))
            .await;
        }
        Ok(())
    }

    /// Whether the kernel's OOM killer ended a process of the container.
    async fn oom_killed(&self, name: &str) -> Result<bool, Error> {
        let inspected = self
            .docker
            .inspect_container(name, None)
            .await
            .map_err(Error::docker("container inspect"))?;
        Ok(inspected
            .state
            .and_then(|state| state.oom_killed)
            .unwrap_or(false))
    }
}

impl Executor for DockerExecutor {
    fn run<'a>(
        &'a self,
        job: Job,
        log: LogSink,
        stop: StopSignal,
    ) -> BoxFuture<'a, Result<Ended, Error>> {
        Box::pin(self.run_job(job, log, stop))
    }
}

enum Ending {
    Exited(i64),
    TimedOut(Duration),
    Stopped(Stop),
}

/// The commands as one script, a line each, as the process executor runs them.
fn script_of(commands: &[String]) -> String {
    let mut script = commands.join("\n");
    script.push('\n');
    script
}

/// Every allowed mount must exist now: docker would otherwise fail each
/// stage, or worse, create an empty directory in its place.
async fn check_mounts(mounts: &[AllowedMount]) -> Result<(), Error> {
    for mount in mounts {
        if !tokio::fs::try_exists(&mount.path).await.unwrap_or(false) {
            return Err(Error::Config(format!(
                "--allow-mount {} does not exist on this machine; create it or drop the flag",
                mount.path.display()
            )));
        }
        if mount.path == std::path::Path::new(config::WORKSPACE) || mount.path.parent().is_none() {
            return Err(Error::Config(format!(
                "--allow-mount {} would hide the workspace or the whole image; mount a directory \
                 below /",
                mount.path.display()
            )));
        }
    }
    Ok(())
}
