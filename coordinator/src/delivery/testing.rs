//! Test helpers shared by the delivery I/O tests: real Prometheus and
//! Alertmanager servers from Debian's packages on loopback, `promtool`, and
//! tiny in-process HTTP servers standing in for exporters and webhook
//! receivers.
//!
//! A missing binary fails the test, naming the package and
//! `tests/setup.sh`; only `KILN_ALLOW_SKIP=1` turns that into a printed
//! skip (the same opt-out as `kiln_tests::skip`, which this crate cannot
//! depend on).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// How long a server gets to answer `/-/ready` after it starts.
const START_LIMIT: Duration = Duration::from_secs(60);

/// Whether a missing server binary may skip the test rather than fail it.
fn skip_allowed() -> bool {
    std::env::var("KILN_ALLOW_SKIP").is_ok_and(|value| value == "1")
}

/// The path of `name` (`/usr/bin` or `PATH`), or `None` after printing why
/// `test` skips where skipping is allowed; panics otherwise.
pub(crate) fn binary(name: &str, test: &str) -> Option<PathBuf> {
    let search = std::env::var_os("PATH").unwrap_or_default();
    let found = std::iter::once(PathBuf::from("/usr/bin"))
        .chain(std::env::split_paths(&search))
        .map(|dir| dir.join(name))
        .find(|path| path.is_file());
    if found.is_none() {
        let reason =
            format!("{name} is not installed (apt-get install prometheus prometheus-alertmanager)");
        assert!(
            skip_allowed(),
            "{test}: {reason}; run tests/setup.sh, which installs and builds every test \
             prerequisite (or set KILN_ALLOW_SKIP=1 to skip such tests knowingly)"
        );
        // Straight to the file descriptor: the harness captures `eprintln!`,
        // and a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: {reason} (KILN_ALLOW_SKIP=1 is set)"
        );
    }
    found
}

/// Runs `promtool check metrics` on `text`: `Ok(output)` when it passes,
/// `Err(output)` with its complaints when it does not.
pub(crate) fn promtool_check_metrics(promtool: &Path, text: &str) -> Result<String, String> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting promtool");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(text.as_bytes())
        .expect("writing to promtool");
    let output = child.wait_with_output().expect("waiting for promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(report)
    } else {
        Err(report)
    }
}

/// A server process on loopback with its own data directory; killed and
/// removed when dropped.
pub(crate) struct Server {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub(crate) url: String,
    child: Child,
    /// Configuration, storage and the server's log.
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `binary` with `args` plus `--web.listen-address` on a free
    /// port, and waits until it reports ready.
    async fn start(binary: &Path, dir: tempfile::TempDir, args: Vec<String>) -> Self {
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("server.log")).expect("server log");
        let child = Command::new(binary)
            .args(args)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("server log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {}: {error}", binary.display()));
        let mut server = Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
            dir,
        };
        server.wait_ready(binary).await;
        server
    }

    async fn wait_ready(&mut self, binary: &Path) {
        let client = reqwest::Client::new();
        let ready = format!("{}/-/ready", self.url);
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let answer = client
                .get(&ready)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if answer.is_ok_and(|response| response.status().is_success()) {
                return;
            }
            let exited = self.child.try_wait().expect("polling the server");
            if exited.is_some() || Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
                panic!(
                    "{} did not become ready at {ready} (exit: {exited:?}); its log:\n{log}",
                    binary.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A real Prometheus scraping `targets` (`host:port`) every second, or
/// `None` if the test skips.
pub(crate) async fn start_prometheus(test: &str, targets: &[SocketAddr]) -> Option<Server> {
    let binary = binary("prometheus", test)?;
    let dir = tempfile::tempdir().expect("temp dir");
    let targets = targets
        .iter()
        .map(|target| format!("'{target}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: targets\n    static_configs:\n      - targets: [{targets}]\n"
        ),
    )
    .expect("writing prometheus.yml");
    let args = vec![
        format!("--config.file={}", config.display()),
        format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
    ];
    Some(Server::start(&binary, dir, args).await)
}

/// A real Alertmanager (clustering off) routing everything to a receiver
/// that notifies nobody, or `None` if the test skips.
pub(crate) async fn start_alertmanager(test: &str) -> Option<Server> {
    let binary = binary("prometheus-alertmanager", test)?;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("alertmanager.yml");
    std::fs::write(
        &config,
        "route:\n  receiver: nobody\nreceivers:\n  - name: nobody\n",
    )
    .expect("writing alertmanager.yml");
    let args = vec![
        format!("--config.file={}", config.display()),
        format!("--storage.path={}", dir.path().join("data").display()),
        "--cluster.listen-address=".to_owned(),
    ];
    Some(Server::start(&binary, dir, args).await)
}

/// A port nobody listens on right now (bind, read, release).
pub(crate) fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local address").port()
}

/// An in-process axum server on loopback. It holds no state worth a
/// graceful end (and tests park requests forever), so stopping aborts the
/// task and awaits it; dropping aborts it too.
pub(crate) struct HttpStub {
    pub(crate) addr: SocketAddr,
    task: JoinHandle<()>,
}

impl HttpStub {
    pub(crate) async fn serve(router: axum::Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a test server");
        let addr = listener.local_addr().expect("local address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { addr, task }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the server and waits for its task to end.
    pub(crate) async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for HttpStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}
