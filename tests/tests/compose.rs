//! `deploy/compose.sh` end to end, with whichever Compose this machine has
//! (Debian's docker-compose 1.29, which has no `up --wait`, or v2): the farm
//! of deploy/docker-compose.yml comes up, runs a pipeline on its two
//! containerized docker agents, goes down with its volumes and comes up
//! again with the agents' old token still in the host file — which the
//! script must replace, or the agents would retry forever.
//!
//! Also here, without Docker: an agent whose token the coordinator refuses
//! says so, rather than that it cannot reach the coordinator.
//!
//! Needs the Docker engine, docker-compose, and kiln/base:bookworm (or root
//! to build it); `tests/setup.sh` provides them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kiln_tests::docker::TEST_IMAGE;
use kiln_tests::{Coordinator, CoordinatorOptions, Repo, binary};

/// The compose project under test, with its own ports, work dirs, token
/// file and project name, so it never meets a real deployment on this host.
struct ComposeFarm {
    env: Vec<(&'static str, String)>,
    grpc_port: u16,
    token_file: PathBuf,
    /// Set at the end of the test; until then dropping prints the logs.
    passed: bool,
    _dir: tempfile::TempDir,
}

impl ComposeFarm {
    fn new(test: &str, repos: &Path) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let grpc_port = free_port()?;
        let token_file = dir.path().join("agent.token");
        let env = vec![
            (
                "COMPOSE_PROJECT_NAME",
                format!("kiln-{test}-{}", std::process::id()),
            ),
            ("KILN_TAG", "farm-test".to_owned()),
            ("KILN_GRPC_PORT", grpc_port.to_string()),
            ("KILN_HTTP_PORT", free_port()?.to_string()),
            (
                "KILN_AGENT_DIR_PREFIX",
                dir.path().join("agent").display().to_string(),
            ),
            (
                "KILN_AGENT_TOKEN_HOST_FILE",
                token_file.display().to_string(),
            ),
            ("KILN_REPOS", repos.display().to_string()),
            ("RUST_LOG", "info".to_owned()),
        ];
        Ok(Self {
            env,
            grpc_port,
            token_file,
            passed: false,
            _dir: dir,
        })
    }

    /// `deploy/compose.sh ARGS`; fails unless it succeeds.
    fn compose(&self, args: &[&str]) -> Result<String> {
        let output = self.compose_output(args)?;
        let said = said(&output);
        ensure!(
            output.status.success(),
            "deploy/compose.sh {args:?} failed ({}):\n{said}",
            output.status
        );
        Ok(said)
    }

    fn compose_output(&self, args: &[&str]) -> Result<Output> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose.sh");
        Command::new(&script)
            .args(args)
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", script.display()))
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// `kiln ARGS` on this host against the farm, as its bootstrap admin.
    fn kiln(&self, args: &[&str]) -> Result<String> {
        let admin = self.compose(&[
            "exec",
            "-T",
            "coordinator",
            "cat",
            "/var/lib/kiln/admin.token",
        ])?;
        let output = Command::new(binary("kiln"))
            .args(args)
            .env("KILN_COORDINATOR", self.url())
            .env("KILN_TOKEN", admin.trim())
            .env_remove("KILN_TOKEN_FILE")
            .stdin(Stdio::null())
            .output()?;
        let said = said(&output);
        ensure!(
            output.status.success(),
            "kiln {args:?} failed ({}):\n{said}",
            output.status
        );
        Ok(said)
    }

    /// Registers `repo` and runs its pipeline to the end; fails unless the
    /// run succeeds.
    fn run_pipeline(&self, repo: &Repo) -> Result<String> {
        self.kiln(&["pipeline", "register", &repo.path().display().to_string()])?;
        self.kiln(&["run", "compose-check", "--wait"])
    }
}

impl Drop for ComposeFarm {
    fn drop(&mut self) {
        if !self.passed
            && let Ok(output) = self.compose_output(&["logs", "--tail", "50"])
        {
            eprintln!("the compose services' logs:\n{}", said(&output));
        }
        let _ = self.compose_output(&["down", "-v", "--remove-orphans"]);
    }
}

