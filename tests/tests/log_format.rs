//! `--log-format json|text` on both daemons: with json every stderr line
//! is one JSON object a log shipper can take as it is; with text, output
//! that is not a terminal carries no colour escape codes.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kiln_tests::{Coordinator, CoordinatorOptions, Process, binary};

/// Starts `kiln-coordinator` with `format`, lets it start up and shut down
/// cleanly, and returns its stderr.
fn coordinator_log(format: &str) -> Result<String> {
    let data = tempfile::tempdir()?;
    let mut child = Command::new(binary("kiln-coordinator"))
        .args(["--data-dir".as_ref(), data.path().as_os_str()])
        .args(["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--log-format", format])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut coordinator = Process {
        child,
        name: "kiln-coordinator".into(),
    };
    // The admin token appears once start-up is through.
    let token = data.path().join("admin.token");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !token.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = coordinator.terminate(Duration::from_secs(30))?;
    ensure!(status.success(), "the coordinator exited with {status}");
    let mut text = String::new();
    stderr.read_to_string(&mut text)?;
    stdout.read_to_string(&mut String::new())?;
    Ok(text)
}

/// Every line of `log` as a JSON object with the fields shippers key on.
fn check_json_lines(log: &str) -> Result<usize> {
    let mut lines = 0;
    for line in log.lines().filter(|line| !line.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not a JSON log line: {line:?}"))?;
        for field in ["timestamp", "level", "target"] {
            ensure!(value.get(field).is_some(), "no {field} in {line}");
        }
        ensure!(
            value.pointer("/fields/message").is_some(),
            "no fields.message in {line}"
        );
        lines += 1;
    }
    Ok(lines)
}

#[test]
fn coordinator_json_log_lines_parse_as_json() -> Result<()> {
    let log = coordinator_log("json")?;
    let lines = check_json_lines(&log)?;
    ensure!(lines >= 2, "too few log lines to judge ({lines}):\n{log}");
    Ok(())
}

#[test]
fn coordinator_text_logs_have_no_colours_off_a_terminal() -> Result<()> {
    let log = coordinator_log("text")?;
    ensure!(!log.trim().is_empty(), "the coordinator logged nothing");
    ensure!(!log.contains('\u{1b}'), "escape codes in:\n{log:?}");
    ensure!(
        serde_json::from_str::<serde_json::Value>(log.lines().next().unwrap_or_default()).is_err(),
        "text logs look like JSON:\n{log}"
    );
    Ok(())
}

#[test]
fn agent_json_log_lines_parse_as_json() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let work = tempfile::tempdir()?;
    let mut child = Command::new(binary("kiln-agent"))
        .args(["--coordinator", &coordinator.url(), "--name", "json-logger"])
        .args([
            "--executor",
            "process",
            "--log-format",
            "json",
            "--work-dir",
        ])
        .arg(work.path())
        .env("KILN_AGENT_TOKEN", &coordinator.agent_token)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let mut agent = Process {
        child,
        name: "kiln-agent".into(),
    };
    // Connected: the coordinator lists it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let listed = coordinator.kiln(&["agents"]);
        if String::from_utf8_lossy(&listed.stdout).contains("json-logger") {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the agent never connected"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = agent.terminate(Duration::from_secs(40))?;
    ensure!(status.success(), "the agent exited with {status}");
    let mut log = String::new();
    stderr.read_to_string(&mut log)?;
    let lines = check_json_lines(&log)?;
    ensure!(lines >= 2, "too few log lines to judge ({lines}):\n{log}");
    Ok(())
}
