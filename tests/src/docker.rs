//! Helpers for tests and benchmarks against the real Docker engine: reaching
//! it (or saying loudly why a test skips), building the tiny test image
//! without a registry, and a farm of one coordinator and one docker agent.
//!
//! The engine is reached through its API (bollard), like the agent does;
//! `DOCKER_HOST` is honoured. An unusable engine fails the test (see
//! [`crate::skip`] for the one opt-out).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bollard::Docker;
use bollard::query_parameters::{
    BuildImageOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
};
use futures::StreamExt;
use kiln_proto::v1 as pb;
use tokio::sync::Mutex;

use crate::{Coordinator, CoordinatorOptions, Process, Repo, binary};

/// The image docker tests run stages in; see `deploy/images/test/`.
pub const TEST_IMAGE: &str = "kiln/test-busybox:1";
/// The recipe, shared with `deploy/images/test/build.sh`.
const TEST_IMAGE_DOCKERFILE: &str = include_str!("../../deploy/images/test/Dockerfile");
/// Debian's `busybox-static` puts a static busybox here.
const BUSYBOX: &str = "/bin/busybox";

/// One build at a time per test process; the engine copes with the rest.
static IMAGE_BUILD: Mutex<()> = Mutex::const_new(());

/// The engine with the test image on it; an error saying what to install
/// when it is unusable, or `None` after printing why the test `test` skips
/// where skipping is allowed ([`crate::skip`]).
pub async fn engine(test: &str) -> Result<Option<Docker>> {
    let ready = async {
        let docker = connect().await?;
        ensure_test_image(&docker).await?;
        anyhow::Ok(docker)
    };
    match ready.await {
        Ok(docker) => Ok(Some(docker)),
        Err(err) => {
            crate::skip::missing(test, &format!("no usable docker engine: {err:#}"))?;
            Ok(None)
        }
    }
}

/// The engine at `DOCKER_HOST` (default: the local socket), answering.
pub async fn connect() -> Result<Docker> {
    let docker = Docker::connect_with_defaults().context("no docker engine address")?;
    let docker = docker
        .negotiate_version()
        .await
        .context("the docker engine does not answer")?;
    docker
        .ping()
        .await
        .context("the docker engine does not answer")?;
    Ok(docker)
}

/// Builds [`TEST_IMAGE`] through the engine's build API unless it exists.
pub async fn ensure_test_image(docker: &Docker) -> Result<()> {
    let _one_build = IMAGE_BUILD.lock().await;
    if docker.inspect_image(TEST_IMAGE).await.is_ok() {
        return Ok(());
    }
    eprintln!("building {TEST_IMAGE} from {BUSYBOX}");
    let context = test_image_context().with_context(|| {
        format!("cannot assemble {TEST_IMAGE}; run `apt-get install busybox-static`")
    })?;
    let options = BuildImageOptionsBuilder::default()
        .t(TEST_IMAGE)
        .rm(true)
        .build();
    let mut build = docker.build_image(options, None, Some(bollard::body_full(context.into())));
    while let Some(event) = build.next().await {
        let event = event.with_context(|| format!("building {TEST_IMAGE}"))?;
        if let Some(error) = event.error_detail.and_then(|detail| detail.message) {
            bail!("building {TEST_IMAGE}: {error}");
        }
    }
    docker
        .inspect_image(TEST_IMAGE)
        .await
        .with_context(|| format!("{TEST_IMAGE} is missing after its build"))?;
    Ok(())
}

/// The build context as a tar: the Dockerfile, `rootfs/bin/busybox` with a
/// symlink per applet, and `rootfs/tmp`.
fn test_image_context() -> Result<Vec<u8>> {
    let listed = Command::new(BUSYBOX)
        .arg("--list")
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running {BUSYBOX} --list"))?;
    if !listed.status.success() {
        bail!("{BUSYBOX} --list failed");
    }
    let applets = String::from_utf8(listed.stdout)?;
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(TEST_IMAGE_DOCKERFILE.len() as u64);
    header.set_mode(0o644);
    tar.append_data(&mut header, "Dockerfile", TEST_IMAGE_DOCKERFILE.as_bytes())?;
    let mut tmp = tar::Header::new_gnu();
    tmp.set_entry_type(tar::EntryType::Directory);
    tmp.set_mode(0o1777);
    tmp.set_size(0);
    tar.append_data(&mut tmp, "rootfs/tmp/", std::io::empty())?;
    tar.append_path_with_name(BUSYBOX, "rootfs/bin/busybox")?;
    for applet in applets.split_whitespace().filter(|a| *a != "busybox") {
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_mode(0o777);
        link.set_size(0);
        tar.append_link(&mut link, format!("rootfs/bin/{applet}"), "busybox")?;
    }
    Ok(tar.into_inner()?)
}

