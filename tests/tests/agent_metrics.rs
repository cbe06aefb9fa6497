//! `kiln-agent --metrics ADDR`: after a stage with an artifact ran, the
//! agent's `/metrics` shows its slots, its link, the stage's start
//! latencies and the bytes it stored, and passes `promtool check metrics`.
//!
//! Needs Debian's `prometheus` for promtool; `tests/setup.sh` installs it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kiln_proto::v1 as pb;
use kiln_tests::prom::{binary as prom_binary, http_get, promtool_check_metrics};
use kiln_tests::{
    Coordinator, CoordinatorOptions, Process, Repo, binary, eventually, register_and_run, wait_run,
};

/// The value of the sample `series` (name and labels as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_metrics_show_its_work_and_pass_promtool() -> Result<()> {
    const TEST: &str = "agent_metrics_show_its_work_and_pass_promtool";
    let Some(promtool) = prom_binary("promtool", TEST)? else {
        return Ok(());
    };
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let work = tempfile::tempdir()?;
    let mut child = Command::new(binary("kiln-agent"))
        .args(["--coordinator", &coordinator.url(), "--name", "measured"])
        .args(["--executor", "process", "--capacity", "3"])
        .args(["--metrics", "127.0.0.1:0", "--work-dir"])
        .arg(work.path())
        .env("KILN_AGENT_TOKEN", &coordinator.agent_token)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let _agent = Process {
        child,
        name: "kiln-agent".into(),
    };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("kiln-agent metrics http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .with_context(|| format!("no metrics address in {line:?}"))?
        .to_owned();

    let repo = Repo::new(
        "pipeline: measured\nstages:\n  make:\n    commands: [\"mkdir -p out\", \"head -c 5000 /dev/zero > out/blob\"]\n    artifacts: [out]\n",
    )?;
    let run = register_and_run(&coordinator, &repo).await?;
    let mut client = coordinator.client().await?;
    let finished = wait_run(&mut client, run, Duration::from_secs(60)).await?;
    ensure!(
        finished.state == pb::RunState::Succeeded as i32,
        "the run did not succeed: {finished:?}"
    );

    // The supervisor refreshes the gauges after each event: wait for the
    // finished stage to leave them.
    let text = eventually(Duration::from_secs(10), "running stages back to 0", || {
        let addr = addr.clone();
        async move {
            let (status, text) = http_get(&addr, "/metrics")?;
            ensure!(status == 200, "GET /metrics: {status}");
            Ok((sample(&text, "kiln_agent_running_stages") == Some(0.0)).then_some(text))
        }
    })
    .await?;
    for (series, value) in [
        ("kiln_agent_slots", 3.0),
        ("kiln_agent_connected", 1.0),
        (
            "kiln_agent_stage_prepare_seconds_count{executor=\"process\"}",
            1.0,
        ),
        (
            "kiln_agent_executor_start_seconds_count{executor=\"process\"}",
            1.0,
        ),
    ] {
        ensure!(
            sample(&text, series) == Some(value),
            "{series} is not {value}:\n{text}"
        );
    }
    let stored = sample(&text, "kiln_agent_output_bytes_total").unwrap_or_default();
    ensure!(stored > 0.0, "no output bytes counted:\n{text}");
    ensure!(
        text.contains("kiln_build_info{component=\"agent\""),
        "{text}"
    );
    ensure!(
        sample(&text, "process_resident_memory_bytes").is_some_and(|bytes| bytes > 0.0),
        "no process metrics:\n{text}"
    );
    let report = promtool_check_metrics(&promtool, &text)?;
    ensure!(report.trim().is_empty(), "promtool: {report}");
    Ok(())
}
