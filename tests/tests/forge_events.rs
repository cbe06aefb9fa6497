//! Forge webhooks against a real coordinator, agent and git repository:
//! GitHub, Gitea and GitLab deliveries for a branch push, a tag push and a
//! merge request, each verified by that forge's own scheme
//! (`X-Hub-Signature-256`, `X-Gitea-Signature`, `X-Gitlab-Token`). The
//! payloads are shaped as each forge documents them; the forges themselves
//! do not run here.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hmac::{Hmac, Mac};
use kiln_proto::v1 as pb;
use kiln_tests::{Coordinator, Farm, Repo, logs, wait_run};
use serde_json::json;
use sha2::Sha256;

const KEY: &str = "forge-hook-key-1";
const LIMIT: Duration = Duration::from_secs(60);

const PIPELINE: &str = r#"
pipeline: hooks
on:
  push: { branches: [main, "release/*"] }
  tag: ["v*"]
  merge_request: { branches: [main] }
  secret: HOOK_KEY
stages:
  show:
    commands: ["echo event=$KILN_EVENT branch=${KILN_BRANCH:-} tag=${KILN_TAG:-} mr=${KILN_MR_ID:-}"]
"#;

fn sign(body: &[u8], key: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Adds `repo` and stores the webhook secret its pipeline names.
async fn add_with_hook_key(coordinator: &Coordinator, repo: &Repo) -> Result<()> {
    coordinator.add_repo(repo, &[])?;
    coordinator.set_secret("HOOK_KEY", KEY).await?;
    Ok(())
}

/// POSTs a delivery; returns the status and the JSON answer.
async fn deliver(
    coordinator: &Coordinator,
    body: &serde_json::Value,
    headers: &[(&str, String)],
) -> Result<(u16, serde_json::Value)> {
    let url = format!("http://{}/hooks/hooks", coordinator.http);
    let mut request = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

fn github(body: &serde_json::Value, event: &str, delivery: &str) -> Vec<(&'static str, String)> {
    vec![
        ("X-GitHub-Event", event.to_owned()),
        ("X-GitHub-Delivery", delivery.to_owned()),
        (
            "X-Hub-Signature-256",
            format!("sha256={}", sign(body.to_string().as_bytes(), KEY)),
        ),
    ]
}

fn gitea(body: &serde_json::Value, event: &str, delivery: &str) -> Vec<(&'static str, String)> {
    vec![
        ("X-Gitea-Event", event.to_owned()),
        ("X-Gitea-Delivery", delivery.to_owned()),
        ("X-Gitea-Signature", sign(body.to_string().as_bytes(), KEY)),
    ]
}

fn gitlab(event: &str, token: &str, uuid: &str) -> Vec<(&'static str, String)> {
    vec![
        ("X-Gitlab-Event", event.to_owned()),
        ("X-Gitlab-Event-UUID", uuid.to_owned()),
        ("X-Gitlab-Token", token.to_owned()),
    ]
}

async fn run_count(coordinator: &Coordinator) -> Result<usize> {
    let runs = coordinator
        .client()
        .await?
        .list_runs(pb::ListRunsRequest {
            pipeline: "hooks".into(),
            limit: 100,
        })
        .await?
        .into_inner()
        .runs;
    Ok(runs.len())
}

/// Waits for the run the answer names and returns its one log line.
async fn shown(coordinator: &Coordinator, answer: &serde_json::Value) -> Result<String> {
    let id = answer["run_id"]
        .as_u64()
        .context("the answer names a run")?;
    let mut client = coordinator.client().await?;
    let run = wait_run(&mut client, id, LIMIT).await?;
    ensure!(run.state == pb::RunState::Succeeded as i32, "{run:#?}");
    let lines = logs(&mut client, id, "show").await?;
    lines
        .iter()
        .filter_map(|entry| entry.line.as_ref())
        .map(|line| line.text.clone())
        .find(|text| text.starts_with("event="))
        .with_context(|| format!("{lines:#?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn github_gitea_and_gitlab_events_start_the_right_runs_once() -> Result<()> {
    let mut farm = Farm::start(&Default::default(), &[("forge-agent", "", 2)])?;
    let coordinator = &farm.coordinator;
    let repo = Repo::new(PIPELINE)?;
    let main = repo.commit("model.txt", "v1\n")?;
    repo.git(&["tag", "v1"])?;
    repo.git(&["checkout", "-q", "-b", "feature"])?;
    let feature = repo.commit("model.txt", "v2\n")?;
    repo.git(&["checkout", "-q", "main"])?;
    add_with_hook_key(coordinator, &repo).await?;

    // GitHub: a branch push, without the repository fields Kiln ignores.
    let push = json!({"ref": "refs/heads/main", "after": main, "pusher": {"name": "ada"}});
    let (status, answer) = deliver(coordinator, &push, &github(&push, "push", "gh-1")).await?;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(
        shown(coordinator, &answer).await?,
        "event=push branch=main tag= mr="
    );
    // The same delivery again, and another delivery of the same push:
    // one run.
    let (status, answer) = deliver(coordinator, &push, &github(&push, "push", "gh-1")).await?;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = deliver(coordinator, &push, &github(&push, "push", "gh-2")).await?;
    assert_eq!(status, 200, "{answer}");
    ensure!(
        answer["message"]
            .as_str()
            .unwrap_or_default()
            .contains("already started run")
    );
    assert_eq!(run_count(coordinator).await?, 1);
    // A wrong signature is refused before anything is read.
    let mut forged = github(&push, "push", "gh-3");
    forged[2].1 = format!(
        "sha256={}",
        sign(push.to_string().as_bytes(), "not-the-key")
    );
    assert_eq!(deliver(coordinator, &push, &forged).await?.0, 401);

    // Gitea: a tag push.
    let tag = json!({"ref": "refs/tags/v1", "after": main, "pusher": {"login": "grace"}});
    let (status, answer) = deliver(coordinator, &tag, &gitea(&tag, "push", "gt-1")).await?;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(
        shown(coordinator, &answer).await?,
        "event=tag branch= tag=v1 mr="
    );
    let other_tag = json!({"ref": "refs/tags/nightly", "after": main});
    let (status, answer) =
        deliver(coordinator, &other_tag, &gitea(&other_tag, "push", "gt-2")).await?;
    assert_eq!(status, 202, "{answer}");

    // GitLab: a merge request into main from `feature`, by token.
    let request = json!({
        "object_kind": "merge_request",
        "user": {"username": "bob"},
        "object_attributes": {"iid": 5, "action": "open", "source_branch": "feature",
            "target_branch": "main", "last_commit": {"id": feature}},
    });
    let (status, _) = deliver(
        coordinator,
        &request,
        &gitlab("Merge Request Hook", "wrong", "gl-0"),
    )
    .await?;
    assert_eq!(status, 401, "a wrong GitLab token");
    let (status, answer) = deliver(
        coordinator,
        &request,
        &gitlab("Merge Request Hook", KEY, "gl-1"),
    )
    .await?;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(
        shown(coordinator, &answer).await?,
        "event=merge_request branch=feature tag= mr=5"
    );
    // Into another branch: not built.
    let mut elsewhere = request.clone();
    elsewhere["object_attributes"]["target_branch"] = json!("dev");
    let (status, answer) = deliver(
        coordinator,
        &elsewhere,
        &gitlab("Merge Request Hook", KEY, "gl-2"),
    )
    .await?;
    assert_eq!(status, 202, "{answer}");

    // A pushed commit that is not in the registered repository: 422, why.
    let unknown = "ab".repeat(20);
    let stray = json!({"object_kind": "push", "ref": "refs/heads/main", "after": unknown,
        "checkout_sha": unknown});
    let (status, answer) = deliver(coordinator, &stray, &gitlab("Push Hook", KEY, "gl-3")).await?;
    assert_eq!(status, 422, "{answer}");
    ensure!(
        answer["message"]
            .as_str()
            .unwrap_or_default()
            .contains("is not in"),
        "{answer}"
    );
    assert_eq!(run_count(coordinator).await?, 3);

    // What a delivery started is durable: after a crash, a repeat of the
    // first push still starts nothing.
    farm.coordinator
        .crash_and_restart(&Default::default(), Duration::from_millis(100))?;
    let coordinator = &farm.coordinator;
    let (status, answer) = deliver(coordinator, &push, &github(&push, "push", "gh-1")).await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(run_count(coordinator).await?, 3);
    Ok(())
}

/// Delivery keys (`W` records) are bounded: past `--max-webhook-deliveries`
/// the oldest runs' keys are forgotten, so a very late redelivery starts a
/// run again while a recent one still does not, also after a restart.
#[tokio::test(flavor = "multi_thread")]
async fn the_oldest_delivery_keys_expire_past_the_bound() -> Result<()> {
    let options = kiln_tests::CoordinatorOptions {
        // Each push leaves two keys: its delivery id, and its event, ref
        // and commit.
        extra_args: vec!["--max-webhook-deliveries".into(), "4".into()],
        ..Default::default()
    };
    let mut farm = Farm::start(&options, &[("expiry-agent", "", 2)])?;
    let repo = Repo::new(PIPELINE)?;
    let commits = [
        repo.commit("model.txt", "1\n")?,
        repo.commit("model.txt", "2\n")?,
        repo.commit("model.txt", "3\n")?,
    ];
    let coordinator = &farm.coordinator;
    add_with_hook_key(coordinator, &repo).await?;
    let push = |commit: &str| json!({"ref": "refs/heads/main", "after": commit});
    for (n, commit) in commits.iter().enumerate() {
        let body = push(commit);
        let delivery = format!("gh-{n}");
        let (status, answer) =
            deliver(coordinator, &body, &github(&body, "push", &delivery)).await?;
        assert_eq!(status, 201, "{answer}");
        shown(coordinator, &answer).await?;
    }
    assert_eq!(run_count(coordinator).await?, 3);
    // The newest delivery is still remembered ...
    let newest = push(&commits[2]);
    let (status, answer) = deliver(coordinator, &newest, &github(&newest, "push", "gh-2")).await?;
    assert_eq!(status, 200, "{answer}");
    // ... the oldest is not: the same delivery starts a run again.
    let oldest = push(&commits[0]);
    let (status, answer) = deliver(coordinator, &oldest, &github(&oldest, "push", "gh-0")).await?;
    assert_eq!(status, 201, "the first run's keys expired: {answer}");
    shown(coordinator, &answer).await?;
    assert_eq!(run_count(coordinator).await?, 4);

    // What expired is gone from the store too: after a restart the bound
    // holds and the recent keys are still there.
    farm.coordinator
        .crash_and_restart(&options, Duration::from_millis(100))?;
    let coordinator = &farm.coordinator;
    let (status, answer) = deliver(coordinator, &oldest, &github(&oldest, "push", "gh-0")).await?;
    assert_eq!(status, 200, "the repeat's own keys are recent: {answer}");
    let middle = push(&commits[1]);
    let (status, answer) = deliver(coordinator, &middle, &github(&middle, "push", "gh-1")).await?;
    assert_eq!(status, 201, "the second run's keys expired: {answer}");
    shown(coordinator, &answer).await?;
    Ok(())
}

/// A pull request from a fork: its head commit is on no branch of the
/// repository, only under `refs/pull/N/head` (GitHub, Gitea) or
/// `refs/merge-requests/N/head` (GitLab). A remote repository's mirror
/// fetches those, so the run starts instead of a 422.
#[tokio::test(flavor = "multi_thread")]
async fn a_pull_request_from_a_fork_is_built_from_its_pull_ref() -> Result<()> {
    let farm = Farm::start(&Default::default(), &[("fork-agent", "", 2)])?;
    let repo = Repo::new(PIPELINE)?;
    repo.commit("model.txt", "base\n")?;
    // The fork's commits, reachable only from the pull and merge request refs.
    repo.git(&["checkout", "-q", "-b", "fork"])?;
    let github_head = repo.commit("model.txt", "from a fork\n")?;
    let gitlab_head = repo.commit("model.txt", "from another fork\n")?;
    repo.git(&["checkout", "-q", "main"])?;
    repo.git(&["update-ref", "refs/pull/9/head", &github_head])?;
    repo.git(&["update-ref", "refs/merge-requests/4/head", &gitlab_head])?;
    repo.git(&["branch", "-q", "-D", "fork"])?;
    let url = format!("file://{}", repo.path().display());
    let coordinator = &farm.coordinator;
    let added = coordinator.kiln(&["repo", "add", &url, "--name", "forked"]);
    ensure!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    coordinator.set_secret("HOOK_KEY", KEY).await?;

    let opened = json!({"action": "opened", "number": 9, "pull_request": {
        "head": {"sha": github_head, "ref": "feature"}, "base": {"ref": "main"}}});
    let (status, answer) = deliver(
        coordinator,
        &opened,
        &github(&opened, "pull_request", "pr-9"),
    )
    .await?;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(
        shown(coordinator, &answer).await?,
        "event=merge_request branch=feature tag= mr=9"
    );

    let request = json!({
        "object_kind": "merge_request",
        "object_attributes": {"iid": 4, "action": "open", "source_branch": "feature",
            "target_branch": "main", "last_commit": {"id": gitlab_head}},
    });
    let (status, answer) = deliver(
        coordinator,
        &request,
        &gitlab("Merge Request Hook", KEY, "mr-4"),
    )
    .await?;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(
        shown(coordinator, &answer).await?,
        "event=merge_request branch=feature tag= mr=4"
    );
    Ok(())
}