/// Names of the containers, running or not, labelled `kiln.agent=<agent>`.
pub async fn containers_of(docker: &Docker, agent: &str) -> Result<Vec<String>> {
    let filters = std::collections::HashMap::from([("label", vec![format!("kiln.agent={agent}")])]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let containers = docker.list_containers(Some(options)).await?;
    Ok(containers
        .into_iter()
        .flat_map(|c| c.names.unwrap_or_default())
        .collect())
}

/// Names of the networks labelled `kiln.agent=<agent>` (those of stages
/// with `services:`).
pub async fn networks_of(docker: &Docker, agent: &str) -> Result<Vec<String>> {
    let filters = std::collections::HashMap::from([("label", vec![format!("kiln.agent={agent}")])]);
    let options = ListNetworksOptionsBuilder::default()
        .filters(&filters)
        .build();
    let networks = docker.list_networks(Some(options)).await?;
    Ok(networks.into_iter().filter_map(|n| n.name).collect())
}

/// Starts `kiln-agent --executor docker` with capacity 1 and `extra` flags.
pub fn start_docker_agent(
    url: &str,
    name: &str,
    work_dir: &Path,
    extra: &[&str],
) -> Result<Process> {
    let (_, agent_token) = crate::tokens_for(url)
        .with_context(|| format!("no coordinator at {url} was started by this test"))?;
    let child = Command::new(binary("kiln-agent"))
        .args(["--coordinator", url, "--name", name, "--capacity", "1"])
        .args(["--executor", "docker"])
        .args(["--work-dir".as_ref(), work_dir.as_os_str()])
        .args(extra)
        .env("KILN_AGENT_TOKEN", agent_token)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting kiln-agent --executor docker")?;
    Ok(Process {
        child,
        name: format!("kiln-agent {name}"),
    })
}

/// A coordinator and one docker agent whose name is unique to this process,
/// so tests running in parallel can tell their containers apart.
pub struct DockerFarm {
    pub docker: Docker,
    pub coordinator: Coordinator,
    pub agent: Process,
    pub agent_name: String,
    pub work_dir: tempfile::TempDir,
    _data_dir: tempfile::TempDir,
}

impl DockerFarm {
    /// `None` when the test `test` skips (see [`engine`]).
    pub async fn start(test: &str) -> Result<Option<Self>> {
        Self::start_with(test, &[]).await
    }

    /// [`DockerFarm::start`] with `agent_flags` for the agent.
    pub async fn start_with(test: &str, agent_flags: &[&str]) -> Result<Option<Self>> {
        let Some(docker) = engine(test).await? else {
            return Ok(None);
        };
        let data_dir = tempfile::tempdir()?;
        let coordinator = Coordinator::start(data_dir.path(), &CoordinatorOptions::default())?;
        let work_dir = tempfile::tempdir()?;
        let agent_name = format!("{test}-{}", std::process::id());
        let agent = start_docker_agent(
            &coordinator.url(),
            &agent_name,
            work_dir.path(),
            agent_flags,
        )?;
        Ok(Some(DockerFarm {
            docker,
            coordinator,
            agent,
            agent_name,
            work_dir,
            _data_dir: data_dir,
        }))
    }

    /// Starts the agent again under the same name and work dir (after a
    /// kill, say).
    pub fn restart_agent(&mut self) -> Result<()> {
        self.agent = start_docker_agent(
            &self.coordinator.url(),
            &self.agent_name,
            self.work_dir.path(),
            &[],
        )?;
        Ok(())
    }

    /// Registers the pipeline of `repo` and triggers a run of it.
    pub async fn run(&self, repo: &Repo) -> Result<u64> {
        let mut client = self.coordinator.client().await?;
        let spec_yaml = std::fs::read_to_string(repo.path().join("kiln.yml"))?;
        let registered = client
            .register_pipeline(pb::RegisterPipelineRequest {
                file_name: "kiln.yml".into(),
                spec_yaml,
                repo: repo.path().display().to_string(),
                branch: "main".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let pipeline = registered.pipeline.context("no pipeline")?.name;
        let run = client
            .trigger_run(pb::TriggerRunRequest {
                pipeline,
                triggered_by: "docker test".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(run.id)
    }

    /// This farm's containers that exist right now.
    pub async fn containers(&self) -> Result<Vec<String>> {
        containers_of(&self.docker, &self.agent_name).await
    }

    /// This farm's networks that exist right now.
    pub async fn networks(&self) -> Result<Vec<String>> {
        networks_of(&self.docker, &self.agent_name).await
    }

    /// Attempt directories under the agent's work dir (`ws/<run>-<idx>-<attempt>`).
    pub fn workspaces(&self) -> Result<Vec<PathBuf>> {
        let ws = self.work_dir.path().join("ws");
        let mut dirs = Vec::new();
        for entry in std::fs::read_dir(ws)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                dirs.push(entry.path());
            }
        }
        Ok(dirs)
    }

    /// Waits until none of this farm's containers is left.
    pub async fn no_containers_left(&self) -> Result<()> {
        crate::eventually(Duration::from_secs(15), "no container left", || async {
            let left = self.containers().await?;
            Ok(left.is_empty().then_some(()))
        })
        .await
        .with_context(|| format!("containers of {} are left", self.agent_name))
    }
}
