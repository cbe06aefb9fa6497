//! Shared pieces of the delivery tests and `rollback-bench`: a pipeline
//! whose "model" is a text file, a stand-in model server whose error ratio
//! depends on the deployed model, a webhook receiver, and helpers to ship
//! a model through a farm.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::{CoordinatorOptions, Farm, Repo, wait_run};

/// The model pipeline; `serve` is where deploy stages copy the model,
/// `port` the model server's.
pub fn spec(serve: &Path, port: u16) -> String {
    let serve = serve.display();
    format!(
        r#"
pipeline: model
stages:
  train:
    commands: ["mkdir -p build/model", "cp model.txt build/model/weights"]
    artifacts: [build/model]
  evaluate:
    needs: [train]
    commands: ["mkdir -p build", "cp metrics.json build/metrics.json"]
    metrics: build/metrics.json
  deploy-staging:
    needs: [train, evaluate]
    environment: staging
    commands: ["cp build/model/weights {serve}/staging"]
  acceptance:
    needs: [deploy-staging]
    gate:
      require: {{ recall: ">= 0.5" }}
      compare_to: production
      max_regression: {{ recall: 0.1 }}
  deploy-production:
    needs: [train, acceptance]
    environment: production
    commands: ["cp build/model/weights {serve}/production"]
    monitor:
      scrape: http://127.0.0.1:{port}/metrics
      every: 200ms
      rollback_when: {{ model_error_ratio: "> 0.5" }}
      failure_limit: 3
      for: 60s
"#
    )
}

/// A stand-in model server: its error ratio depends on the deployed model.
pub struct ModelServer {
    pub port: u16,
    /// Scrapes served so far.
    pub scrapes: Arc<Mutex<u32>>,
    /// When it first served a breaching value.
    pub first_bad_at: Arc<Mutex<Option<Instant>>>,
}

/// Serves `model_error_ratio`: 0.9 while the deployed production model is
/// "bad", else 0.01.
pub async fn model_server(serve: PathBuf) -> Result<ModelServer> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let scrapes = Arc::new(Mutex::new(0));
    let first_bad_at = Arc::new(Mutex::new(None));
    let (counter, bad_at) = (scrapes.clone(), first_bad_at.clone());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let model = std::fs::read_to_string(serve.join("production")).unwrap_or_default();
            let bad = model.trim() == "bad";
            let ratio = if bad { 0.9 } else { 0.01 };
            if bad {
                bad_at.lock().unwrap().get_or_insert_with(Instant::now);
            }
            *counter.lock().unwrap() += 1;
            let mut buffer = [0u8; 2048];
            let _ = socket.read(&mut buffer).await;
            let body = format!("# TYPE model_error_ratio gauge\nmodel_error_ratio {ratio}\n");
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        }
    });
    Ok(ModelServer {
        port,
        scrapes,
        first_bad_at,
    })
}

/// A webhook receiver that keeps every body it gets.
pub async fn webhook() -> Result<(String, Arc<Mutex<Vec<String>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut buffer = [0u8; 8192];
                loop {
                    let Ok(n) = socket.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    data.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&data).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            kept.lock().unwrap().push(body.to_owned());
                            let _ = socket.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok((url, bodies))
}

/// A coordinator that posts alerts to `hook`, with one process agent.
pub fn farm(hook: &str) -> Result<Farm> {
    let options = CoordinatorOptions {
        extra_args: vec!["--alert-webhook-url".into(), hook.into()],
        ..Default::default()
    };
    Farm::start(&options, &[("deliver", "", 2)])
}

/// Commits a model and its metrics, registers, runs, waits.
pub async fn ship(farm: &Farm, repo: &Repo, model: &str, metrics: &str) -> Result<pb::Run> {
    ship_pipeline(farm, repo, "model", model, metrics).await
}

/// [`ship`] for a repository whose pipeline is called `pipeline`.
pub async fn ship_pipeline(
    farm: &Farm,
    repo: &Repo,
    pipeline: &str,
    model: &str,
    metrics: &str,
) -> Result<pb::Run> {
    repo.commit("model.txt", model)?;
    repo.commit("metrics.json", metrics)?;
    ship_run(farm, repo, pipeline).await
}

pub fn state(stage: &pb::Stage) -> pb::StageState {
    pb::StageState::try_from(stage.state).unwrap()
}

/// Releases of `environment` (`PIPELINE/ENV`, or `ENV` when only one
/// pipeline has it), newest first.
pub async fn history(farm: &Farm, environment: &str) -> Result<Vec<pb::Release>> {
    let mut client = farm.coordinator.client().await?;
    let (pipeline, environment) = kiln_common::ids::EnvKey::parse_reference(environment);
    let request = pb::EnvironmentHistoryRequest {
        environment: environment.into(),
        pipeline: pipeline.unwrap_or_default().into(),
    };
    Ok(client
        .environment_history(request)
        .await?
        .into_inner()
        .releases)
}

