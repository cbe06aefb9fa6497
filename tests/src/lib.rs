//! Helpers for Kiln's end-to-end tests and the benchmark: real
//! `kiln-coordinator`, `kiln-agent` and `kiln` processes on 127.0.0.1, and
//! throwaway git repositories holding a `kiln.yml`.
//!
//! The binaries come from the same target directory as the test executable
//! (`cargo build --workspace` builds them; the README's test command does).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kiln_common::channel::{KilnChannel, Token};
use kiln_proto::v1 as pb;
use pb::control_service_client::ControlServiceClient;
use tonic::transport::Channel;

pub mod browser;
pub mod delivery;
pub mod docker;
pub mod farm;
pub mod prom;
pub mod skip;

/// Path of a workspace binary next to the running test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing; build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

/// A child process that is killed when dropped, so a failing test leaves
/// nothing behind.
pub struct Process {
    pub child: Child,
    pub name: String,
}

impl Process {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `limit` for a clean exit.
    pub fn terminate(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {limit:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A coordinator process with its data dir.
pub struct Coordinator {
    pub process: Process,
    pub grpc: String,
    pub http: String,
    pub data_dir: PathBuf,
    /// The bootstrap admin token the coordinator wrote on first start.
    pub admin_token: String,
    /// An agent token created for this test's agents.
    pub agent_token: String,
}

/// The tokens of every coordinator this test process started, by URL, so
/// [`kiln`] and [`start_agent`] (which only get a URL) can authenticate.
static TOKENS: Mutex<Option<HashMap<String, (String, String)>>> = Mutex::new(None);

/// Makes [`kiln`] and [`start_agent`] use these tokens for `url`.
pub fn register_tokens(url: &str, admin: &str, agent: &str) {
    TOKENS
        .lock()
        .expect("token registry poisoned")
        .get_or_insert_with(HashMap::new)
        .insert(url.to_owned(), (admin.to_owned(), agent.to_owned()));
}

fn tokens_for(url: &str) -> Option<(String, String)> {
    TOKENS
        .lock()
        .expect("token registry poisoned")
        .as_ref()
        .and_then(|tokens| tokens.get(url).cloned())
}

/// Waits for the bootstrap admin token a coordinator writes into its data
/// dir on first start.
pub fn read_admin_token(data_dir: &Path, limit: Duration) -> Result<String> {
    let path = data_dir.join("admin.token");
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(text) = std::fs::read_to_string(&path)
            && !text.trim().is_empty()
        {
            return Ok(text.trim().to_owned());
        }
        if Instant::now() > deadline {
            bail!("{} did not appear within {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A channel to `url` that sends `token` with every request.
pub async fn channel(url: &str, token: &str) -> Result<KilnChannel> {
    let channel = Channel::from_shared(url.to_owned())?.connect().await?;
    Ok(KilnChannel::new(channel, Some(&Token::new(token)?)))
}

/// Creates a token with `role` through the API and returns its secret.
pub async fn create_token(url: &str, admin: &str, name: &str, role: pb::Role) -> Result<String> {
    let mut client = ControlServiceClient::new(channel(url, admin).await?);
    let created = client
        .create_token(pb::CreateTokenRequest {
            name: name.to_owned(),
            role: role as i32,
            pipeline: String::new(),
        })
        .await?
        .into_inner();
    Ok(created.secret)
}

/// Unique token names across the coordinators of one test process.
fn next_token_name(kind: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{kind}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Settings for [`Coordinator::start`].
#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    pub lease_ttl: &'static str,
    pub heartbeat: &'static str,
    /// `127.0.0.1:0` for any free port; a fixed one to restart in place.
    pub grpc: String,
    /// More flags for `kiln-coordinator`.
    pub extra_args: Vec<String>,
    /// Flags `kiln` needs to reach it (`--ca-file`, a client certificate);
    /// with any, the coordinator is reached over `https://127.0.0.1:PORT`.
    pub client_args: Vec<String>,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        Self {
            lease_ttl: "3s",
            heartbeat: "300ms",
            grpc: "127.0.0.1:0".into(),
            extra_args: Vec::new(),
            client_args: Vec::new(),
        }
    }
}

impl Coordinator {
    pub fn start(data_dir: &Path, options: &CoordinatorOptions) -> Result<Self> {
        let mut child = Command::new(binary("kiln-coordinator"))
            .args(["--data-dir".as_ref(), data_dir.as_os_str()])
            .args(["--grpc", &options.grpc, "--http", "127.0.0.1:0"])
            .args([
                "--lease-ttl",
                options.lease_ttl,
                "--heartbeat",
                options.heartbeat,
            ])
            .args(&options.extra_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting kiln-coordinator")?;
        let stdout = child.stdout.take().context("coordinator stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|part| part.strip_prefix(name))
                .map(str::to_owned)
        };
        let (Some(grpc), Some(http)) = (field("grpc="), field("http=")) else {
            bail!("kiln-coordinator did not announce its addresses; it said: {line:?}");
        };
        let process = Process {
            child,
            name: "kiln-coordinator".into(),
        };
        let url = if options.client_args.is_empty() {
            format!("http://{grpc}")
        } else {
            let port = grpc.rsplit(':').next().unwrap_or_default();
            format!("https://127.0.0.1:{port}")
        };
        let admin_token = read_admin_token(data_dir, Duration::from_secs(10))?;
        // Created with the CLI like an operator would, retried while the
        // listener comes up (this runs inside async tests: no runtime here).
        let agent_token = {
            let name = next_token_name("agents");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let output = Command::new(binary("kiln"))
                    .args(&options.client_args)
                    .args(["token", "create", &name, "--role", "agent"])
                    .env("KILN_COORDINATOR", &url)
                    .env("KILN_TOKEN", &admin_token)
                    .stdin(Stdio::null())
                    .output()?;
                if output.status.success() {
                    break String::from_utf8(output.stdout)?.trim().to_owned();
                }
                if Instant::now() > deadline {
                    bail!(
                        "cannot create an agent token: {}",
                        String::from_utf8_lossy(&output.stderr)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        register_tokens(&url, &admin_token, &agent_token);
        Ok(Self {
            process,
            grpc,
            http,
            data_dir: data_dir.to_path_buf(),
            admin_token,
            agent_token,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Kills the coordinator with SIGKILL, waits `down`, and starts a new
    /// one on the same data dir and the same gRPC address (`options` but
    /// for the address), as a crash and a supervisor's restart would.
    pub fn crash_and_restart(
        &mut self,
        options: &CoordinatorOptions,
        down: Duration,
    ) -> Result<()> {
        self.process.kill9();
        std::thread::sleep(down);
        let options = CoordinatorOptions {
            grpc: self.grpc.clone(),
            ..options.clone()
        };
        *self = Coordinator::start(&self.data_dir, &options)?;
        Ok(())
    }

    /// A channel authenticated as the bootstrap admin.
    pub async fn channel(&self) -> Result<KilnChannel> {
        channel(&self.url(), &self.admin_token).await
    }

    pub async fn client(&self) -> Result<ControlServiceClient<KilnChannel>> {
        Ok(ControlServiceClient::new(self.channel().await?))
    }

    /// Runs `kiln ARGS` against this coordinator.
    pub fn kiln(&self, args: &[&str]) -> Output {
        kiln(&self.url(), args)
    }

    /// Stores the secret `name` (a webhook's key, a forge token).
    pub async fn set_secret(&self, name: &str, value: &str) -> Result<()> {
        self.client()
            .await?
            .set_secret(pb::SetSecretRequest {
                name: name.into(),
                value: value.into(),
            })
            .await?;
        Ok(())
    }

    /// `kiln repo add REPO OPTIONS...`, which must succeed; its output.
    pub fn add_repo(&self, repo: &Repo, options: &[&str]) -> Result<String> {
        let mut args = vec!["repo", "add", repo.path().to_str().expect("a UTF-8 path")];
        args.extend_from_slice(options);
        let added = self.kiln(&args);
        ensure!(
            added.status.success(),
            "kiln {args:?}: {}",
            String::from_utf8_lossy(&added.stderr)
        );
        Ok(String::from_utf8_lossy(&added.stdout).into_owned())
    }
}

/// Runs the CLI against `url` as the coordinator's admin and returns what
/// it did.
pub fn kiln(url: &str, args: &[&str]) -> Output {
    kiln_command(url, args).output().expect("running kiln")
}

/// `kiln ARGS` against `url` as the coordinator's admin, not yet started:
/// for a CLI that runs while the test does something else.
pub fn kiln_command(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(binary("kiln"));
    command
        .args(args)
        .env("KILN_COORDINATOR", url)
        .env("USER", "tester")
        .stdin(Stdio::null());
    if let Some((admin, _)) = tokens_for(url) {
        command.env("KILN_TOKEN", admin);
    }
    command
}

/// Runs the CLI against `url` with `token` (none: no token at all) and
/// `stdin` as its standard input.
pub fn kiln_as(url: &str, token: Option<&str>, stdin: &[u8], args: &[&str]) -> Result<Output> {
    use std::io::Write;
    let mut command = Command::new(binary("kiln"));
    command
        .args(args)
        .env("KILN_COORDINATOR", url)
        .env("USER", "tester")
        .env_remove("KILN_TOKEN")
        .env_remove("KILN_TOKEN_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(token) = token {
        command.env("KILN_TOKEN", token);
    }
    let mut child = command.spawn().context("running kiln")?;
    // Dropping the pipe after writing is the end of input.
    child.stdin.take().context("kiln stdin")?.write_all(stdin)?;
    Ok(child.wait_with_output()?)
}

/// Starts `kiln-agent` with the process executor.
pub fn start_agent(
    url: &str,
    name: &str,
    labels: &str,
    capacity: u32,
    work_dir: &Path,
) -> Result<Process> {
    let (_, agent_token) = tokens_for(url)
        .with_context(|| format!("no coordinator at {url} was started by this test"))?;
    let child = Command::new(binary("kiln-agent"))
        .args(["--coordinator", url, "--name", name, "--labels", labels])
        .args(["--capacity", &capacity.to_string(), "--executor", "process"])
        .args(["--work-dir".as_ref(), work_dir.as_os_str()])
        .env("KILN_AGENT_TOKEN", agent_token)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting kiln-agent")?;
    Ok(Process {
        child,
        name: format!("kiln-agent {name}"),
    })
}

/// A git repository in a temp dir with a committed `kiln.yml`.
pub struct Repo {
    pub dir: tempfile::TempDir,
}

impl Repo {
    pub fn new(kiln_yml: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        git(dir.path(), &["init", "-q", "-b", "main"])?;
        let repo = Self { dir };
        repo.commit("kiln.yml", kiln_yml)?;
        Ok(repo)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `git ARGS` in the repository, which must succeed; its output, trimmed.
    pub fn git(&self, args: &[&str]) -> Result<String> {
        Ok(git(self.path(), args)?.trim().to_owned())
    }

    /// Writes `file` and commits it; returns the commit id.
    pub fn commit(&self, file: &str, text: &str) -> Result<String> {
        let path = self.path().join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text)?;
        git(self.path(), &["add", "-A"])?;
        git(
            self.path(),
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit",
                "-q",
                // Re-committing unchanged content is fine in tests.
                "--allow-empty",
                "-m",
                file,
            ],
        )?;
        let head = git(self.path(), &["rev-parse", "HEAD"])?;
        Ok(head.trim().to_owned())
    }
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new("git").arg("-C").arg(dir).args(args).output()?;
    if !output.status.success() {
        bail!(
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The run as the coordinator has it.
pub async fn get_run(client: &mut ControlServiceClient<KilnChannel>, run: u64) -> Result<pb::Run> {
    Ok(client
        .get_run(pb::GetRunRequest { run_id: run })
        .await?
        .into_inner())
}

/// Waits for the run to finish and returns it.
pub async fn wait_run(
    client: &mut ControlServiceClient<KilnChannel>,
    run: u64,
    limit: Duration,
) -> Result<pb::Run> {
    let client = client.clone();
    eventually(limit, &format!("run {run} to finish"), move || {
        let mut client = client.clone();
        async move {
            let run = get_run(&mut client, run).await?;
            let done = matches!(
                pb::RunState::try_from(run.state)?,
                pb::RunState::Succeeded | pb::RunState::Failed | pb::RunState::Cancelled
            );
            Ok(done.then_some(run))
        }
    })
    .await
}

/// The stage of `run` called `name`.
pub fn stage<'a>(run: &'a pb::Run, name: &str) -> &'a pb::Stage {
    run.stages
        .iter()
        .find(|stage| stage.name == name)
        .unwrap_or_else(|| panic!("run {} has no stage {name}", run.id))
}

/// Every log line of the run, as `stage: text`.
pub async fn logs(
    client: &mut ControlServiceClient<KilnChannel>,
    run: u64,
    stage: &str,
) -> Result<Vec<pb::LogEntry>> {
    let request = pb::StreamLogsRequest {
        run_id: run,
        stage: stage.into(),
        follow: false,
        resume: Vec::new(),
    };
    let mut stream = client.stream_logs(request).await?.into_inner();
    let mut entries = Vec::new();
    while let Some(entry) = stream.message().await? {
        entries.push(entry);
    }
    Ok(entries)
}

/// Whether a process with this pid still exists.
pub fn alive(pid: i32) -> bool {
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Peak resident set size of a process (VmHWM), in MB.
pub fn peak_rss_mb(pid: i32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .context("VmHWM missing")?;
    Ok(kb / 1024.0)
}

/// Writes `size` bytes of deterministic pseudo-random data to `path`,
/// streaming (xorshift, so it does not compress to nothing).
pub fn write_generated(path: &Path, size: u64, seed: u64) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

/// Registers the pipeline of `repo` (its committed kiln.yml, branch
/// `main`) over gRPC as the admin; returns the pipeline's name.
pub async fn register(coordinator: &Coordinator, repo: &Repo) -> Result<String> {
    let spec_yaml = std::fs::read_to_string(repo.path().join("kiln.yml"))?;
    let pipeline = coordinator
        .client()
        .await?
        .register_pipeline(pb::RegisterPipelineRequest {
            file_name: "kiln.yml".into(),
            spec_yaml,
            repo: repo.path().display().to_string(),
            branch: "main".into(),
            subdir: String::new(),
            path: String::new(),
        })
        .await?
        .into_inner()
        .pipeline
        .context("the coordinator returned no pipeline")?;
    Ok(pipeline.name)
}

/// Registers the pipeline of `repo` and triggers a run at the branch head;
/// returns the run id.
pub async fn register_and_run(coordinator: &Coordinator, repo: &Repo) -> Result<u64> {
    let pipeline = register(coordinator, repo).await?;
    let run = coordinator
        .client()
        .await?
        .trigger_run(pb::TriggerRunRequest {
            pipeline,
            triggered_by: "test".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(run.id)
}

/// A coordinator and its agents, stopped (and their dirs removed) when
/// dropped.
pub struct Farm {
    pub coordinator: Coordinator,
    pub agents: Vec<Process>,
    pub dirs: Vec<tempfile::TempDir>,
}

impl Farm {
    /// Starts a coordinator with `options` and one process agent per
    /// `(name, labels, capacity)`.
    pub fn start(options: &CoordinatorOptions, agents: &[(&str, &str, u32)]) -> Result<Self> {
        let data = tempfile::tempdir()?;
        let coordinator = Coordinator::start(data.path(), options)?;
        let mut farm = Self {
            coordinator,
            agents: Vec::new(),
            dirs: vec![data],
        };
        for (name, labels, capacity) in agents {
            let work = tempfile::tempdir()?;
            let agent = start_agent(
                &farm.coordinator.url(),
                name,
                labels,
                *capacity,
                work.path(),
            )?;
            farm.agents.push(agent);
            farm.dirs.push(work);
        }
        Ok(farm)
    }
}
