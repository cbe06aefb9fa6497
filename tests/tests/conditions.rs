//! Conditions and concurrency against a real coordinator, real process
//! agents and real git: `if:` and `changes:` skip stages with their
//! reason; `concurrency:` with `cancel_in_progress` cancels a superseded
//! run but lets its running deploy finish, and without it queues the newer
//! run; the outdated-deploy guard keeps an older commit from replacing the
//! release of a newer one.

use std::collections::HashMap;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kiln_proto::v1 as pb;
use kiln_tests::{Farm, Repo, eventually, get_run, logs, stage, wait_run};

const LIMIT: Duration = Duration::from_secs(90);

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Starts `pipeline` at `rev` with `params`; returns the run's id.
async fn start(farm: &Farm, pipeline: &str, rev: &str, params: &[(&str, &str)]) -> Result<u64> {
    let mut client = farm.coordinator.client().await?;
    let params: HashMap<String, String> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Ok(client
        .trigger_run(pb::TriggerRunRequest {
            pipeline: pipeline.into(),
            rev: rev.into(),
            params,
            ..Default::default()
        })
        .await?
        .into_inner()
        .id)
}

async fn finish(farm: &Farm, run: u64) -> Result<pb::Run> {
    let mut client = farm.coordinator.client().await?;
    wait_run(&mut client, run, LIMIT).await
}

async fn run_to_end(
    farm: &Farm,
    pipeline: &str,
    rev: &str,
    params: &[(&str, &str)],
) -> Result<pb::Run> {
    let id = start(farm, pipeline, rev, params).await?;
    finish(farm, id).await
}

/// Waits until `stage` of `run` is running.
async fn until_running(farm: &Farm, run: u64, name: &str) -> Result<()> {
    let client = farm.coordinator.client().await?;
    eventually(LIMIT, &format!("{name} of run {run} running"), || {
        let mut client = client.clone();
        async move {
            let run = get_run(&mut client, run).await?;
            Ok((stage(&run, name).state == pb::StageState::Running as i32).then_some(()))
        }
    })
    .await
}

fn state_of(run: &pb::Run, name: &str) -> (pb::StageState, String) {
    let stage = stage(run, name);
    (
        pb::StageState::try_from(stage.state).unwrap_or(pb::StageState::Unspecified),
        stage.message.clone(),
    )
}

const CONDITIONS: &str = r#"
pipeline: cond
params:
  FORCE: { type: bool, default: false }
stages:
  build: { commands: ["echo build"] }
  data:
    changes: ["data/**"]
    commands: ["echo data changed"]
  release:
    needs: [build]
    if: branch == "main" || params.FORCE == true
    commands: ["echo release"]
  after-release:
    needs: [release]
    commands: ["echo after"]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn if_and_changes_skip_stages_with_their_reason() -> Result<()> {
    let farm = Farm::start(&Default::default(), &[("cond-agent", "", 4)])?;
    let repo = Repo::new(CONDITIONS)?;
    farm.coordinator.add_repo(&repo, &[])?;

    // The branch's first build: everything counts as changed.
    let run = run_to_end(&farm, "cond", "", &[]).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    for name in ["build", "data", "release", "after-release"] {
        assert_eq!(state_of(&run, name).0, pb::StageState::Succeeded, "{name}");
    }

    // Only the README changed since: `data` is skipped, and says why.
    repo.commit("README", "docs\n")?;
    let run = run_to_end(&farm, "cond", "", &[]).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    let (state, message) = state_of(&run, "data");
    assert_eq!(state, pb::StageState::Skipped);
    assert_eq!(
        message,
        "skipped: no changed path matches `changes: [data/**]` (1 path changed)"
    );
    assert_eq!(state_of(&run, "release").0, pb::StageState::Succeeded);
    let mut client = farm.coordinator.client().await?;
    let lines = logs(&mut client, run.id, "data").await?;
    ensure!(
        lines
            .iter()
            .any(|entry| entry.line.as_ref().is_some_and(|l| l.text == message)),
        "the reason is the skipped stage's log: {lines:#?}"
    );
    let status = farm.coordinator.kiln(&["status", &run.id.to_string()]);
    ensure!(
        stdout(&status).contains("skipped") && stdout(&status).contains("no changed path matches"),
        "kiln status shows the skip and its reason: {}",
        stdout(&status)
    );

    // A data change: `data` runs again.
    repo.commit("data/raw.csv", "a,b\n1,2\n")?;
    let run = run_to_end(&farm, "cond", "", &[]).await?;
    assert_eq!(state_of(&run, "data").0, pb::StageState::Succeeded);
    let lines = logs(&mut client, run.id, "data").await?;
    ensure!(
        lines.iter().any(|entry| entry
            .line
            .as_ref()
            .is_some_and(|l| l.text == "data changed")),
        "{lines:#?}"
    );

    // Another branch: `release` is skipped by its `if:`, and what needs it
    // is skipped too.
    repo.git(&["checkout", "-q", "-b", "dev"])?;
    repo.commit("notes.txt", "dev work\n")?;
    let run = run_to_end(&farm, "cond", "dev", &[]).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    let (state, message) = state_of(&run, "release");
    assert_eq!(state, pb::StageState::Skipped);
    assert_eq!(
        message,
        r#"skipped: `if: branch == "main" || params.FORCE == true` is false (branch = "dev", params.FORCE = "false")"#
    );
    let (state, message) = state_of(&run, "after-release");
    assert_eq!(state, pb::StageState::Skipped);
    assert_eq!(message, "skipped: needs `release`, which was skipped");
    assert_eq!(state_of(&run, "build").0, pb::StageState::Succeeded);

    // The same branch with FORCE: it runs.
    let run = run_to_end(&farm, "cond", "dev", &[("FORCE", "true")]).await?;
    assert_eq!(state_of(&run, "release").0, pb::StageState::Succeeded);
    assert_eq!(state_of(&run, "after-release").0, pb::StageState::Succeeded);
    Ok(())
}

