//! Progressive delivery end to end: a real coordinator and process agent,
//! the example's own router (`examples/customer-behavior/router.py`, a
//! python3 process) in front of stand-in model servers, and real traffic.
//!
//! The deploy stage only tells the router what Kiln gave it
//! (`KILN_TRAFFIC_WEIGHT`, `KILN_TRAFFIC_MODE`); the coordinator analyses
//! the candidate's share through the router's per-backend metrics and
//! goes on, promotes or restores the previous release at 100%. The run
//! that deployed the first step waits: its deploy stage is `rolling_out`
//! and the stage after it (`after`) runs only once the candidate takes
//! all traffic. Every test binds its own free ports: no fixed port, no
//! lock.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_proto::v1 as pb;
use kiln_tests::delivery::{
    farm, free_port, history, release_state, ship_pipeline, state, webhook,
};
use kiln_tests::{CoordinatorOptions, Farm, Repo, eventually, get_run, stage, wait_run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn router_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/customer-behavior/router.py")
}

/// One deploy stage that points the router at the model's backend (the
/// "model" is its backend's URL) with the weight Kiln gives it.
fn spec(state: &Path, router_port: u16, strategy: &str) -> String {
    let (router, state) = (router_py(), state.display());
    let router = router.display();
    format!(
        r#"
pipeline: shop
stages:
  train:
    commands: ["mkdir -p build/model", "cp model.txt build/model/weights"]
    artifacts: [build/model]
  deploy:
    needs: [train]
    environment: production
    commands:
      - 'python3 {router} set --state-dir {state} --url "$(cat build/model/weights)" --weight "$KILN_TRAFFIC_WEIGHT" --mode "$KILN_TRAFFIC_MODE"'
    strategy:
{strategy}
  after:
    needs: [deploy]
    commands: ["echo the candidate takes all traffic"]
"#
    )
    .replace("ROUTER_PORT", &router_port.to_string())
}

const CANARY: &str = r#"      canary:
        steps: [10, 50, 100]
        pause: 2s
        analysis:
          scrape: {url: "http://127.0.0.1:ROUTER_PORT/metrics", labels: {backend: candidate}}
          every: 300ms
          rollback_when: {router_error_ratio: "> 0.2"}
          failure_limit: 2
          on_missing: pass"#;

/// A stand-in model server answering every request with `status` and
/// `body`; returns its URL.
async fn backend(status: u16, body: &'static str) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                let _ = socket.read(&mut buffer).await;
                let response = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(url)
}

/// The router process, and traffic through it until dropped.
struct Router {
    child: Child,
    port: u16,
    state: tempfile::TempDir,
    traffic: tokio::task::JoinHandle<()>,
}

