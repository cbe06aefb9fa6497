//! `kiln demo`'s main act: the customer-behavior model shipped, accepted
//! live in staging, watched and rolled back, on an embedded coordinator
//! with a docker agent (training, tests, evaluation) and a process agent
//! (deploys, live acceptance).
//!
//! 1. Release 1 is trained on the real Caravan data, deployed to staging,
//!    where the staging server answers the held-out customers, passes the
//!    gate on offline and live values and reaches production; a production
//!    server and live traffic run.
//! 2. The demo openly commits a fault (`KILN_DEMO_FAULT: invert`: the model
//!    inverts its answers when served). Its offline metrics pass, its live
//!    ones in staging do not: the gate stops it before production.
//! 3. The fault is reverted and a new release rolls out to production as a
//!    canary: the router in front of production's two model servers gives
//!    it 25%, then 50% of the traffic while the coordinator analyses its
//!    answers, then all of it ([`crate::demo_rollout`] prints each step,
//!    round and decision from the coordinator's record). Then the
//!    production traffic goes wrong upstream (half the customers arrive with
//!    their attributes shifted): the monitor sees the input drift, rolls
//!    back, watches the restored release, sees it drift too, and freezes
//!    production with an alert that blames the data. The alerts are printed
//!    as the webhook receives them.
//! 4. It ends with the production history and the live model's lineage.
//!
//! The model servers, the router and the traffic run as containers of the
//! same image, started with the `docker` CLI: they are the demo's scenery,
//! not Kiln. Production's address (127.0.0.1:9101) is the router; the live
//! release is served on 9111, a canary's candidate on 9112.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::args::OutputFormat;
use crate::client::Coordinator;
use crate::commands::{pipeline, runs, watch as progress};
use crate::error::{CliError, Outcome};
use crate::{demo_rollout, output};

pub(crate) const IMAGE: &str = "kiln/python-ml:bookworm";
/// Where deploy.sh installs models (the example's kiln.yml says so too).
const SERVE_ROOT: &str = "/tmp/kiln-serve";
const SERVER: &str = "kiln-demo-serve";
const CANDIDATE_SERVER: &str = "kiln-demo-serve-candidate";
const ROUTER: &str = "kiln-demo-router";
const STAGING_SERVER: &str = "kiln-demo-serve-staging";
const TRAFFIC: &str = "kiln-demo-traffic";

/// Why the ML demo cannot run here, if it cannot (no engine).
pub(crate) fn docker_missing() -> Option<String> {
    let info = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match info {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        Err(error) => Some(format!("cannot run docker: {error}")),
    }
}

/// Builds the ML image from its offline recipe when it is missing.
pub(crate) fn ensure_image(repo_root: &Path, format: OutputFormat) -> Result<(), CliError> {
    let present = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if present.is_ok_and(|status| status.success()) {
        return Ok(());
    }
    let script = repo_root.join("deploy/images/python-ml/build.sh");
    output::progress(
        format,
        &format!(
            "building {IMAGE} offline with {} (about 2 minutes, once)",
            script.display()
        ),
    )?;
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .map_err(|e| CliError::Input(format!("cannot run {}: {e}", script.display())))?;
    if !status.success() {
        return Err(CliError::Input(format!(
            "{} failed; see its output above",
            script.display()
        )));
    }
    Ok(())
}

/// A copy of the example in its own git repository, so the demo can commit
/// its fault openly without touching the project's tree.
pub(crate) fn prepare_repo(example: &Path, data_dir: &Path) -> Result<PathBuf, CliError> {
    let repo = data_dir.join("customer-behavior");
    let io = |e: std::io::Error| CliError::Input(format!("preparing the demo repository: {e}"));
    if repo.exists() {
        std::fs::remove_dir_all(&repo).map_err(io)?;
    }
    copy_tree(example, &repo).map_err(io)?;
    git(&repo, &["init", "-q", "-b", "main"])?;
    commit_all(&repo, "customer-behavior example")?;
    Ok(repo)
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "build" || name == "__pycache__" || name == ".pytest_cache" {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn git(repo: &Path, args: &[&str]) -> Result<(), CliError> {
    let status = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args([
            "-c",
            "user.name=kiln demo",
            "-c",
            "user.email=demo@kiln.invalid",
        ])
        .args(args)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| CliError::Input(format!("cannot run git: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(CliError::Input(format!(
            "git {args:?} failed in {}",
            repo.display()
        )))
    }
}

