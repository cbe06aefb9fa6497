//! Helpers for tests against Prometheus tooling from Debian's packages
//! (`prometheus`, which also ships `promtool`): a real Prometheus server on
//! loopback scraping given targets, its query API, and `promtool check
//! metrics`.
//!
//! A missing binary fails the test, naming the package to install (see
//! [`crate::skip`] for the one opt-out).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Process;

/// How long Prometheus gets to report ready.
const START_LIMIT: Duration = Duration::from_secs(60);

/// The path of `name` (`/usr/bin` or `PATH`); an error naming the package
/// when it is missing, or `None` after printing why `test` skips where
/// skipping is allowed.
pub fn binary(name: &str, test: &str) -> Result<Option<PathBuf>> {
    let search = std::env::var_os("PATH").unwrap_or_default();
    let found = std::iter::once(PathBuf::from("/usr/bin"))
        .chain(std::env::split_paths(&search))
        .map(|dir| dir.join(name))
        .find(|path| path.is_file());
    if found.is_some() {
        return Ok(found);
    }
    crate::skip::missing(
        test,
        &format!("{name} is not installed (apt-get install prometheus prometheus-alertmanager)"),
    )?;
    Ok(None)
}

/// `promtool check metrics` on `text`: its (usually empty) report when it
/// passes, an error quoting its complaints when it does not.
pub fn promtool_check_metrics(promtool: &Path, text: &str) -> Result<String> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!(
            "promtool check metrics failed ({}):\n{report}",
            output.status
        );
    }
    Ok(report)
}

/// A Prometheus server on loopback with a throwaway data directory; killed
/// when dropped.
pub struct Prometheus {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    process: Process,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`, path `/metrics`)
    /// every second as job `kiln`; `None` if `test` skips.
    pub fn start(test: &str, targets: &[&str]) -> Result<Option<Self>> {
        Self::start_with_rules(test, "kiln", targets, &[])
    }

    /// [`Prometheus::start`] with the scrape job named `job` and the rule
    /// files `rules` loaded, evaluated every second.
    pub fn start_with_rules(
        test: &str,
        job: &str,
        targets: &[&str],
        rules: &[&Path],
    ) -> Result<Option<Self>> {
        let Some(binary) = binary("prometheus", test)? else {
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|target| format!("'{target}'")).collect();
        let rules: Vec<String> = rules
            .iter()
            .map(|path| format!("'{}'", path.display()))
            .collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [{}]\n\
                 scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                rules.join(", "),
                targets.join(", ")
            ),
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut prometheus = Self {
            addr,
            process: Process {
                child,
                name: "prometheus".into(),
            },
            dir,
        };
        prometheus.wait_ready()?;
        Ok(Some(prometheus))
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if http_get(&self.addr, "/-/ready").is_ok_and(|(status, _)| status == 200) {
                return Ok(());
            }
            let exited = self.process.child.try_wait()?;
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.path().join("prometheus.log"))
                    .unwrap_or_default();
                bail!("prometheus did not become ready (exit: {exited:?}); its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `data` of an instant query, or an error with Prometheus's answer.
    pub fn query(&self, promql: &str) -> Result<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, body) = http_get(&self.addr, &path)?;
        let answer: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("prometheus answered HTTP {status}: {body}"))?;
        if answer["status"] != "success" {
            bail!("prometheus rejected {promql:?}: {answer}");
        }
        Ok(answer["data"].clone())
    }
}

/// A GET over HTTP/1.0 (so no chunked encoding to undo): status and body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        bail!("no HTTP response from {addr}{path}: {response:?}");
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status line from {addr}{path}: {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Query-string encoding: unreserved characters as they are, the rest as
/// `%XX` bytes.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// A real Alertmanager on loopback (clustering off, routing to a receiver
/// that notifies nobody); `None` if `test` skips.
pub struct Alertmanager {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    _process: Process,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    pub fn start(test: &str) -> Result<Option<Self>> {
        let Some(binary) = binary("prometheus-alertmanager", test)? else {
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(
            &config,
            "route:\n  receiver: nobody\nreceivers:\n  - name: nobody\n",
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("alertmanager.log"))?;
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--cluster.listen-address=")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let process = Process {
            child,
            name: "alertmanager".into(),
        };
        let deadline = Instant::now() + START_LIMIT;
        while !http_get(&addr, "/-/ready").is_ok_and(|(status, _)| status == 200) {
            if Instant::now() > deadline {
                bail!("alertmanager did not become ready at {addr}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Some(Self {
            addr,
            _process: process,
            _dir: dir,
        }))
    }

    /// The alerts Alertmanager holds, as JSON.
    pub fn alerts(&self) -> Result<serde_json::Value> {
        let (_, body) = http_get(&self.addr, "/api/v2/alerts")?;
        Ok(serde_json::from_str(&body)?)
    }
}