pub fn release_state(release: &pb::Release) -> pb::ReleaseState {
    pb::ReleaseState::try_from(release.state).unwrap()
}

/// The image the example's Python stages and model server run in.
pub const ML_IMAGE: &str = "kiln/python-ml:bookworm";

/// Whether the test `test` can use Docker and [`ML_IMAGE`]; `false` after
/// [`crate::skip::missing`] allowed it to skip.
pub async fn ml_image_ready(test: &str) -> Result<bool> {
    if crate::docker::engine(test).await?.is_none() {
        return Ok(false);
    }
    let image = Command::new("docker")
        .args(["image", "inspect", ML_IMAGE])
        .output()?;
    if !image.status.success() {
        crate::skip::missing(
            test,
            "kiln/python-ml:bookworm is missing (deploy/images/python-ml/build.sh builds it)",
        )?;
        return Ok(false);
    }
    Ok(true)
}

/// Containers of the scenery (model server, traffic), removed on drop.
pub struct Containers(pub Vec<String>);

impl Containers {
    /// `docker run -d` of [`ML_IMAGE`] on the host network, `mounts` at
    /// the same paths, in `workdir`.
    pub fn run(
        &mut self,
        name: &str,
        mounts: &[&Path],
        workdir: &Path,
        command: &[&str],
    ) -> Result<()> {
        let _ = Command::new("docker").args(["rm", "-f", name]).output();
        let mut docker = Command::new("docker");
        docker.args(["run", "-d", "--name", name, "--network", "host"]);
        for mount in mounts {
            docker.args(["-v", &format!("{0}:{0}", mount.display())]);
        }
        docker.args(["-w", &workdir.display().to_string(), ML_IMAGE]);
        let out = docker.args(command).output()?;
        if !out.status.success() {
            bail!(
                "docker run {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.0.push(name.to_owned());
        Ok(())
    }

    /// The last lines `name` wrote.
    pub fn logs(&self, name: &str) -> String {
        Command::new("docker")
            .args(["logs", "--tail", "30", name])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("docker").args(["rm", "-f", name]).output();
        }
    }
}

/// The example checked into `repo`, its kiln.yml passed through
/// `edit_kiln_yml` (build outputs and caches left out).
pub fn copy_example(repo: &Repo, edit_kiln_yml: impl Fn(&str) -> String) -> Result<()> {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/customer-behavior");
    copy_tree(&example, repo.path())?;
    let kiln_yml = std::fs::read_to_string(example.join("kiln.yml"))?;
    repo.commit("kiln.yml", &edit_kiln_yml(&kiln_yml))?;
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "build"
            || name == "__pycache__"
            || name == ".pytest_cache"
            || name == ".venv"
            || name == "kiln.yml"
        {
            continue;
        }
        let target: PathBuf = to.join(&name);
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// A loopback port nobody listened on a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Registers `repo` as it is, runs `pipeline`, waits for the run.
pub async fn ship_run(farm: &Farm, repo: &Repo, pipeline: &str) -> Result<pb::Run> {
    let register = farm
        .coordinator
        .kiln(&["pipeline", "register", repo.path().to_str().unwrap()]);
    assert_eq!(
        register.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&register.stderr)
    );
    let started = farm.coordinator.kiln(&["run", pipeline]);
    let id: u64 = String::from_utf8(started.stdout)?.trim().parse()?;
    let mut client = farm.coordinator.client().await?;
    wait_run(&mut client, id, Duration::from_secs(300)).await
}

/// The environment `name` of `pipeline`.
pub async fn environment(farm: &Farm, pipeline: &str, name: &str) -> Result<pb::Environment> {
    let mut client = farm.coordinator.client().await?;
    let environments = client
        .list_environments(pb::ListEnvironmentsRequest::default())
        .await?
        .into_inner()
        .environments;
    environments
        .into_iter()
        .find(|e| e.pipeline == pipeline && e.name == name)
        .with_context(|| format!("no environment {pipeline}/{name}"))
}

/// The newest 100 runs of every pipeline.
pub async fn all_runs(farm: &Farm) -> Result<Vec<pb::Run>> {
    let mut client = farm.coordinator.client().await?;
    Ok(client
        .list_runs(pb::ListRunsRequest {
            pipeline: String::new(),
            limit: 100,
        })
        .await?
        .into_inner()
        .runs)
}