fn commit_all(repo: &Path, message: &str) -> Result<(), CliError> {
    git(repo, &["add", "-A"])?;
    git(repo, &["commit", "-q", "--allow-empty", "-m", message])
}

/// A webhook receiver on loopback that prints each alert as it arrives.
pub(crate) async fn alert_printer() -> Result<(String, Arc<Mutex<Vec<String>>>), CliError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| CliError::Input(format!("cannot listen for alerts: {e}")))?;
    let url = format!(
        "http://{}/alerts",
        listener
            .local_addr()
            .map_err(|e| CliError::Input(e.to_string()))?
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut buffer = [0u8; 8192];
                while let Ok(n) = socket.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                    data.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&data).into_owned();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let length = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0usize);
                    if body.len() < length {
                        continue;
                    }
                    let alert: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
                    let name = alert["labels"]["alertname"]
                        .as_str()
                        .or(alert["name"].as_str())
                        .unwrap_or("alert")
                        .to_owned();
                    let summary = alert["annotations"]["summary"]
                        .as_str()
                        .or(alert["summary"].as_str())
                        .unwrap_or(body)
                        .to_owned();
                    eprintln!("\n*** ALERT {name}: {summary}\n");
                    kept.lock()
                        .expect("alert list")
                        .push(format!("{name}: {summary}"));
                    let _ = socket
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                    break;
                }
            });
        }
    });
    Ok((url, seen))
}