fn said(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Whether some Compose answers here (v2 or the standalone 1.x).
fn compose_installed() -> bool {
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    works("docker", &["compose", "version"]) || works("docker-compose", &["version"])
}

#[tokio::test(flavor = "multi_thread")]
async fn compose_up_runs_a_pipeline_and_comes_back_after_down_v() -> Result<()> {
    const TEST: &str = "compose";
    if kiln_tests::docker::engine(TEST).await?.is_none() {
        return Ok(());
    }
    if !compose_installed() {
        kiln_tests::skip::missing(
            TEST,
            "docker-compose is not installed (apt-get install docker-compose)",
        )?;
        return Ok(());
    }
    kiln_tests::farm::build_service_images().await?;

    // One stage per agent label, so both containerized agents run one.
    let repo = Repo::new(&format!(
        r#"pipeline: compose-check
defaults:
  image: {TEST_IMAGE}
  timeout: 1m
stages:
  build:
    agent: {{ labels: {{ role: build }} }}
    commands: ["test -f kiln.yml", "echo built on $(hostname)"]
  deploy:
    needs: [build]
    agent: {{ labels: {{ role: deploy }} }}
    commands: ["echo deployed"]
"#
    ))?;
    // The coordinator and agents (uid 10001) read the repository.
    std::fs::set_permissions(
        repo.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let mut farm = ComposeFarm::new(TEST, repo.path())?;

    let started = Instant::now();
    let up = farm.compose(&["up", "-d"])?;
    ensure!(
        up.contains("2 agent(s) are connected"),
        "up -d returned before both agents connected:\n{up}"
    );
    eprintln!("compose up -d: {:?}", started.elapsed());
    let ps = farm.compose(&["ps"])?;
    for service in ["coordinator", "agent-1", "agent-2"] {
        ensure!(ps.contains(service), "ps does not list {service}:\n{ps}");
    }
    let ran = farm.run_pipeline(&repo)?;
    ensure!(ran.contains("succeeded"), "the run did not succeed:\n{ran}");
    let logs = farm.compose(&["logs", "--tail", "200"])?;
    ensure!(
        logs.contains("agent-1") && logs.contains("agent-2"),
        "logs show no agent:\n{logs}"
    );

    // down -v removes the coordinator's data: the agents' token is now
    // meaningless. Put it back, as an operator's backup or the old script
    // would have left it: `up` must notice and replace it.
    let stale_token = std::fs::read_to_string(&farm.token_file)?;
    let down = farm.compose(&["down", "-v"])?;
    ensure!(
        !farm.token_file.exists(),
        "down -v left the token file:\n{down}"
    );
    std::fs::write(&farm.token_file, &stale_token)?;
    let up = farm.compose(&["up", "-d"])?;
    ensure!(
        up.contains("refuses the agents' token") && up.contains("2 agent(s) are connected"),
        "the second up did not replace the stale token:\n{up}"
    );
    ensure!(
        std::fs::read_to_string(&farm.token_file)? != stale_token,
        "the token file still holds the stale token"
    );
    let ran = farm.run_pipeline(&repo)?;
    ensure!(
        ran.contains("succeeded"),
        "the run after down -v / up did not succeed:\n{ran}"
    );
    farm.compose(&["down", "-v"])?;
    farm.passed = true;
    Ok(())
}

#[tokio::test]
async fn an_agent_whose_token_is_refused_says_so() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let work = tempfile::tempdir()?;
    let mut agent = Command::new(binary("kiln-agent"))
        .args(["--coordinator", &coordinator.url(), "--name", "stale"])
        .args(["--executor", "process", "--work-dir"])
        .arg(work.path())
        .env("KILN_AGENT_TOKEN", "kiln_not-a-token-this-coordinator-made")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = agent.stderr.take().context("agent stderr")?;
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let done = line.contains("token refused") || line.contains("cannot reach");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reader.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let seen = reader.join().expect("reader thread").join("\n");
    ensure!(
        seen.contains("token refused by the coordinator"),
        "the agent did not say its token was refused:\n{seen}"
    );
    ensure!(
        !seen.contains("cannot reach"),
        "the agent blamed the network:\n{seen}"
    );
    Ok(())
}
