//! `docker-bench`: what the docker executor costs per stage, next to the
//! engine's own client doing the same work.
//!
//! Starts a real coordinator and a real `kiln-agent --executor docker`, and
//! runs pipelines whose stages are chained `true` commands in the test image
//! (so they run one at a time). A stage's cost is `finished_ms -
//! started_ms` as the coordinator records it: from the agent's
//! `StageStarted` to its `StageFinished` being durable, so it covers the
//! workspace checkout, image lookup, container create, attach, start, wait
//! and removal, and the log and result round trip. In the same run, between
//! those pipelines, it times `docker run --rm IMAGE true` on the CLI
//! (create, attach, start, wait, auto-remove, plus the CLI's own start-up).
//!
//! Medians of both are compared; prints one final line:
//! `docker_stage overhead_ms=.. cli_ms=.. ratio=..`
//! and, before it, the same for the process executor and for the CLI with
//! `--network none` (what the docker executor uses by default) as context.
//!
//! Flags: `--rounds N` (default 3) rounds of `--stages N` (default 8) stages
//! and as many CLI runs each.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kiln_proto::v1 as pb;
use kiln_tests::docker::{DockerFarm, TEST_IMAGE};
use kiln_tests::{Repo, start_agent, wait_run};

fn flag(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|arg| arg == name)
        .and_then(|at| args.get(at + 1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// A pipeline of `n` stages running `true`, each needing the one before.
fn chain(n: usize, executor: &str) -> String {
    let mut yml =
        format!("pipeline: bench-{executor}\ndefaults:\n  image: {TEST_IMAGE}\nstages:\n");
    for i in 0..n {
        yml.push_str(&format!(
            "  s{i}:\n    executor: {executor}\n    commands: [\"true\"]\n"
        ));
        if i > 0 {
            yml.push_str(&format!("    needs: [s{}]\n", i - 1));
        }
    }
    yml
}

/// Per-stage costs (ms) of one run of `repo`'s chain.
async fn stage_costs(farm: &DockerFarm, repo: &Repo) -> Result<Vec<f64>> {
    let id = farm.run(repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, Duration::from_secs(300)).await?;
    ensure!(
        run.state == pb::RunState::Succeeded as i32,
        "bench run failed: {run:#?}"
    );
    Ok(run
        .stages
        .iter()
        .map(|stage| stage.finished_ms.saturating_sub(stage.started_ms) as f64)
        .collect())
}

/// Wall time (ms) of `docker run --rm [extra] IMAGE true`.
fn cli_run(extra: &[&str]) -> Result<f64> {
    let started = Instant::now();
    let status = Command::new("docker")
        .args(["run", "--rm"])
        .args(extra)
        .args([TEST_IMAGE, "true"])
        .stdout(Stdio::null())
        .status()
        .context("running the docker CLI")?;
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    if !status.success() {
        bail!("docker run --rm {TEST_IMAGE} true failed: {status}");
    }
    Ok(elapsed)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let rounds = flag("--rounds", 3);
    let n_stages = flag("--stages", 8);
    // The bench has no reason to skip: no engine, or no test image, is an error.
    kiln_tests::docker::connect().await?;
    let farm = DockerFarm::start("docker-bench")
        .await?
        .context("the docker engine cannot run the test image (see above)")?;
    let process_work = tempfile::tempdir()?;
    let _process_agent = start_agent(
        &farm.coordinator.url(),
        "bench-process",
        "",
        1,
        process_work.path(),
    )?;
    let docker_repo = Repo::new(&chain(n_stages, "docker"))?;
    let process_repo = Repo::new(&chain(n_stages, "process"))?;

    // Warm-up: clone caches, page cache, the engine's first container.
    stage_costs(&farm, &docker_repo).await?;
    stage_costs(&farm, &process_repo).await?;
    cli_run(&[])?;

    let (mut docker_ms, mut process_ms) = (Vec::new(), Vec::new());
    let (mut cli_ms, mut cli_none_ms) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        docker_ms.extend(stage_costs(&farm, &docker_repo).await?);
        process_ms.extend(stage_costs(&farm, &process_repo).await?);
        for _ in 0..n_stages {
            cli_ms.push(cli_run(&[])?);
            cli_none_ms.push(cli_run(&["--network", "none"])?);
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    ensure!(
        farm.containers().await?.is_empty(),
        "the agent left containers behind"
    );

    let (docker, process) = (median(&mut docker_ms), median(&mut process_ms));
    let (cli, cli_none) = (median(&mut cli_ms), median(&mut cli_none_ms));
    let samples = docker_ms.len();
    println!(
        "context: medians of {samples} stages; process_stage_ms={process:.0} (checkout and \
         protocol, no container) cli_network_none_ms={cli_none:.0} ratio_vs_network_none={:.2}",
        docker / cli_none
    );
    println!(
        "docker_stage overhead_ms={docker:.0} cli_ms={cli:.0} ratio={:.2}",
        docker / cli
    );
    Ok(())
}