fn docker_rm(name: &str) {
    let _ = Command::new("docker")
        .args(["rm", "-f", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn docker_run_detached(name: &str, repo: &Path, command: &[&str]) -> Result<(), CliError> {
    docker_rm(name);
    let repo_mount = format!("{0}:{0}:ro", repo.display());
    let serve_mount = format!("{SERVE_ROOT}:{SERVE_ROOT}");
    let status = Command::new("docker")
        .args([
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "--label",
            "kiln.demo=1",
        ])
        .args([
            "-v",
            &repo_mount,
            "-v",
            &serve_mount,
            "-w",
            &repo.display().to_string(),
            IMAGE,
        ])
        .args(command)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| CliError::Input(format!("cannot run docker: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(CliError::Input(format!(
            "could not start the {name} container"
        )))
    }
}

/// Stops the scenery containers.
pub(crate) fn stop_scenery() {
    docker_rm(TRAFFIC);
    docker_rm(ROUTER);
    docker_rm(SERVER);
    docker_rm(CANDIDATE_SERVER);
    docker_rm(STAGING_SERVER);
}

/// The scenario, once the farm is up.
pub(crate) async fn run_scenario(
    coordinator: &Coordinator,
    repo: &Path,
    alerts: &Arc<Mutex<Vec<String>>>,
    format: OutputFormat,
) -> Result<Outcome, CliError> {
    let _ = std::fs::remove_dir_all(SERVE_ROOT);
    std::fs::create_dir_all(SERVE_ROOT)
        .map_err(|e| CliError::Input(format!("cannot create {SERVE_ROOT}: {e}")))?;

    // The servers are up before anything is deployed, so live acceptance
    // and the monitor of the first release find them (they answer, with no
    // model loaded yet).
    say(
        format,
        &format!(
            "starting model servers (serving {SERVE_ROOT}/ENV): staging on 127.0.0.1:9102; \
             production's router on 127.0.0.1:9101 in front of the live release (9111) and a \
             canary's candidate (9112)"
        ),
    )?;
    for (name, env, link, port) in [
        (STAGING_SERVER, "staging", "current", "9102"),
        (SERVER, "production", "current", "9111"),
        (CANDIDATE_SERVER, "production", "candidate", "9112"),
    ] {
        let env_dir = format!("{SERVE_ROOT}/{env}");
        docker_run_detached(
            name,
            repo,
            &[
                "python",
                "serve.py",
                "--env-dir",
                &env_dir,
                "--link",
                link,
                "--port",
                port,
                "--min-feedback",
                "50",
                "--window",
                "100",
            ],
        )?;
    }
    let router_state = format!("{SERVE_ROOT}/production/router");
    docker_run_detached(
        ROUTER,
        repo,
        &[
            "python",
            "router.py",
            "serve",
            "--port",
            "9101",
            "--state-dir",
            &router_state,
        ],
    )?;

    say(
        format,
        "act 1: train on the Caravan data, deploy to staging, ask the staging server about the \
         held-out customers, gate on offline and live values, release to production",
    )?;
    let first = ship(coordinator, repo, format).await?;
    if first.state != pb::RunState::Succeeded as i32 {
        say(
            format,
            "the first run did not succeed; see `kiln logs` above",
        )?;
        return Ok(Outcome::RunNotSucceeded);
    }
    print_gate(&first, format)?;

    say(
        format,
        "sending live traffic with labelled feedback to the production server",
    )?;
    start_traffic(repo, "0")?;
    tokio::time::sleep(Duration::from_secs(6)).await;

    say(
        format,
        "act 2: INJECTING A FAULT, openly: committing `KILN_DEMO_FAULT: invert` to the train stage. \
         The new model is as good offline but inverts its answers when served.",
    )?;
    set_fault(repo, "none", "invert")?;
    let second = ship(coordinator, repo, format).await?;
    print_gate(&second, format)?;
    say_cache(coordinator, [&first, &second], format).await?;
    let stopped = second.state != pb::RunState::Succeeded as i32
        && second
            .stages
            .iter()
            .any(|s| s.name == "deploy-production" && s.state() == pb::StageState::Skipped);
    if stopped {
        say(
            format,
            &format!(
                "run {} was stopped in staging: its offline metrics pass, the staging server's live answers fail the gate; production never saw it",
                second.id
            ),
        )?;
    } else {
        say(format, "the inverted model was NOT stopped in staging")?;
    }

    let (canary, monitor) = production_plan(repo)?;
    say(
        format,
        &format!(
            "act 3: the fault is reverted and a new release goes through staging, then rolls out to \
             production as a CANARY: {canary}"
        ),
    )?;
    set_fault(repo, "invert", "none")?;
    let (_, canary) = ship_with_rollout(coordinator, repo, format).await?;
    let Some(promoted) = canary.filter(|rollout| rollout.outcome == "promoted") else {
        say(
            format,
            "the canary did not reach 100%, so there is no new release to watch in production",
        )?;
        return Ok(Outcome::RunNotSucceeded);
    };
    say(
        format,
        &format!(
            "UPSTREAM DATA FAULT, openly: from now on half the production customers arrive with \
             every attribute shifted one column over. {monitor}"
        ),
    )?;
    docker_rm(TRAFFIC);
    start_traffic(repo, "0.5")?;
    let rolled_back = wait_for_rollback(coordinator, promoted.candidate).await?;
    match &rolled_back {
        Some(release) => say(
            format,
            &format!("release {} was rolled back: {}", release.id, release.reason),
        )?,
        None => say(format, "no rollback happened within 3 minutes")?,
    }
    say(
        format,
        "the restored release is watched again; if it breaches too, the cause is the data",
    )?;
    match wait_for_freeze(coordinator).await? {
        Some(why) => say(format, &format!("production is FROZEN: {why}"))?,
        None => say(format, "production did not freeze within 2 minutes")?,
    }
    docker_rm(TRAFFIC);
    tokio::time::sleep(Duration::from_secs(2)).await;
    if alerts.lock().expect("alert list").is_empty() {
        say(format, "(no alert reached the webhook)")?;
    }

    say(
        format,
        &format!("act 4: the history of {PIPELINE}/production"),
    )?;
    let history = production_history(coordinator).await?;
    for release in &history {
        let state = match release.state() {
            pb::ReleaseState::Live => "live",
            pb::ReleaseState::Superseded => "superseded",
            pb::ReleaseState::RolledBack => "rolled back",
            pb::ReleaseState::RollingOut => "rolling out",
            pb::ReleaseState::Aborted => "aborted",
            pb::ReleaseState::Unspecified => "?",
        };
        let recall = release
            .metrics
            .get("recall")
            .map_or("-".into(), |v| output::number(*v));
        let restored = if release.restored_by_rollback {
            " (restored by rollback)"
        } else {
            ""
        };
        output::line(format!(
            "  release {:>2}  run {:>2}  {state:<11} recall={recall}{restored}{}",
            release.id,
            release.run_id,
            demo_rollout::summary(release)
        ))?;
    }
    if let Some(live) = history.iter().find(|r| r.state() == pb::ReleaseState::Live) {
        say(format, "act 5: what the live model was built from")?;
        output::line(provenance_summary(coordinator, live.id).await)?;
    }
    Ok(if stopped && rolled_back.is_some() {
        Outcome::Ok
    } else {
        Outcome::RunNotSucceeded
    })
}

/// Replays customers to the production server (`drift_share` of them
/// shifted one column over).
fn start_traffic(repo: &Path, drift_share: &str) -> Result<(), CliError> {
    docker_run_detached(
        TRAFFIC,
        repo,
        &[
            "python",
            "traffic.py",
            "--url",
            "http://127.0.0.1:9101",
            "--rate",
            "25",
            "--duration",
            "0",
            "--report-every",
            "1000",
            "--drift-share",
            drift_share,
        ],
    )
}

/// The `unit-tests` stage's cache in two runs of the same
/// requirements-test.txt: the first builds the virtualenv from PyPI, the
/// second restores it; each run's stage time and the agent's own words.
async fn say_cache(
    coordinator: &Coordinator,
    runs: [&pb::Run; 2],
    format: OutputFormat,
) -> Result<(), CliError> {
    let mut seen = Vec::new();
    for run in runs {
        let Some(stage) = run.stages.iter().find(|s| s.name == "unit-tests") else {
            return Ok(());
        };
        let secs = stage.finished_ms.saturating_sub(stage.started_ms) as f64 / 1000.0;
        let request = pb::StreamLogsRequest {
            run_id: run.id,
            stage: stage.name.clone(),
            follow: false,
            resume: Vec::new(),
        };
        let mut said = String::from("no cache line");
        let mut entries = coordinator
            .stream_logs(request)
            .await
            .map_err(|status| CliError::Coordinator(status.message().to_owned()))?;
        while let Some(entry) = entries
            .message()
            .await
            .map_err(|status| CliError::Coordinator(status.message().to_owned()))?
        {
            let text = entry.line.map(|line| line.text).unwrap_or_default();
            if let Some((_, what)) = text.split_once("`: ")
                && text.starts_with("cache `")
                && (what.starts_with("miss") || what.starts_with("restored"))
            {
                said = what.to_owned();
            }
        }
        seen.push(format!("run {}: {secs:.1}s ({said})", run.id));
    }
    say(
        format,
        &format!(
            "unit-tests keeps its virtualenv of requirements-test.txt (from PyPI) as a stage \
             cache: {}",
            seen.join("; ")
        ),
    )
}

/// What the example's `deploy-production` says of its canary and its
/// monitor, in a sentence each, read from the demo repository's kiln.yml
/// (so the narration never disagrees with the file).
fn production_plan(repo: &Path) -> Result<(String, String), CliError> {
    use kiln_common::duration::format as secs;
    let path = repo.join("kiln.yml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| CliError::Input(format!("cannot read {}: {e}", path.display())))?;
    let pipeline = kiln_common::spec::parse("kiln.yml", &text)
        .map_err(|e| CliError::Input(format!("the demo's kiln.yml: {e}")))?;
    let stage = pipeline
        .stages
        .iter()
        .find(|stage| stage.name == "deploy-production")
        .ok_or_else(|| CliError::Input("the demo's kiln.yml has no deploy-production".into()))?;
    let (Some(strategy), Some(monitor)) = (&stage.strategy, &stage.monitor) else {
        return Err(CliError::Input(
            "the demo's deploy-production needs a `strategy:` and a `monitor:`".into(),
        ));
    };
    let rules = |monitor: &kiln_common::spec::Monitor| {
        monitor
            .rollback_when
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    };
    let steps: Vec<String> = strategy.steps.iter().map(|w| format!("{w}%")).collect();
    let canary = match &strategy.analysis {
        Some(analysis) => format!(
            "{} of the traffic, each step for {} while the coordinator reads {} every {} \
             ({} bad reads in a row abort)",
            steps.join(", then "),
            secs(strategy.pause),
            rules(analysis),
            secs(analysis.every),
            analysis.failure_limit
        ),
        None => format!(
            "{} of the traffic, each step for {}",
            steps.join(", then "),
            secs(strategy.pause)
        ),
    };
    let monitor = format!(
        "The monitor scrapes production every {} ({}) and rolls back after {} breaches in a row.",
        secs(monitor.every),
        rules(monitor),
        monitor.failure_limit
    );
    Ok((canary, monitor))
}

/// Commits the train stage's `KILN_DEMO_FAULT: from` as `to`.
fn set_fault(repo: &Path, from: &str, to: &str) -> Result<(), CliError> {
    let kiln_yml = repo.join("kiln.yml");
    let text = std::fs::read_to_string(&kiln_yml).map_err(|e| CliError::Input(e.to_string()))?;
    std::fs::write(
        &kiln_yml,
        text.replace(
            &format!("KILN_DEMO_FAULT: {from}"),
            &format!("KILN_DEMO_FAULT: {to}"),
        ),
    )
    .map_err(|e| CliError::Input(e.to_string()))?;
    let message = if to == "none" {
        "demo: remove the serving fault".to_owned()
    } else {
        format!("demo: inject a serving fault ({to}: the model answers wrongly live)")
    };
    commit_all(repo, &message)
}

async fn ship(
    coordinator: &Coordinator,
    repo: &Path,
    format: OutputFormat,
) -> Result<pb::Run, CliError> {
    let run_id = start_run(coordinator, repo, format).await?;
    progress::follow(coordinator, run_id, format).await?;
    coordinator.get_run(run_id).await
}

/// Registers the repository's pipeline and triggers a run; its id.
async fn start_run(
    coordinator: &Coordinator,
    repo: &Path,
    format: OutputFormat,
) -> Result<u64, CliError> {
    let prepared = pipeline::prepare(repo)?;
    let registered = pipeline::submit(coordinator, prepared.request).await?;
    output::progress(format, &pipeline::registered_line(&registered))?;
    Ok(runs::trigger(coordinator, &registered.pipeline.name, None)
        .await?
        .id)
}

/// Ships like [`ship`] while following the production rollout the run
/// starts; returns the run and the rollout once it ended (`None` if none
/// started or it did not end). Waits for the rollout's end whether the run
/// finishes at its first step or only after the last. The run's gates are
/// printed when the rollout starts (or, without one, when the run ends).
async fn ship_with_rollout(
    coordinator: &Coordinator,
    repo: &Path,
    format: OutputFormat,
) -> Result<(pb::Run, Option<pb::Rollout>), CliError> {
    let before = demo_rollout::current(coordinator, PIPELINE, "production")
        .await
        .map(|rollout| rollout.candidate);
    let run_id = start_run(coordinator, repo, format).await?;
    let (done, run_done) = watch::channel(None);
    let shipping = async {
        let run = match progress::follow(coordinator, run_id, format).await {
            Ok(_) => coordinator.get_run(run_id).await,
            Err(error) => Err(error),
        };
        let succeeded = run
            .as_ref()
            .is_ok_and(|run| run.state == pb::RunState::Succeeded as i32);
        let _ = done.send(Some(succeeded));
        run
    };
    let gates = async {
        let run = coordinator.get_run(run_id).await?;
        print_gate(&run, format)
    };
    let watched = demo_rollout::Watched {
        pipeline: PIPELINE,
        environment: "production",
        before,
    };
    let following = demo_rollout::follow(coordinator, watched, gates, run_done, format);
    let (run, rollout) = tokio::join!(shipping, following);
    let (run, rollout) = (run?, rollout?);
    if rollout.is_none() {
        print_gate(&run, format)?;
    }
    Ok((run, rollout))
}

/// Each gate in a few lines: its summary, then one line per rule, a
/// metric's offline value beside the staging server's live one
/// (`live_<metric>`) when the gate checks both.
fn print_gate(run: &pb::Run, format: OutputFormat) -> Result<(), CliError> {
    let verdict = |check: &pb::GateCheck| if check.passed { "pass" } else { "FAIL" };
    let value = |check: &pb::GateCheck| check.value.map_or("missing".into(), output::number);
    for stage in &run.stages {
        let Some(gate) = &stage.gate else { continue };
        say(
            format,
            &format!(
                "gate `{}` (decided by the coordinator): {}",
                stage.name, gate.summary
            ),
        )?;
        let live_of = |metric: &str| {
            gate.checks
                .iter()
                .find(|c| c.metric == format!("live_{metric}") && c.champion.is_none())
        };
        for check in &gate.checks {
            let paired = check
                .metric
                .strip_prefix("live_")
                .is_some_and(|offline| gate.checks.iter().any(|c| c.metric == offline));
            if paired && check.champion.is_none() {
                continue;
            }
            let line = match (check.champion, live_of(&check.metric)) {
                (None, Some(live)) => format!(
                    "      {:<9} {:<7} offline {:<6} {}   live {:<6} {}",
                    check.metric,
                    check.rule,
                    value(check),
                    verdict(check),
                    value(live),
                    verdict(live),
                ),
                (champion, _) => format!(
                    "      {:<9} {:<7} {}{} {}",
                    check.metric,
                    check.rule,
                    value(check),
                    champion
                        .map(|c| format!(" (champion {})", output::number(c)))
                        .unwrap_or_default(),
                    verdict(check),
                ),
            };
            output::progress(format, &line)?;
        }
    }
    Ok(())
}

async fn wait_for_rollback(
    coordinator: &Coordinator,
    release: u64,
) -> Result<Option<pb::Release>, CliError> {
    for _ in 0..180 {
        let history = production_history(coordinator).await?;
        if let Some(release) = history
            .iter()
            .find(|r| r.id == release && r.state() == pb::ReleaseState::RolledBack)
        {
            return Ok(Some(release.clone()));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(None)
}

/// Why production froze, once it has.
async fn wait_for_freeze(coordinator: &Coordinator) -> Result<Option<String>, CliError> {
    for _ in 0..120 {
        let reply = coordinator
            .control()
            .list_environments(pb::ListEnvironmentsRequest {})
            .await
            .map_err(|status| coordinator.failed(status))?;
        if let Some(env) = reply
            .into_inner()
            .environments
            .into_iter()
            .find(|e| e.pipeline == PIPELINE && e.name == "production" && !e.frozen.is_empty())
        {
            return Ok(Some(env.frozen));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(None)
}

/// One paragraph on a release's signed provenance: the model file among
/// its subjects, the commit, and how to verify it offline. The signer runs
/// moments after a release, so this waits a little for it.
async fn provenance_summary(coordinator: &Coordinator, release: u64) -> String {
    let mut last_error = String::new();
    for _ in 0..50 {
        let request = pb::GetReleaseRequest {
            release_id: release,
        };
        match coordinator
            .call(|mut rpc| async move { rpc.get_provenance(request).await })
            .await
        {
            Ok(provenance) => return describe_provenance(release, &provenance),
            Err(error) => last_error = error.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    format!("  release {release} has no signed provenance yet: {last_error}")
}

fn describe_provenance(release: u64, provenance: &pb::Provenance) -> String {
    let statement: serde_json::Value =
        serde_json::from_str(&provenance.statement_json).unwrap_or_default();
    let subjects = statement["subject"].as_array().cloned().unwrap_or_default();
    let model = subjects
        .iter()
        .find(|s| s["name"].as_str().is_some_and(|n| n.ends_with(".pkl")))
        .or_else(|| subjects.first());
    let commit = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|d| d["digest"]["gitCommit"].as_str())
        .unwrap_or("-");
    let model = model.map_or("-".to_owned(), |m| {
        format!(
            "{} sha256:{}",
            m["name"].as_str().unwrap_or_default(),
            m["digest"]["sha256"].as_str().unwrap_or_default()
        )
    });
    format!(
        "  release {release}: {} signed subjects (in-toto + SLSA, DSSE, ed25519 key {}), built from commit {}\n  model: {model}\n  check a copy offline: kiln release provenance {release} > p.json; kiln verify MODEL --release {release} --key DATA_DIR/provenance.pub --provenance p.json",
        subjects.len(),
        &provenance.key_id[..provenance.key_id.len().min(16)],
        output::short_commit(commit),
    )
}

/// The example's pipeline: its environments are `customer-behavior/...`.
const PIPELINE: &str = "customer-behavior";

/// Releases of the example's production, newest first.
async fn production_history(coordinator: &Coordinator) -> Result<Vec<pb::Release>, CliError> {
    let request = pb::EnvironmentHistoryRequest {
        environment: "production".into(),
        pipeline: PIPELINE.into(),
    };
    let reply = coordinator.control().environment_history(request).await;
    Ok(reply
        .map_err(|status| coordinator.failed(status))?
        .into_inner()
        .releases)
}

fn say(format: OutputFormat, text: &str) -> Result<(), CliError> {
    output::progress(format, &format!("\n==> {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_narration_reads_the_examples_canary_and_monitor_from_its_file() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/customer-behavior");
        let (canary, monitor) = production_plan(&example).unwrap();
        assert_eq!(
            canary,
            "25%, then 50%, then 100% of the traffic, each step for 8s while the coordinator reads \
             router_error_ratio every 2s (2 bad reads in a row abort)"
        );
        assert_eq!(
            monitor,
            "The monitor scrapes production every 2s (model_error_ratio, model_input_psi) and \
             rolls back after 3 breaches in a row."
        );
        let elsewhere = tempfile::tempdir().unwrap();
        let missing = production_plan(elsewhere.path()).unwrap_err();
        assert!(missing.to_string().contains("kiln.yml"), "{missing}");
    }
}
