//! The containerized farm: a coordinator and agents, each in its own
//! container built from `deploy/Dockerfile.coordinator` and
//! `deploy/Dockerfile.agent`, on a private Docker network. The agents reach
//! the engine through the mounted socket and run their stages as *sibling*
//! containers, so every path they bind-mount (work dirs, repositories) is
//! mounted at the same path inside the agent and on the host.
//!
//! Containers and networks are managed through the engine's API (bollard).
//! Everything a [`Farm`] creates is labelled `kiln.farm=<id>`, and the stage
//! containers carry `kiln.agent=<agent>`; dropping the farm removes all of
//! them, whether the test passed, failed or panicked, and prints the
//! services' logs first unless [`Farm::finish`] was called (or always, with
//! `KILN_FARM_LOGS=1`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, HostConfig, NetworkConnectRequest, NetworkCreateRequest,
    NetworkDisconnectRequest, PortBinding,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures::StreamExt;
use kiln_common::channel::KilnChannel;
use kiln_proto::v1 as pb;
use pb::control_service_client::ControlServiceClient;

use crate::docker::engine;
use crate::{binary, eventually};

/// Built by `deploy/build-images.sh` from the test's own binaries.
pub const COORDINATOR_IMAGE: &str = "kiln/coordinator:farm-test";
/// Built by `deploy/build-images.sh` from the test's own binaries.
pub const AGENT_IMAGE: &str = "kiln/agent:farm-test";
/// What both service images start from (`deploy/images/base/build.sh`).
pub const BASE_IMAGE: &str = "kiln/base:bookworm";
/// The uid:gid the service images run as.
const KILN_UID: u32 = 10001;
const GRPC_PORT: &str = "7700/tcp";
const HTTP_PORT: &str = "7701/tcp";
/// Label on everything a farm creates; the value is the farm's id.
const FARM_LABEL: &str = "kiln.farm";

/// How to start a [`Farm`].
#[derive(Clone, Debug)]
pub struct FarmOptions<'a> {
    /// Agent names (each gets its own container, called the same).
    pub agents: &'a [&'a str],
    /// Slots per agent.
    pub capacity: u32,
    /// `--lease-ttl` of the coordinator.
    pub lease_ttl: &'a str,
    /// `--heartbeat` of the coordinator.
    pub heartbeat: &'a str,
    /// Host directories (the tests' git repositories) mounted read-only at
    /// the same path into the coordinator, which resolves revisions there,
    /// and into the agents, which clone from there.
    pub repos: &'a [&'a Path],
}

impl Default for FarmOptions<'_> {
    fn default() -> Self {
        Self {
            agents: &["a", "b"],
            capacity: 1,
            lease_ttl: "3s",
            heartbeat: "300ms",
            repos: &[],
        }
    }
}

/// One agent of a farm.
#[derive(Clone, Debug)]
pub struct FarmAgent {
    /// The agent's name, its container's name and its `kiln.agent` label.
    pub name: String,
    /// Its work dir: the same path on the host and in its container.
    pub work_dir: PathBuf,
}

/// A coordinator and agents in containers; see the module docs.
pub struct Farm {
    pub docker: Docker,
    /// Unique per farm: the network's name and every container's prefix.
    pub id: String,
    /// The coordinator's container, on the farm network under this name.
    pub coordinator: String,
    pub agents: Vec<FarmAgent>,
    /// The coordinator's gRPC port, published on 127.0.0.1 only.
    pub grpc: String,
    /// The coordinator's HTTP port (`/metrics`), published on 127.0.0.1 only.
    pub http: String,
    /// The bootstrap admin token, read from the bind-mounted data dir.
    pub admin_token: String,
    /// The agents' token, created through the API.
    pub agent_token: String,
    guard: Cleanup,
    _work: tempfile::TempDir,
}