const CONCURRENT: &str = r#"
pipeline: conc
concurrency: { group: "deploy-{{ branch }}", cancel_in_progress: true }
params:
  BUILD: { type: int, default: 0 }
  DEPLOY: { type: int, default: 0 }
stages:
  build: { commands: ["sleep $BUILD", "echo built"] }
  deploy:
    needs: [build]
    environment: production
    commands: ["echo deploying", "sleep $DEPLOY", "echo deployed"]
  smoke:
    needs: [deploy]
    commands: ["echo smoke"]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_run_cancels_the_older_but_not_its_running_deploy() -> Result<()> {
    let farm = Farm::start(&Default::default(), &[("conc-agent", "", 4)])?;
    let repo = Repo::new(CONCURRENT)?;
    farm.coordinator.add_repo(&repo, &[])?;

    // The older run is still building: it is cancelled outright.
    let older = start(&farm, "conc", "", &[("BUILD", "60")]).await?;
    until_running(&farm, older, "build").await?;
    let newer = start(&farm, "conc", "", &[]).await?;
    let older_run = finish(&farm, older).await?;
    assert_eq!(
        older_run.state,
        pb::RunState::Cancelled as i32,
        "{older_run:#?}"
    );
    let (state, message) = state_of(&older_run, "build");
    assert_eq!(state, pb::StageState::Cancelled);
    assert_eq!(
        message,
        format!("cancelled: superseded by run {newer} of concurrency group `deploy-main`")
    );
    assert_eq!(state_of(&older_run, "deploy").0, pb::StageState::Cancelled);
    let newer_run = finish(&farm, newer).await?;
    assert_eq!(
        newer_run.state,
        pb::RunState::Succeeded as i32,
        "{newer_run:#?}"
    );

    // The older run is deploying: the deploy finishes and releases, what
    // comes after it is cancelled.
    let older = start(&farm, "conc", "", &[("DEPLOY", "4")]).await?;
    until_running(&farm, older, "deploy").await?;
    let newer = start(&farm, "conc", "", &[]).await?;
    let older_run = finish(&farm, older).await?;
    assert_eq!(
        older_run.state,
        pb::RunState::Cancelled as i32,
        "{older_run:#?}"
    );
    assert_eq!(
        state_of(&older_run, "deploy").0,
        pb::StageState::Succeeded,
        "an environment stage is never cancelled mid-way: {older_run:#?}"
    );
    let mut client = farm.coordinator.client().await?;
    let lines = logs(&mut client, older, "deploy").await?;
    ensure!(
        lines
            .iter()
            .any(|entry| entry.line.as_ref().is_some_and(|l| l.text == "deployed")),
        "{lines:#?}"
    );
    assert_eq!(state_of(&older_run, "smoke").0, pb::StageState::Cancelled);
    let newer_run = finish(&farm, newer).await?;
    assert_eq!(
        newer_run.state,
        pb::RunState::Succeeded as i32,
        "{newer_run:#?}"
    );
    let history = client
        .environment_history(pb::EnvironmentHistoryRequest {
            environment: "production".into(),
            pipeline: "conc".into(),
        })
        .await?
        .into_inner()
        .releases;
    let runs: Vec<u64> = history.iter().map(|release| release.run_id).collect();
    ensure!(
        runs.first() == Some(&newer) && runs.get(1) == Some(&older),
        "the superseded run's deploy released, then the newer run's (newest first): {runs:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_cancel_in_progress_a_newer_run_waits_for_the_older() -> Result<()> {
    let farm = Farm::start(&Default::default(), &[("queue-agent", "", 4)])?;
    let queued = CONCURRENT.replace(
        r#"concurrency: { group: "deploy-{{ branch }}", cancel_in_progress: true }"#,
        r#"concurrency: "deploy-{{ branch }}""#,
    );
    let repo = Repo::new(&queued)?;
    farm.coordinator.add_repo(&repo, &[])?;
    let older = start(&farm, "conc", "", &[("BUILD", "3")]).await?;
    until_running(&farm, older, "build").await?;
    let newer = start(&farm, "conc", "", &[]).await?;
    let mut client = farm.coordinator.client().await?;
    let waiting = get_run(&mut client, newer).await?;
    assert_eq!(
        state_of(&waiting, "build").0,
        pb::StageState::Pending,
        "the newer run waits: {waiting:#?}"
    );
    let older_run = finish(&farm, older).await?;
    assert_eq!(
        older_run.state,
        pb::RunState::Succeeded as i32,
        "{older_run:#?}"
    );
    let newer_run = finish(&farm, newer).await?;
    assert_eq!(
        newer_run.state,
        pb::RunState::Succeeded as i32,
        "{newer_run:#?}"
    );
    let started = stage(&newer_run, "build").started_ms;
    let ended = older_run.finished_ms;
    ensure!(
        started >= ended,
        "the newer run started ({started}) only after the older ended ({ended})"
    );
    Ok(())
}

const GUARDED: &str = r#"
pipeline: guard
params:
  BUILD: { type: int, default: 0 }
  DEPLOY: { type: int, default: 0 }
stages:
  build: { commands: ["sleep $BUILD"] }
  deploy:
    needs: [build]
    environment: production
    commands: ["sleep $DEPLOY", "echo deployed $KILN_COMMIT"]
"#;

/// The live release of `production` of `pipeline`, by run and commit.
async fn live(farm: &Farm, pipeline: &str) -> Result<(u64, String)> {
    let mut client = farm.coordinator.client().await?;
    let environments = client
        .list_environments(pb::ListEnvironmentsRequest {})
        .await?
        .into_inner()
        .environments;
    let live = environments
        .iter()
        .find(|env| env.pipeline == pipeline && env.name == "production")
        .map(|env| env.live_release)
        .filter(|&id| id != 0)
        .context("production has a live release")?;
    let release = client
        .get_release(pb::GetReleaseRequest { release_id: live })
        .await?
        .into_inner();
    Ok((release.run_id, release.commit))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_commit_never_replaces_a_newer_release() -> Result<()> {
    let farm = Farm::start(&Default::default(), &[("guard-agent", "", 4)])?;
    let repo = Repo::new(GUARDED)?;
    farm.coordinator.add_repo(&repo, &[])?;
    let old_commit = repo.commit("model.txt", "v1\n")?;
    let new_commit = repo.commit("model.txt", "v2\n")?;

    // Two runs 0.3 s apart, the older (of the older commit) slower to
    // build: the newer commit deploys first, and the older deploy is
    // skipped with the reason.
    let older = start(&farm, "guard", &old_commit, &[("BUILD", "3")]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let newer = start(&farm, "guard", &new_commit, &[]).await?;
    let newer_run = finish(&farm, newer).await?;
    assert_eq!(
        newer_run.state,
        pb::RunState::Succeeded as i32,
        "{newer_run:#?}"
    );
    let older_run = finish(&farm, older).await?;
    let (state, message) = state_of(&older_run, "deploy");
    assert_eq!(state, pb::StageState::Skipped, "{older_run:#?}");
    ensure!(
        message.starts_with("skipped: outdated deploy: `production` runs release")
            && message.contains(&new_commit[..12])
            && message.contains(&old_commit[..12]),
        "{message}"
    );
    assert_eq!(live(&farm, "guard").await?, (newer, new_commit.clone()));

    // The same race with the older deploy itself the slower: deploys to
    // one environment go one at a time, so the newer one waits, is checked
    // against the release the older one made, and replaces it — never the
    // other way round.
    let third = repo.commit("model.txt", "v3\n")?;
    let fourth = repo.commit("model.txt", "v4\n")?;
    let older = start(&farm, "guard", &third, &[("DEPLOY", "3")]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let newer = start(&farm, "guard", &fourth, &[]).await?;
    let older_run = finish(&farm, older).await?;
    let newer_run = finish(&farm, newer).await?;
    assert_eq!(state_of(&older_run, "deploy").0, pb::StageState::Succeeded);
    assert_eq!(state_of(&newer_run, "deploy").0, pb::StageState::Succeeded);
    ensure!(
        stage(&newer_run, "deploy").started_ms >= stage(&older_run, "deploy").finished_ms,
        "the newer deploy started after the older one ended: {older_run:#?} {newer_run:#?}"
    );
    assert_eq!(live(&farm, "guard").await?, (newer, fourth));
    Ok(())
}

const HOOK_KEY: &str = "params-hook-key-1";

fn sign(body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(HOOK_KEY.as_bytes()).expect("any key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A signed GitHub push of `commit` to main, to `/hooks/PIPELINE?QUERY`.
async fn push_hook(farm: &Farm, query: &str, commit: &str) -> Result<(u16, serde_json::Value)> {
    let body = serde_json::json!({
        "ref": "refs/heads/main",
        "after": commit,
        "pusher": {"name": "alice"},
    })
    .to_string()
    .into_bytes();
    let url = format!("http://{}/hooks/sourced?{query}", farm.coordinator.http);
    let response = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("X-GitHub-Event", "push")
        .header("X-Hub-Signature-256", sign(&body))
        .body(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

const SOURCED: &str = r#"
pipeline: sourced
params:
  EPOCHS: { type: int, default: 10 }
on:
  push: { branches: [main], secret: HOOK_KEY }
  schedule:
    - { cron: "* * * * *", params: { EPOCHS: 50 } }
stages:
  show: { commands: ["echo epochs=$EPOCHS event=$KILN_EVENT"] }
"#;

async fn epochs_line(farm: &Farm, run: u64) -> Result<String> {
    let mut client = farm.coordinator.client().await?;
    let lines = logs(&mut client, run, "show").await?;
    lines
        .iter()
        .filter_map(|entry| entry.line.as_ref())
        .map(|line| line.text.clone())
        .find(|text| text.starts_with("epochs="))
        .with_context(|| format!("no epochs line in {lines:#?}"))
}

/// Webhooks take parameters from the hook's URL and schedules from their
/// entry, each checked against the declared types like `kiln run -p`.
#[tokio::test(flavor = "multi_thread")]
async fn webhooks_and_schedules_start_runs_with_parameters() -> Result<()> {
    let farm = Farm::start(&Default::default(), &[("sourced-agent", "", 2)])?;
    let repo = Repo::new(SOURCED)?;
    farm.coordinator.add_repo(&repo, &[])?;
    farm.coordinator.set_secret("HOOK_KEY", HOOK_KEY).await?;
    let client = farm.coordinator.client().await?;

    let commit = repo.commit("model.txt", "v2\n")?;
    let (status, answer) = push_hook(&farm, "EPOCHS=ten", &commit).await?;
    assert_eq!(status, 400, "{answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("parameter `EPOCHS` is an int") && message.contains("`ten` is not"),
        "{answer}"
    );
    let (status, answer) = push_hook(&farm, "EPOCH=20", &commit).await?;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = push_hook(&farm, "EPOCHS=20", &commit).await?;
    assert_eq!(status, 201, "{answer}");
    let run = finish(&farm, answer["run_id"].as_u64().context("run_id")?).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    assert_eq!(run.params.get("EPOCHS").map(String::as_str), Some("20"));
    assert_eq!(epochs_line(&farm, run.id).await?, "epochs=20 event=push");

    // The schedule's next slot (within a minute) runs with its parameters.
    let scheduled = eventually(Duration::from_secs(75), "a scheduled run", || {
        let mut client = client.clone();
        async move {
            let runs = client
                .list_runs(pb::ListRunsRequest {
                    pipeline: "sourced".into(),
                    limit: 10,
                })
                .await?
                .into_inner()
                .runs;
            Ok(runs
                .into_iter()
                .find(|run| run.triggered_by.starts_with("schedule:")))
        }
    })
    .await?;
    let run = finish(&farm, scheduled.id).await?;
    assert_eq!(run.params.get("EPOCHS").map(String::as_str), Some("50"));
    assert_eq!(
        epochs_line(&farm, run.id).await?,
        "epochs=50 event=schedule"
    );
    Ok(())
}