impl Router {
    async fn start() -> Result<Self> {
        let state = tempfile::tempdir()?;
        let port = free_port()?;
        let child = Command::new("python3")
            .arg(router_py())
            .args(["serve", "--port", &port.to_string(), "--state-dir"])
            .arg(state.path())
            .stdout(Stdio::null())
            .spawn()
            .context("starting python3 router.py (is python3 installed?)")?;
        let traffic = tokio::spawn(async move {
            loop {
                if let Ok(mut socket) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = socket
                        .write_all(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                        .await;
                    let mut sink = Vec::new();
                    let _ = socket.read_to_end(&mut sink).await;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Ok(Self {
            child,
            port,
            state,
            traffic,
        })
    }

    /// What the deploys told the router, in order: `(weight, mode, url)`.
    fn history(&self) -> Vec<(u32, String, String)> {
        std::fs::read_to_string(self.state.path().join("history.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let mut parts = line.split(' ');
                Some((
                    parts.next()?.parse().ok()?,
                    parts.next()?.to_owned(),
                    parts.next()?.to_owned(),
                ))
            })
            .collect()
    }

    fn weights(&self) -> Vec<(u32, String)> {
        self.history()
            .into_iter()
            .map(|(weight, _, url)| (weight, url))
            .collect()
    }

    fn routes(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.state.path().join("routes.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.traffic.abort();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn status(farm: &Farm) -> Result<pb::Rollout> {
    let mut client = farm.coordinator.client().await?;
    Ok(client
        .rollout_status(pb::RolloutRequest {
            pipeline: "shop".into(),
            environment: "production".into(),
        })
        .await?
        .into_inner())
}

/// Waits until the rollout of `candidate` ended; returns it.
async fn ended(farm: &Farm, candidate: u64, limit: Duration) -> Result<pb::Rollout> {
    eventually(limit, "the rollout to end", || async move {
        let rollout = status(farm).await?;
        Ok((rollout.candidate == candidate && !rollout.outcome.is_empty()).then_some(rollout))
    })
    .await
}

/// A farm, a router, release 1 (`stable_url`) live at 100%, and the
/// pipeline with `strategy` committed for the next run.
async fn live_first(strategy: &str, stable_url: &str) -> Result<(Farm, Router, Repo, u64)> {
    let (hook, _alerts) = webhook().await?;
    let farm = farm(&hook)?;
    let router = Router::start().await?;
    let repo = Repo::new(&spec(router.state.path(), router.port, strategy))?;
    let first = ship_pipeline(&farm, &repo, "shop", stable_url, "{}").await?;
    assert_eq!(first.state, pb::RunState::Succeeded as i32, "{first:#?}");
    let releases = history(&farm, "shop/production").await?;
    assert_eq!(releases.len(), 1);
    assert_eq!(release_state(&releases[0]), pb::ReleaseState::Live);
    Ok((farm, router, repo, releases[0].id))
}

/// Starts a run that ships `model` (a backend URL); returns the run and,
/// once its deploy stage made it, the candidate release. The run itself
/// goes on until the rollout ends.
async fn start_candidate(farm: &Farm, repo: &Repo, model: &str) -> Result<(u64, u64)> {
    repo.commit("model.txt", model)?;
    let register = farm
        .coordinator
        .kiln(&["pipeline", "register", repo.path().to_str().unwrap()]);
    assert_eq!(register.status.code(), Some(0), "{register:?}");
    let started = farm.coordinator.kiln(&["run", "shop"]);
    let run: u64 = String::from_utf8(started.stdout)?.trim().parse()?;
    // The release is read from the store, the run from what readers see
    // once that is durable: wait for both.
    let candidate = release_of_run(farm, run, "the candidate release").await?;
    Ok((run, candidate))
}

/// The production release that `run`'s deploy stage made, once the stage
/// is past running and readers see it.
async fn release_of_run(farm: &Farm, run: u64, what: &str) -> Result<u64> {
    eventually(Duration::from_secs(60), what, || async move {
        let releases = history(farm, "shop/production").await?;
        let deployed = !matches!(
            state(stage(&run_of(farm, run).await?, "deploy")),
            pb::StageState::Pending
                | pb::StageState::Ready
                | pb::StageState::Assigned
                | pb::StageState::Running
        );
        Ok(releases
            .iter()
            .find(|r| r.run_id == run && deployed)
            .map(|r| r.id))
    })
    .await
}

/// [`start_candidate`], for the tests that follow the rollout only.
async fn ship_candidate(farm: &Farm, repo: &Repo, model: &str) -> Result<u64> {
    Ok(start_candidate(farm, repo, model).await?.1)
}

async fn run_of(farm: &Farm, run: u64) -> Result<pb::Run> {
    let mut client = farm.coordinator.client().await?;
    get_run(&mut client, run).await
}

async fn finished(farm: &Farm, run: u64) -> Result<pb::Run> {
    let mut client = farm.coordinator.client().await?;
    wait_run(&mut client, run, Duration::from_secs(90)).await
}

/// While the rollout of its candidate goes on, run `run` waits: running,
/// its deploy stage `rolling_out` saying so, the stage after it pending.
fn assert_waits_for_the_rollout(run: &pb::Run) {
    assert_eq!(run.state, pb::RunState::Running as i32, "{run:#?}");
    let deploy = stage(run, "deploy");
    assert_eq!(state(deploy), pb::StageState::RollingOut, "{run:#?}");
    assert!(
        deploy.message.starts_with("rolling out") && deploy.message.contains("shop/production"),
        "the stage says why it waits: {}",
        deploy.message
    );
    assert_eq!(state(stage(run, "after")), pb::StageState::Pending);
}

/// The runs the coordinator started for the rollout of `candidate`, by
/// kind of plan (`rollout_step`, `rollout_restore`), oldest first.
async fn rollout_runs(farm: &Farm, candidate: u64) -> Result<Vec<pb::Run>> {
    let mut client = farm.coordinator.client().await?;
    let mut runs = Vec::new();
    let newest = client
        .list_runs(pb::ListRunsRequest::default())
        .await?
        .into_inner()
        .runs;
    for listed in newest {
        let run = get_run(&mut client, listed.id).await?;
        let ours = run.rollback.as_ref().is_some_and(|plan| {
            plan.kind.starts_with("rollout")
                && (plan.to_release == candidate || plan.from_release == candidate)
        });
        if ours {
            runs.push(run);
        }
    }
    runs.sort_by_key(|run| run.id);
    Ok(runs)
}

/// A page of the dashboard, as the admin.
async fn page(farm: &Farm, path: &str) -> Result<String> {
    Ok(reqwest::Client::new()
        .get(format!("http://{}{path}", farm.coordinator.http))
        .bearer_auth(&farm.coordinator.admin_token)
        .send()
        .await?
        .text()
        .await?)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_canary_of_a_good_model_goes_through_three_steps() -> Result<()> {
    let (stable, good) = (backend(200, "1").await?, backend(200, "1").await?);
    let (farm, router, repo, first) = live_first(CANARY, &stable).await?;
    let (run, candidate) = start_candidate(&farm, &repo, &good).await?;
    let releases = history(&farm, "shop/production").await?;
    let rolling = releases.iter().find(|r| r.id == candidate).unwrap();
    assert_eq!(release_state(rolling), pb::ReleaseState::RollingOut);
    assert_waits_for_the_rollout(&run_of(&farm, run).await?);
    let shown = farm.coordinator.kiln(&["status", &run.to_string()]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("rolling_out") && text.contains("rolling out release"),
        "`kiln status` shows the stage waiting for the rollout: {text}"
    );
    let run_page = page(&farm, &format!("/runs/{run}")).await?;
    assert!(
        run_page.contains(r#"<span class="badge rolling_out">rolling_out</span>"#)
            && run_page.contains(&format!("rolling out release {candidate} to")),
        "the dashboard shows the stage waiting for the rollout: {run_page}"
    );

    let rollout = ended(&farm, candidate, Duration::from_secs(60)).await?;
    assert_eq!(rollout.outcome, "promoted", "{rollout:#?}");
    // The run went on only once the candidate took all traffic.
    let done = finished(&farm, run).await?;
    assert_eq!(done.state, pb::RunState::Succeeded as i32, "{done:#?}");
    let deploy = stage(&done, "deploy");
    assert_eq!(state(deploy), pb::StageState::Succeeded);
    assert!(
        deploy.message.contains("rolled out") && deploy.message.contains("passed 2 step(s)"),
        "{}",
        deploy.message
    );
    let after = stage(&done, "after");
    assert_eq!(state(after), pb::StageState::Succeeded);
    assert!(
        after.started_ms >= rollout.finished_ms,
        "`after` started at {} before the rollout ended at {}",
        after.started_ms,
        rollout.finished_ms
    );

    // The runs that deployed steps 2 and 3 say what they are.
    let steps = rollout_runs(&farm, candidate).await?;
    let said: Vec<(String, String)> = steps
        .iter()
        .map(|run| {
            let plan = run.rollback.clone().unwrap();
            (plan.kind, plan.summary)
        })
        .collect();
    assert_eq!(
        said,
        [
            (
                "rollout_step".to_owned(),
                format!("rollout step 2/3 of release {candidate} to production at 50%")
            ),
            (
                "rollout_step".to_owned(),
                format!("rollout step 3/3 of release {candidate} to production at 100%")
            ),
        ]
    );
    let second = steps[0].id.to_string();
    let shown = farm.coordinator.kiln(&["status", &second]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains(&format!(
            "deploys    rollout step 2/3 of release {candidate} to production at 50%"
        )),
        "{text}"
    );
    let json = farm
        .coordinator
        .kiln(&["--output", "json", "status", &second]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(json["rollback"]["kind"], "rollout_step", "{json}");
    assert_eq!(
        (&json["rollback"]["step"], &json["rollback"]["weight"]),
        (&serde_json::json!(2), &serde_json::json!(50))
    );
    let run_page = page(&farm, &format!("/runs/{second}")).await?;
    assert!(
        run_page.contains("<dt>Rollout step</dt>")
            && run_page.contains(&format!(
                "rollout step 2/3 of release {candidate} to production at 50%"
            ))
            && !run_page.contains("back from release"),
        "the run page says it is a rollout step, not a rollback: {run_page}"
    );
    assert!(
        run_page.contains(r#"<dd id="trigger">rollout "#),
        "{run_page}"
    );
    assert_eq!(rollout.steps, [10, 50, 100]);
    assert_eq!(rollout.previous, first);
    let analysed: std::collections::BTreeSet<u32> =
        rollout.rounds.iter().map(|round| round.step).collect();
    assert_eq!(analysed, [0, 1].into(), "analysed after steps 1 and 2");
    assert!(
        rollout
            .rounds
            .iter()
            .any(|round| round.values.get("router_error_ratio") == Some(&0.0)),
        "the candidate's own error ratio was read: {:#?}",
        rollout.rounds
    );
    assert_eq!(
        router.weights(),
        [
            (100, stable.clone()),
            (10, good.clone()),
            (50, good.clone()),
            (100, good.clone())
        ],
        "the coordinator decided each step; the deploy only set it"
    );
    assert_eq!(router.routes()["stable"], good.as_str());
    let releases = history(&farm, "shop/production").await?;
    let live = releases.iter().find(|r| r.id == candidate).unwrap();
    assert_eq!(release_state(live), pb::ReleaseState::Live);
    assert_eq!(
        live.rollout.as_ref().map(|r| r.outcome.as_str()),
        Some("promoted"),
        "the rollout is kept on the release"
    );
    let old = releases.iter().find(|r| r.id == first).unwrap();
    assert_eq!(release_state(old), pb::ReleaseState::Superseded);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_canary_of_a_bad_model_aborts_and_restores_the_previous_release_at_100() -> Result<()> {
    let (stable, bad) = (backend(200, "1").await?, backend(500, "boom").await?);
    let (farm, router, repo, first) = live_first(CANARY, &stable).await?;
    let (run, candidate) = start_candidate(&farm, &repo, &bad).await?;
    assert_waits_for_the_rollout(&run_of(&farm, run).await?);

    let rollout = ended(&farm, candidate, Duration::from_secs(60)).await?;
    assert_eq!(rollout.outcome, "aborted", "{rollout:#?}");
    assert_eq!(rollout.step, 0, "aborted at the first step");
    assert!(
        rollout.reason.contains("router_error_ratio=1"),
        "the abort's values are recorded: {}",
        rollout.reason
    );
    // The deploy stage fails with the abort's values; what needs it is
    // skipped, as after any failed stage.
    let done = finished(&farm, run).await?;
    assert_eq!(done.state, pb::RunState::Failed as i32, "{done:#?}");
    let deploy = stage(&done, "deploy");
    assert_eq!(state(deploy), pb::StageState::Failed);
    assert!(
        deploy.message.contains("aborted at step 1 of 3 (10%)")
            && deploy.message.contains("router_error_ratio=1")
            && deploy
                .message
                .contains(&format!("release {first} is back at 100%")),
        "{}",
        deploy.message
    );
    assert_eq!(state(stage(&done, "after")), pb::StageState::Skipped);
    let restores = rollout_runs(&farm, candidate).await?;
    assert_eq!(restores.len(), 1, "{restores:#?}");
    let plan = restores[0].rollback.clone().unwrap();
    assert_eq!(plan.kind, "rollout_restore");
    assert_eq!(
        plan.summary,
        format!(
            "restore release {first} in production at 100% after the aborted rollout of release {candidate}"
        )
    );
    assert!(rollout.rounds.iter().filter(|r| r.breached).count() >= 2);
    assert_eq!(
        router.weights(),
        [
            (100, stable.clone()),
            (10, bad.clone()),
            (100, stable.clone())
        ],
        "the previous release was deployed again at 100%"
    );
    assert_eq!(router.routes()["stable"], stable.as_str());
    assert!(router.routes()["candidate"].is_null());
    let releases = history(&farm, "shop/production").await?;
    let aborted = releases.iter().find(|r| r.id == candidate).unwrap();
    assert_eq!(release_state(aborted), pb::ReleaseState::Aborted);
    assert!(
        aborted.reason.contains("router_error_ratio=1"),
        "{}",
        aborted.reason
    );
    let live = releases.iter().find(|r| r.id == first).unwrap();
    assert_eq!(release_state(live), pb::ReleaseState::Live);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shadow_comparison_is_recorded_with_its_decision() -> Result<()> {
    const SHADOW: &str = r#"      shadow:
        for: 2s
        compare:
          scrape: "http://127.0.0.1:ROUTER_PORT/metrics"
          every: 300ms
          rollback_when: {router_shadow_disagreement_ratio: "> 0.1"}
          failure_limit: 2
          on_missing: pass"#;
    let stable = backend(200, "1").await?;
    let (agrees, disagrees) = (backend(200, "1").await?, backend(200, "0").await?);
    let (farm, router, repo, _) = live_first(SHADOW, &stable).await?;

    let same = ship_candidate(&farm, &repo, &agrees).await?;
    let rollout = ended(&farm, same, Duration::from_secs(60)).await?;
    assert_eq!(rollout.kind, "shadow");
    assert_eq!(rollout.outcome, "promoted", "{rollout:#?}");
    assert!(
        rollout
            .rounds
            .iter()
            .any(|r| r.values.get("router_shadow_disagreement_ratio") == Some(&0.0)),
        "the comparison is recorded: {:#?}",
        rollout.rounds
    );

    let different = ship_candidate(&farm, &repo, &disagrees).await?;
    let rollout = ended(&farm, different, Duration::from_secs(60)).await?;
    assert_eq!(rollout.outcome, "aborted", "{rollout:#?}");
    assert!(
        rollout
            .reason
            .contains("router_shadow_disagreement_ratio=1"),
        "{}",
        rollout.reason
    );
    assert_eq!(
        router
            .history()
            .iter()
            .map(|(w, m, _)| (*w, m.as_str()))
            .collect::<Vec<_>>(),
        [
            (100, "full"),
            (0, "shadow"),
            (100, "full"),
            (0, "shadow"),
            (100, "full")
        ]
    );
    assert_eq!(router.routes()["stable"], agrees.as_str());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kiln_rollout_promote_and_abort_move_a_paused_rollout() -> Result<()> {
    let slow = CANARY.replace("pause: 2s", "pause: 10m");
    let stable = backend(200, "1").await?;
    let (next, other) = (backend(200, "1").await?, backend(200, "1").await?);
    let (farm, router, repo, first) = live_first(&slow, &stable).await?;

    let (run, candidate) = start_candidate(&farm, &repo, &next).await?;
    let shown = farm
        .coordinator
        .kiln(&["rollout", "status", "shop/production"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert_eq!(shown.status.code(), Some(0), "{shown:?}");
    assert!(
        text.contains(&format!("canary of release {candidate}"))
            && text.contains("step 1 of 3 at 10%, analysing"),
        "{text}"
    );
    let page = environment_page(&farm).await?;
    assert!(
        page.contains("Rollout in progress")
            && page.contains("1 of 3 at 10% ([10%] → 50% → 100%)")
            && page.contains("analysing until")
            && page.contains(&format!(
                r#"<a href="/runs/{run}">run {run}</a> waits for it"#
            )),
        "the environment page shows the rollout and the run that waits: {page}"
    );
    let promoted = farm.coordinator.kiln(&["rollout", "promote", "production"]);
    assert_eq!(promoted.status.code(), Some(0), "{promoted:?}");
    let rollout = ended(&farm, candidate, Duration::from_secs(30)).await?;
    assert_eq!(rollout.outcome, "promoted");
    assert_eq!(
        router.weights(),
        [
            (100, stable.clone()),
            (10, next.clone()),
            (100, next.clone())
        ],
        "promote skipped the pause and the 50% step"
    );

    let (run, second) = start_candidate(&farm, &repo, &other).await?;
    let aborted = farm
        .coordinator
        .kiln(&["rollout", "abort", "shop/production"]);
    assert_eq!(aborted.status.code(), Some(0), "{aborted:?}");
    let rollout = ended(&farm, second, Duration::from_secs(30)).await?;
    assert_eq!(rollout.outcome, "aborted");
    assert_eq!(rollout.reason, "aborted by admin", "who aborted it");
    let done = finished(&farm, run).await?;
    let deploy = stage(&done, "deploy");
    assert_eq!(state(deploy), pb::StageState::Failed);
    assert!(deploy.message.contains("aborted by admin"), "{deploy:#?}");
    assert_eq!(router.routes()["stable"], next.as_str());
    let again = farm
        .coordinator
        .kiln(&["rollout", "abort", "shop/production"]);
    assert_eq!(again.status.code(), Some(2), "nothing in progress");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("no rollout is in progress"),
        "{again:?}"
    );

    // Both are audited with who did them.
    let audit = farm.coordinator.kiln(&["audit", "--output", "json"]);
    let audit = String::from_utf8_lossy(&audit.stdout);
    assert!(
        audit.contains("RolloutPromote") && audit.contains("RolloutAbort"),
        "{audit}"
    );
    let _ = first;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_restarted_mid_rollout_resumes_it() -> Result<()> {
    let slower = CANARY.replace("pause: 2s", "pause: 6s");
    let stable = backend(200, "1").await?;
    let good = backend(200, "1").await?;
    let (mut farm, router, repo, _) = live_first(&slower, &stable).await?;
    let (run, candidate) = start_candidate(&farm, &repo, &good).await?;
    let before = status(&farm).await?;
    assert_eq!((before.phase.as_str(), before.weight), ("analysing", 10));

    let (hook, _alerts) = webhook().await?;
    let options = CoordinatorOptions {
        extra_args: vec!["--alert-webhook-url".into(), hook],
        ..Default::default()
    };
    farm.coordinator
        .crash_and_restart(&options, Duration::from_millis(500))?;
    let after = status(&farm).await?;
    assert_eq!(
        (after.candidate, after.step, after.analysis_until_ms),
        (candidate, 0, before.analysis_until_ms),
        "the same rollout, at the same step, with the same pause"
    );
    // The run still waits for it, durably.
    assert_waits_for_the_rollout(&run_of(&farm, run).await?);
    let rollout = ended(&farm, candidate, Duration::from_secs(90)).await?;
    assert_eq!(rollout.outcome, "promoted", "{rollout:#?}");
    let done = finished(&farm, run).await?;
    assert_eq!(done.state, pb::RunState::Succeeded as i32, "{done:#?}");
    let after = stage(&done, "after");
    assert_eq!(state(after), pb::StageState::Succeeded);
    assert!(after.started_ms >= rollout.finished_ms);
    assert!(
        rollout.rounds.iter().any(|r| r.step == 1),
        "analysed again after the restart"
    );
    assert_eq!(
        router.weights(),
        [
            (100, stable.clone()),
            (10, good.clone()),
            (50, good.clone()),
            (100, good.clone())
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_run_mid_rollout_aborts_the_rollout_and_restores_the_previous_release()
-> Result<()> {
    let slow = CANARY.replace("pause: 2s", "pause: 10m");
    let (stable, next) = (backend(200, "1").await?, backend(200, "1").await?);
    let (farm, router, repo, first) = live_first(&slow, &stable).await?;
    let (run, candidate) = start_candidate(&farm, &repo, &next).await?;
    assert_waits_for_the_rollout(&run_of(&farm, run).await?);

    let cancelled = farm.coordinator.kiln(&["cancel", &run.to_string()]);
    assert_eq!(cancelled.status.code(), Some(0), "{cancelled:?}");
    let done = finished(&farm, run).await?;
    assert_eq!(done.state, pb::RunState::Cancelled as i32, "{done:#?}");
    let deploy = stage(&done, "deploy");
    assert_eq!(state(deploy), pb::StageState::Cancelled);
    assert!(
        deploy.message.contains("its rollout is aborted"),
        "{}",
        deploy.message
    );
    assert_eq!(state(stage(&done, "after")), pb::StageState::Cancelled);
    let rollout = ended(&farm, candidate, Duration::from_secs(30)).await?;
    assert_eq!(rollout.outcome, "aborted", "{rollout:#?}");
    assert_eq!(
        rollout.reason,
        format!("run {run} that made release {candidate} was stopped (cancelled by user)")
    );
    assert_eq!(
        router.weights(),
        [
            (100, stable.clone()),
            (10, next.clone()),
            (100, stable.clone())
        ],
        "the previous release is back at 100%"
    );
    let releases = history(&farm, "shop/production").await?;
    let live = releases.iter().find(|r| r.id == first).unwrap();
    assert_eq!(release_state(live), pb::ReleaseState::Live);
    Ok(())
}

/// Two environments of one model: staging (deployed as is) and
/// production (with `strategy`), behind a gate that waits for a person.
fn promote_spec(state: &Path, router_port: u16, strategy: &str) -> String {
    let (router, state) = (router_py(), state.display());
    let router = router.display();
    format!(
        r#"
pipeline: shop
stages:
  train:
    commands: ["mkdir -p build/model", "cp model.txt build/model/weights", "cp metrics.json build/metrics.json"]
    artifacts: [build/model]
    metrics: build/metrics.json
  deploy-staging:
    needs: [train]
    environment: staging
    model: shop
    commands: ["cat build/model/weights"]
  signoff:
    needs: [deploy-staging]
    gate:
      require: {{ recall: ">= 0.5" }}
      approval: manual
  deploy:
    needs: [train, signoff]
    environment: production
    model: shop
    commands:
      - 'python3 {router} set --state-dir {state} --url "$(cat build/model/weights)" --weight "$KILN_TRAFFIC_WEIGHT" --mode "$KILN_TRAFFIC_MODE"'
    strategy:
{strategy}
"#
    )
    .replace("ROUTER_PORT", &router_port.to_string())
}

/// Runs `shop` on `model`; the gate is approved or rejected (`verdict`).
async fn run_to_gate(farm: &Farm, repo: &Repo, model: &str, verdict: &str) -> Result<pb::Run> {
    repo.commit("model.txt", model)?;
    repo.commit("metrics.json", r#"{"recall": 0.9}"#)?;
    let started = farm.coordinator.kiln(&["run", "shop"]);
    let run: u64 = String::from_utf8(started.stdout)?.trim().parse()?;
    decide(farm, run, verdict).await?;
    finished(farm, run).await
}

/// Waits until `signoff` of `run` waits for a person, then decides it.
async fn decide(farm: &Farm, run: u64, verdict: &str) -> Result<()> {
    eventually(Duration::from_secs(60), "the gate to wait", || async move {
        let run = run_of(farm, run).await?;
        Ok((state(stage(&run, "signoff")) == pb::StageState::AwaitingApproval).then_some(()))
    })
    .await?;
    let decided = farm
        .coordinator
        .kiln(&[verdict, &run.to_string(), "signoff"]);
    assert_eq!(decided.status.code(), Some(0), "{decided:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn promoting_a_version_into_a_canary_environment_goes_through_its_steps() -> Result<()> {
    let (hook, _alerts) = webhook().await?;
    let farm = farm(&hook)?;
    let router = Router::start().await?;
    let repo = Repo::new(&promote_spec(router.state.path(), router.port, CANARY))?;
    let register = farm
        .coordinator
        .kiln(&["pipeline", "register", repo.path().to_str().unwrap()]);
    assert_eq!(register.status.code(), Some(0), "{register:?}");
    let (stable, good) = (backend(200, "1").await?, backend(200, "1").await?);

    // shop@1 goes to production at once (nothing to replace); shop@2
    // stops in staging.
    let first = run_to_gate(&farm, &repo, &stable, "approve").await?;
    assert_eq!(first.state, pb::RunState::Succeeded as i32, "{first:#?}");
    let second = run_to_gate(&farm, &repo, &good, "reject").await?;
    assert_eq!(second.state, pb::RunState::Failed as i32, "{second:#?}");
    assert_eq!(history(&farm, "shop/production").await?.len(), 1);

    // Promoted to production, shop@2 is rolled out like a pipeline's
    // deploy: 10%, analysed, 50%, analysed, 100%.
    let out = farm
        .coordinator
        .kiln(&["promote", "shop@2", "--to", "production"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let promote_run: u64 = text
        .split("(run ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .context("the run id")?
        .parse()?;
    decide(&farm, promote_run, "approve").await?;
    let candidate = release_of_run(&farm, promote_run, "the promoted release").await?;
    let waiting = run_of(&farm, promote_run).await?;
    assert_eq!(waiting.state, pb::RunState::Running as i32, "{waiting:#?}");
    assert_eq!(
        state(stage(&waiting, "deploy")),
        pb::StageState::RollingOut,
        "{waiting:#?}"
    );
    let rollout = ended(&farm, candidate, Duration::from_secs(60)).await?;
    assert_eq!(rollout.outcome, "promoted", "{rollout:#?}");
    let done = finished(&farm, promote_run).await?;
    assert_eq!(done.state, pb::RunState::Succeeded as i32, "{done:#?}");
    assert_eq!(
        router.weights(),
        [
            (100, stable.clone()),
            (10, good.clone()),
            (50, good.clone()),
            (100, good.clone())
        ],
        "the promote's deploy was the first step; the coordinator made the others"
    );
    let releases = history(&farm, "shop/production").await?;
    let live = releases.iter().find(|r| r.id == candidate).unwrap();
    assert_eq!(release_state(live), pb::ReleaseState::Live);
    assert_eq!((live.model.as_str(), live.model_version), ("shop", 2));
    assert!(live.promotion.is_some(), "{live:#?}");
    let summaries: Vec<String> = rollout_runs(&farm, candidate)
        .await?
        .into_iter()
        .map(|run| run.rollback.unwrap().summary)
        .collect();
    assert_eq!(
        summaries,
        [
            format!("rollout step 2/3 of shop@2 (release {candidate}) to production at 50%"),
            format!("rollout step 3/3 of shop@2 (release {candidate}) to production at 100%"),
        ]
    );
    Ok(())
}

/// The dashboard's page of shop/production, signed in as the admin.
async fn environment_page(farm: &Farm) -> Result<String> {
    let base = format!("http://{}", farm.coordinator.http);
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let cookie = |response: &reqwest::Response, name: &str| {
        response
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| v.strip_prefix(&format!("{name}="))?.split(';').next())
            .map(str::to_owned)
            .with_context(|| format!("no {name} cookie"))
    };
    let form = client.get(format!("{base}/login")).send().await?;
    let login = cookie(&form, "kiln_login")?;
    let token: String = farm
        .coordinator
        .admin_token
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let signed = client
        .post(format!("{base}/login"))
        .header(reqwest::header::COOKIE, format!("kiln_login={login}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}&csrf={login}&next=%2Fruns"))
        .send()
        .await?;
    let session = cookie(&signed, "kiln_session")?;
    Ok(client
        .get(format!("{base}/environments/shop/production"))
        .header(reqwest::header::COOKIE, format!("kiln_session={session}"))
        .send()
        .await?
        .text()
        .await?)
}