impl Farm {
    /// Builds the images as needed and starts the farm; `None` when the test
    /// `test` may skip (no engine, or no base image and no root to build it)
    /// and does, after printing why; see [`crate::skip`].
    pub async fn start(test: &str, options: &FarmOptions<'_>) -> Result<Option<Self>> {
        let Some(docker) = engine(test).await? else {
            return Ok(None);
        };
        if let Err(reason) = can_build_images(&docker).await {
            crate::skip::missing(test, &reason.to_string())?;
            return Ok(None);
        }
        build_service_images().await?;
        let socket = docker_socket()?;
        let socket_gid = std::fs::metadata(&socket)
            .with_context(|| format!("inspecting the Docker socket {}", socket.display()))?
            .gid();

        // The coordinator (uid 10001) must read the repositories.
        for repo in options.repos {
            let mode = std::fs::metadata(repo)?.mode();
            std::fs::set_permissions(repo, std::fs::Permissions::from_mode(mode | 0o755))?;
        }
        let id = format!("kiln-{test}-{}", std::process::id());
        let work = tempfile::tempdir()?;
        let agents: Vec<FarmAgent> = options
            .agents
            .iter()
            .map(|agent| FarmAgent {
                name: format!("{id}-{agent}"),
                work_dir: work.path().join(agent),
            })
            .collect();
        // From here on, whatever exists is removed on drop.
        let mut farm = Farm {
            guard: Cleanup {
                id: id.clone(),
                agents: agents.iter().map(|agent| agent.name.clone()).collect(),
                finished: false,
            },
            docker,
            coordinator: format!("{id}-coordinator"),
            id,
            agents,
            grpc: String::new(),
            http: String::new(),
            admin_token: String::new(),
            agent_token: String::new(),
            _work: work,
        };
        remove_everything(&farm.docker, &farm.id, &farm.guard.agents).await;
        farm.create_network().await?;
        farm.start_coordinator(options).await?;
        for index in 0..farm.agents.len() {
            farm.start_agent(index, options, &socket, socket_gid)
                .await?;
        }
        farm.wait_for_agents().await?;
        Ok(Some(farm))
    }

    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([(FARM_LABEL.to_owned(), self.id.clone())])
    }

    async fn create_network(&self) -> Result<()> {
        self.docker
            .create_network(NetworkCreateRequest {
                name: self.id.clone(),
                driver: Some("bridge".into()),
                labels: Some(self.labels()),
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating the network {}", self.id))?;
        Ok(())
    }

    async fn start_coordinator(&mut self, options: &FarmOptions<'_>) -> Result<()> {
        let loopback = || {
            Some(vec![PortBinding {
                host_ip: Some("127.0.0.1".into()),
                // Empty: the engine picks a free port.
                host_port: Some(String::new()),
            }])
        };
        // The data dir is bind-mounted so the test can read the bootstrap
        // admin token the coordinator writes there.
        let data_dir = self._work.path().join("coordinator-data");
        std::fs::create_dir_all(&data_dir)?;
        // SAFETY: geteuid and getegid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let user = if uid == 0 {
            std::os::unix::fs::chown(&data_dir, Some(KILN_UID), Some(KILN_UID))?;
            None
        } else {
            Some(format!("{uid}:{gid}"))
        };
        let mut binds = vec![format!("{}:/var/lib/kiln", data_dir.display())];
        binds.extend(same_path_binds(options.repos, ":ro"));
        let config = ContainerCreateBody {
            image: Some(COORDINATOR_IMAGE.into()),
            cmd: Some(strings(&[
                // Plain text on the private test network; the ports are
                // published on 127.0.0.1 only.
                "--insecure",
                "--lease-ttl",
                options.lease_ttl,
                "--heartbeat",
                options.heartbeat,
            ])),
            env: Some(strings(&["RUST_LOG=info"])),
            labels: Some(self.labels()),
            exposed_ports: Some(strings(&[GRPC_PORT, HTTP_PORT])),
            host_config: Some(HostConfig {
                network_mode: Some(self.id.clone()),
                port_bindings: Some(HashMap::from([
                    (GRPC_PORT.to_owned(), loopback()),
                    (HTTP_PORT.to_owned(), loopback()),
                ])),
                binds: Some(binds),
                ..Default::default()
            }),
            user,
            ..Default::default()
        };
        let name = self.coordinator.clone();
        self.run_container(&name, config).await?;

        let inspect = self.docker.inspect_container(&name, None).await?;
        let ports = inspect
            .network_settings
            .and_then(|settings| settings.ports)
            .context("the coordinator container has no published ports")?;
        let published = |port: &str| -> Result<String> {
            let host_port = ports
                .get(port)
                .cloned()
                .flatten()
                .and_then(|bindings| bindings.into_iter().find_map(|b| b.host_port))
                .with_context(|| format!("{port} of the coordinator is not published"))?;
            Ok(format!("127.0.0.1:{host_port}"))
        };
        self.grpc = published(GRPC_PORT)?;
        self.http = published(HTTP_PORT)?;
        let url = self.url();
        self.admin_token = crate::read_admin_token(&data_dir, Duration::from_secs(30))
            .context("the coordinator's logs follow the test output")?;
        let admin = self.admin_token.clone();
        self.agent_token = eventually(
            Duration::from_secs(30),
            "the coordinator container to answer",
            || {
                let (url, admin) = (url.clone(), admin.clone());
                async move {
                    Ok(
                        crate::create_token(&url, &admin, "farm-agents", pb::Role::Agent)
                            .await
                            .ok(),
                    )
                }
            },
        )
        .await
        .context("the coordinator's logs follow the test output")?;
        crate::register_tokens(&url, &self.admin_token, &self.agent_token);
        Ok(())
    }

    async fn start_agent(
        &self,
        index: usize,
        options: &FarmOptions<'_>,
        socket: &Path,
        socket_gid: u32,
    ) -> Result<()> {
        let agent = &self.agents[index];
        std::fs::create_dir_all(&agent.work_dir)?;
        // SAFETY: geteuid and getegid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        // As root, the agent runs as the image's own unprivileged user and
        // gets a work dir it owns. Otherwise it runs as the test's user, so
        // the test can read and remove what it wrote.
        let user = if uid == 0 {
            std::os::unix::fs::chown(&agent.work_dir, Some(KILN_UID), Some(KILN_UID))?;
            None
        } else {
            Some(format!("{uid}:{gid}"))
        };
        let work_dir = agent.work_dir.display().to_string();
        let mut binds = vec![
            format!("{0}:{0}", socket.display()),
            format!("{work_dir}:{work_dir}"),
        ];
        binds.extend(same_path_binds(options.repos, ":ro"));
        let capacity = options.capacity.to_string();
        let coordinator = format!("http://{}:7700", self.coordinator);
        let config = ContainerCreateBody {
            image: Some(AGENT_IMAGE.into()),
            user,
            cmd: Some(strings(&[
                "--coordinator",
                &coordinator,
                "--name",
                &agent.name,
                "--work-dir",
                &work_dir,
                "--capacity",
                &capacity,
                "--executor",
                "docker",
                "--docker-host",
                &format!("unix://{}", socket.display()),
                "--labels",
                &format!("farm={}", self.id),
            ])),
            env: Some(vec![
                "RUST_LOG=info".to_owned(),
                format!("KILN_AGENT_TOKEN={}", self.agent_token),
            ]),
            labels: Some(self.labels()),
            host_config: Some(HostConfig {
                network_mode: Some(self.id.clone()),
                binds: Some(binds),
                group_add: Some(vec![socket_gid.to_string()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.run_container(&agent.name, config).await
    }

    async fn run_container(&self, name: &str, config: ContainerCreateBody) -> Result<()> {
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        self.docker
            .create_container(Some(options), config)
            .await
            .with_context(|| format!("creating the container {name}"))?;
        self.docker
            .start_container(name, None)
            .await
            .with_context(|| format!("starting the container {name}"))?;
        Ok(())
    }

    async fn wait_for_agents(&self) -> Result<()> {
        let client = self.client().await?;
        let names: Vec<String> = self.agents.iter().map(|a| a.name.clone()).collect();
        eventually(
            Duration::from_secs(60),
            "every agent container to connect",
            || {
                let mut client = client.clone();
                let names = names.clone();
                async move {
                    let agents = list_agents(&mut client).await?;
                    let all = names.iter().all(|name| {
                        agents
                            .iter()
                            .any(|agent| &agent.name == name && agent.connected)
                    });
                    Ok(all.then_some(()))
                }
            },
        )
        .await
    }

    /// `http://127.0.0.1:PORT` of the coordinator.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub async fn client(&self) -> Result<ControlServiceClient<KilnChannel>> {
        Ok(ControlServiceClient::new(
            crate::channel(&self.url(), &self.admin_token).await?,
        ))
    }

    /// The agent called `name` (the full agent name).
    pub fn agent(&self, name: &str) -> &FarmAgent {
        self.agents
            .iter()
            .find(|agent| agent.name == name)
            .unwrap_or_else(|| panic!("the farm has no agent {name}"))
    }

    /// Cuts the container `container` off the farm network, as a network
    /// partition would: its connections go silent, nothing is closed.
    pub async fn disconnect(&self, container: &str) -> Result<()> {
        self.docker
            .disconnect_network(
                &self.id,
                NetworkDisconnectRequest {
                    container: container.into(),
                    force: Some(true),
                },
            )
            .await
            .with_context(|| format!("disconnecting {container} from {}", self.id))
    }

    /// Puts `container` back on the farm network (under its name).
    pub async fn connect(&self, container: &str) -> Result<()> {
        self.docker
            .connect_network(
                &self.id,
                NetworkConnectRequest {
                    container: container.into(),
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("connecting {container} to {}", self.id))
    }

    /// Whether the coordinator sees the agent `name` connected.
    pub async fn agent_connected(&self, name: &str) -> Result<bool> {
        let mut client = self.client().await?;
        Ok(list_agents(&mut client)
            .await?
            .iter()
            .any(|agent| agent.name == name && agent.connected))
    }

    /// Names of the stage containers (`kiln.agent=<agent>`) that exist now,
    /// running or not.
    pub async fn stage_containers(&self, agent: &str) -> Result<Vec<String>> {
        let filters = HashMap::from([("label", vec![format!("kiln.agent={agent}")])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        Ok(self
            .docker
            .list_containers(Some(options))
            .await?
            .into_iter()
            .flat_map(|container| container.names.unwrap_or_default())
            .collect())
    }

    /// The coordinator's Prometheus text from `/metrics`.
    pub fn metrics(&self) -> Result<String> {
        let mut stream = std::net::TcpStream::connect(&self.http)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.http
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let Some((_, body)) = response.split_once("\r\n\r\n") else {
            bail!("no HTTP response from {}: {response:?}", self.http);
        };
        Ok(body.to_owned())
    }

    /// The value of the sample `name` (e.g. `kiln_stages_finished_total{state="succeeded"}`).
    pub fn metric(&self, sample: &str) -> Result<f64> {
        let metrics = self.metrics()?;
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
            .with_context(|| format!("no sample {sample} in /metrics:\n{metrics}"))
    }

    /// The test passed: drop quietly (still removing everything).
    pub fn finish(mut self) {
        self.guard.finished = true;
    }
}

/// Removes what a farm created, from a thread of its own (drop cannot wait
/// on the test's runtime), and prints the service logs first on failure.
struct Cleanup {
    id: String,
    agents: Vec<String>,
    finished: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let id = self.id.clone();
        let agents = self.agents.clone();
        let dump_logs = !self.finished || std::env::var_os("KILN_FARM_LOGS").is_some();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the farm's clean-up");
            runtime.block_on(async {
                let Ok(docker) = Docker::connect_with_defaults() else {
                    return;
                };
                let Ok(docker) = docker.negotiate_version().await else {
                    return;
                };
                if dump_logs {
                    let mut names = vec![format!("{id}-coordinator")];
                    names.extend(agents.iter().cloned());
                    for name in names {
                        eprintln!("----- logs of {name} -----\n{}", logs(&docker, &name).await);
                    }
                }
                remove_everything(&docker, &id, &agents).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// Removes the containers labelled with the farm or one of its agents, and
/// the farm network; errors are ignored (there may be nothing to remove).
async fn remove_everything(docker: &Docker, id: &str, agents: &[String]) {
    let mut selectors = vec![format!("{FARM_LABEL}={id}")];
    selectors.extend(agents.iter().map(|agent| format!("kiln.agent={agent}")));
    let remove = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    for selector in selectors {
        let filters = HashMap::from([("label", vec![selector])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let Ok(containers) = docker.list_containers(Some(options)).await else {
            continue;
        };
        for container in containers.into_iter().filter_map(|c| c.id) {
            let _ = docker
                .remove_container(&container, Some(remove.clone()))
                .await;
        }
    }
    let filters = HashMap::from([("label", vec![format!("{FARM_LABEL}={id}")])]);
    let options = ListNetworksOptionsBuilder::default()
        .filters(&filters)
        .build();
    if let Ok(networks) = docker.list_networks(Some(options)).await {
        for network in networks.into_iter().filter_map(|n| n.id) {
            let _ = docker.remove_network(&network).await;
        }
    }
}

/// The last lines a container wrote, for diagnosing a failed test.
async fn logs(docker: &Docker, name: &str) -> String {
    let options = LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .tail("200")
        .build();
    let mut stream = docker.logs(name, Some(options));
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(output) => text.push_str(&String::from_utf8_lossy(&output.into_bytes())),
            Err(err) => {
                text.push_str(&format!("(no more logs: {err})"));
                break;
            }
        }
    }
    text
}

/// Why the service images cannot be built here, if they cannot.
async fn can_build_images(docker: &Docker) -> Result<(), String> {
    // SAFETY: geteuid cannot fail and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && docker.inspect_image(BASE_IMAGE).await.is_err() {
        return Err(format!(
            "{BASE_IMAGE} is missing and building it needs root: run deploy/images/base/build.sh as root"
        ));
    }
    Ok(())
}

/// `deploy/build-images.sh` with the binaries this test runs against, so the
/// containers never run stale code; the engine's build cache makes it quick
/// when they did not change. Builds kiln/base first if it is missing (about
/// a minute and a half, once per machine).
pub async fn build_service_images() -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/build-images.sh");
    let bin_dir = binary("kiln-agent")
        .parent()
        .context("binary dir")?
        .to_path_buf();
    for name in ["kiln-coordinator", "kiln"] {
        binary(name);
    }
    eprintln!(
        "building {COORDINATOR_IMAGE} and {AGENT_IMAGE} from {}",
        bin_dir.display()
    );
    let output = tokio::process::Command::new(&script)
        .args(["debug", "farm-test"])
        .env("KILN_BIN_DIR", &bin_dir)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("{} failed ({}):\n{said}", script.display(), output.status);
    }
    for line in said.lines().filter(|line| line.starts_with('[')) {
        eprintln!("{line}");
    }
    Ok(())
}

/// The engine's unix socket on this host, which the agents get mounted.
fn docker_socket() -> Result<PathBuf> {
    let host = std::env::var("DOCKER_HOST").unwrap_or_default();
    let path = match host.strip_prefix("unix://") {
        Some(path) => PathBuf::from(path),
        None if host.is_empty() => PathBuf::from("/var/run/docker.sock"),
        None => {
            bail!("DOCKER_HOST={host}: the farm mounts the engine's unix socket into its agents")
        }
    };
    Ok(path)
}

async fn list_agents(client: &mut ControlServiceClient<KilnChannel>) -> Result<Vec<pb::Agent>> {
    Ok(client
        .list_agents(pb::ListAgentsRequest {})
        .await?
        .into_inner()
        .agents)
}

fn same_path_binds(paths: &[&Path], mode: &str) -> Vec<String> {
    paths
        .iter()
        .map(|path| format!("{0}:{0}{mode}", path.display()))
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}
