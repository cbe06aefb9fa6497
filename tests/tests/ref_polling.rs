//! Polling a repository for a forge without webhooks (`kiln repo add
//! --poll`), against a real coordinator, a real agent and real git: one
//! run per new commit on a branch or tag the `on:` filters accept, none
//! for what was there before polling began, none for a commit a webhook
//! delivery already started, and none again after a restart.

use std::time::Duration;

use anyhow::{Result, ensure};
use hmac::{Hmac, Mac};
use kiln_proto::v1 as pb;
use kiln_tests::{Coordinator, CoordinatorOptions, Farm, Repo, eventually, wait_run};
use serde_json::json;
use sha2::Sha256;

const KEY: &str = "poll-hook-key";
const LIMIT: Duration = Duration::from_secs(60);
/// Longer than a few polls at `--poll 1s`.
const QUIET: Duration = Duration::from_millis(3500);

const PIPELINE: &str = r#"
pipeline: polled
on:
  push: { branches: [main] }
  tag: ["v*"]
  secret: HOOK_KEY
stages:
  show:
    commands: ["echo event=$KILN_EVENT branch=${KILN_BRANCH:-} tag=${KILN_TAG:-}"]
"#;

/// Every run of the pipeline, oldest first, as (commit, event variable).
async fn runs(coordinator: &Coordinator) -> Result<Vec<pb::Run>> {
    let mut runs = coordinator
        .client()
        .await?
        .list_runs(pb::ListRunsRequest {
            pipeline: "polled".into(),
            limit: 100,
        })
        .await?
        .into_inner()
        .runs;
    runs.reverse();
    Ok(runs)
}

async fn wait_for_runs(coordinator: &Coordinator, n: usize) -> Result<Vec<pb::Run>> {
    let runs = eventually(LIMIT, &format!("{n} runs"), || async {
        let runs = runs(coordinator).await?;
        Ok((runs.len() >= n).then_some(runs))
    })
    .await?;
    let mut client = coordinator.client().await?;
    for run in &runs {
        let done = wait_run(&mut client, run.id, LIMIT).await?;
        ensure!(done.state == pb::RunState::Succeeded as i32, "{done:#?}");
    }
    Ok(runs)
}

async fn push_hook(coordinator: &Coordinator, commit: &str) -> Result<u16> {
    let body = json!({"ref": "refs/heads/main", "after": commit}).to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes())?;
    mac.update(body.as_bytes());
    let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let response = reqwest::Client::new()
        .post(format!("http://{}/hooks/polled", coordinator.http))
        .header("content-type", "application/json")
        .header("X-GitHub-Event", "push")
        .header("X-GitHub-Delivery", format!("d-{commit}"))
        .header("X-Hub-Signature-256", signature)
        .body(body)
        .send()
        .await?;
    Ok(response.status().as_u16())
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_starts_one_run_per_new_commit_and_none_twice() -> Result<()> {
    let options = CoordinatorOptions::default();
    let mut farm = Farm::start(&options, &[("poll-agent", "", 2)])?;
    let repo = Repo::new(PIPELINE)?;
    repo.commit("model.txt", "before polling\n")?;
    repo.git(&["tag", "v0"])?;
    let coordinator = &farm.coordinator;
    coordinator.set_secret("HOOK_KEY", KEY).await?;
    coordinator.add_repo(&repo, &["--poll", "1s"])?;

    // What was there before polling began starts nothing.
    tokio::time::sleep(QUIET).await;
    assert_eq!(runs(coordinator).await?.len(), 0);

    // A new commit on main: one run, at that commit, as a push.
    let first = repo.commit("model.txt", "1\n")?;
    let seen = wait_for_runs(coordinator, 1).await?;
    assert_eq!(seen[0].commit, first);
    assert_eq!(
        seen[0].variables.get("KILN_EVENT").map(String::as_str),
        Some("push")
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(runs(coordinator).await?.len(), 1, "one run per commit");

    // A commit a webhook delivered first: the poll starts nothing more.
    repo.git(&["checkout", "-q", "-b", "side"])?;
    let second = repo.commit("model.txt", "2\n")?;
    assert_eq!(push_hook(coordinator, &second).await?, 201);
    repo.git(&["checkout", "-q", "main"])?;
    repo.git(&["merge", "-q", "--ff-only", "side"])?;
    tokio::time::sleep(QUIET).await;
    let seen = wait_for_runs(coordinator, 2).await?;
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(seen[1].commit, second);
    assert!(
        seen[1].triggered_by.starts_with("push:"),
        "{}",
        seen[1].triggered_by
    );

    // A branch the filters leave out, and a tag they accept.
    repo.git(&["checkout", "-q", "-b", "feature"])?;
    let third = repo.commit("model.txt", "3\n")?;
    repo.git(&["checkout", "-q", "main"])?;
    repo.git(&["tag", "-a", "v1", "-m", "v1", &third])?;
    repo.git(&["tag", "nightly", &third])?;
    let seen = wait_for_runs(coordinator, 3).await?;
    assert_eq!(seen[2].commit, third);
    assert_eq!(
        seen[2].variables.get("KILN_TAG").map(String::as_str),
        Some("v1")
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        runs(coordinator).await?.len(),
        3,
        "feature and nightly start nothing"
    );

    // The refs seen are durable: a restart starts nothing again ...
    farm.coordinator
        .crash_and_restart(&options, Duration::from_millis(100))?;
    let coordinator = &farm.coordinator;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        runs(coordinator).await?.len(),
        3,
        "nothing again after a restart"
    );
    // ... and the next commit runs.
    let fourth = repo.commit("model.txt", "4\n")?;
    let seen = wait_for_runs(coordinator, 4).await?;
    assert_eq!(seen[3].commit, fourth);
    Ok(())
}
