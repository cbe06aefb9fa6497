//! The systemd units in `deploy/systemd/` and the daemons' side of
//! `Type=notify`.
//!
//! The units are checked by systemd's own `systemd-analyze verify` (every
//! complaint, even one it only warns about, fails the test) and `security
//! --offline` (an exposure ceiling per unit), with `/usr/local/bin/` pointed
//! at this build's binaries, since verify insists the `ExecStart` program
//! exists. Readiness is checked without systemd: the daemons get a
//! `NOTIFY_SOCKET` this test listens on, as systemd would give them.
//!
//! Needs `systemd-analyze` (Debian's `systemd`; `tests/setup.sh` installs it).

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use kiln_tests::{Coordinator, CoordinatorOptions, Process, binary};

/// Each unit and the highest `systemd-analyze security` exposure it may
/// have (0 = locked down, 10 = wide open). The process agent is looser:
/// its stage commands run inside its sandbox and may need a JIT or any
/// system call.
const UNITS: &[(&str, f64)] = &[
    ("kiln-coordinator.service", 2.0),
    ("kiln-agent.service", 3.5),
    ("kiln-agent-docker.service", 2.0),
];

fn systemd_analyze(test: &str) -> Result<Option<PathBuf>> {
    let path = PathBuf::from("/usr/bin/systemd-analyze");
    if path.is_file() {
        return Ok(Some(path));
    }
    kiln_tests::skip::missing(
        test,
        "systemd-analyze is not installed (apt-get install systemd)",
    )?;
    Ok(None)
}

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

/// `unit`'s text with `/usr/local/bin/` replaced by this build's binaries,
/// written to `dir`.
fn unit_for_this_build(unit: &str, dir: &Path) -> Result<(String, PathBuf)> {
    let text = std::fs::read_to_string(units_dir().join(unit))
        .with_context(|| format!("reading deploy/systemd/{unit}"))?;
    let bin_dir = binary("kiln-agent")
        .parent()
        .context("binary dir")?
        .display()
        .to_string();
    let path = dir.join(unit);
    std::fs::write(
        &path,
        text.replace("/usr/local/bin/", &format!("{bin_dir}/")),
    )?;
    Ok((text, path))
}

/// `systemd-analyze verify` on `unit`: everything it said, or an error
/// when it failed or said anything at all.
fn verify(analyze: &Path, unit: &Path) -> Result<()> {
    let output = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(unit)
        .stdin(Stdio::null())
        .output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() || !said.trim().is_empty() {
        bail!(
            "systemd-analyze verify {} ({}):\n{said}",
            unit.display(),
            output.status
        );
    }
    Ok(())
}

#[test]
fn the_units_pass_systemd_analyze_verify_and_are_hardened() -> Result<()> {
    const TEST: &str = "the_units_pass_systemd_analyze_verify_and_are_hardened";
    let Some(analyze) = systemd_analyze(TEST)? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    for &(unit, ceiling) in UNITS {
        let (text, path) = unit_for_this_build(unit, dir.path())?;
        verify(&analyze, &path)?;
        for directive in [
            "Type=notify",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "StateDirectory=kiln",
            "CapabilityBoundingSet=\n",
        ] {
            ensure!(text.contains(directive), "{unit} lacks {directive:?}");
        }
        let docker_group = text.contains("SupplementaryGroups=docker");
        ensure!(
            docker_group == unit.contains("docker"),
            "{unit}: only the docker agent may be in the docker group"
        );
        let security = Command::new(&analyze)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(format!("--threshold={}", (ceiling * 10.0) as u32))
            .arg(&path)
            .stdin(Stdio::null())
            .output()?;
        let report = String::from_utf8_lossy(&security.stdout);
        let overall = report
            .lines()
            .find(|line| line.contains("Overall exposure level"))
            .with_context(|| format!("no overall exposure for {unit}:\n{report}"))?;
        let level: f64 = overall
            .split(':')
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse().ok())
            .with_context(|| format!("cannot read {overall:?}"))?;
        ensure!(
            level <= ceiling,
            "{unit}: exposure {level} is over {ceiling}:\n{report}"
        );
    }

    // The check itself can fail: a misspelt directive is reported.
    let (_, path) = unit_for_this_build("kiln-coordinator.service", dir.path())?;
    let broken = std::fs::read_to_string(&path)?.replace("ProtectSystem=", "ProtectSystm=");
    std::fs::write(&path, broken)?;
    let complaint = verify(&analyze, &path).expect_err("a misspelt directive passed verify");
    ensure!(
        complaint.to_string().contains("ProtectSystm"),
        "{complaint}"
    );
    Ok(())
}

/// A datagram socket standing in for systemd's `NOTIFY_SOCKET`.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path)?;
        Ok(Self {
            socket,
            path,
            _dir: dir,
        })
    }

    /// The next notification, or an error after `limit`.
    fn next(&self, limit: Duration) -> Result<String> {
        self.socket.set_read_timeout(Some(limit))?;
        let mut buffer = [0u8; 4096];
        let len = self
            .socket
            .recv(&mut buffer)
            .with_context(|| format!("no notification within {limit:?}"))?;
        Ok(String::from_utf8_lossy(&buffer[..len]).into_owned())
    }
}

#[test]
fn the_coordinator_notifies_ready_once_listening_and_stopping_on_sigterm() -> Result<()> {
    let notify = NotifySocket::bind()?;
    let data = tempfile::tempdir()?;
    let mut child = Command::new(binary("kiln-coordinator"))
        .args(["--data-dir".as_ref(), data.path().as_os_str()])
        .args(["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &notify.path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut coordinator = Process {
        child,
        name: "kiln-coordinator".into(),
    };
    let ready = notify.next(Duration::from_secs(20))?;
    ensure!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // Ready means listening: the announced gRPC port accepts at once.
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let grpc = line
        .split_whitespace()
        .find_map(|part| part.strip_prefix("grpc="))
        .with_context(|| format!("no address in {line:?}"))?;
    std::net::TcpStream::connect(grpc).with_context(|| format!("connecting to {grpc}"))?;

    // The datagram waits in the socket until read.
    let status = coordinator.terminate(Duration::from_secs(30))?;
    ensure!(status.success(), "the coordinator exited with {status}");
    let stopping = notify.next(Duration::from_secs(1))?;
    ensure!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    Ok(())
}

#[test]
fn the_agent_notifies_ready_and_stopping() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let notify = NotifySocket::bind()?;
    let work = tempfile::tempdir()?;
    let child = Command::new(binary("kiln-agent"))
        .args(["--coordinator", &coordinator.url(), "--name", "notified"])
        .args(["--executor", "process", "--work-dir"])
        .arg(work.path())
        .env("KILN_AGENT_TOKEN", &coordinator.agent_token)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut agent = Process {
        child,
        name: "kiln-agent".into(),
    };
    let ready = notify.next(Duration::from_secs(20))?;
    ensure!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    let status = agent.terminate(Duration::from_secs(40))?;
    ensure!(status.success(), "the agent exited with {status}");
    let stopping = notify.next(Duration::from_secs(1))?;
    ensure!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    Ok(())
}
