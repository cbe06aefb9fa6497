//! Runs nobody typed, against the real coordinator: signed push webhooks,
//! cron schedules across restarts, and a watched data directory.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, ensure};
use hmac::{Hmac, Mac};
use kiln_proto::v1 as pb;
use kiln_tests::{
    Coordinator, CoordinatorOptions, Farm, Repo, eventually, logs, register, stage, start_agent,
    wait_run,
};
use sha2::Sha256;

const HOOK_KEY: &str = "webhook-signing-key-1";

async fn runs(coordinator: &Coordinator, pipeline: &str) -> Result<Vec<pb::Run>> {
    let mut client = coordinator.client().await?;
    let mut runs = client
        .list_runs(pb::ListRunsRequest {
            pipeline: pipeline.into(),
            limit: 100,
        })
        .await?
        .into_inner()
        .runs;
    runs.reverse();
    Ok(runs)
}

fn sign(body: &[u8], key: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn push_payload(branch: &str, commit: &str) -> Vec<u8> {
    serde_json::json!({
        "ref": format!("refs/heads/{branch}"),
        "before": "0".repeat(40),
        "after": commit,
        "repository": {"full_name": "acme/models", "clone_url": "https://git.example/acme/models.git"},
        "pusher": {"name": "alice"},
        "sender": {"login": "alice"},
    })
    .to_string()
    .into_bytes()
}

/// POSTs a push webhook; returns the status and the JSON answer.
async fn deliver(
    coordinator: &Coordinator,
    pipeline: &str,
    body: Vec<u8>,
    headers: &[(&str, String)],
) -> Result<(u16, serde_json::Value)> {
    let url = format!("http://{}/hooks/{pipeline}", coordinator.http);
    let mut request = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_push_webhooks_start_runs_for_matching_branches_only() -> Result<()> {
    let farm = Farm::start(
        &CoordinatorOptions::default(),
        &[("hook-agent", "role=build", 2)],
    )?;
    let coordinator = &farm.coordinator;
    let repo = Repo::new(
        r#"
pipeline: hooked
triggers:
  push: { branches: [main, "release/*"], secret: HOOK_KEY }
stages:
  build:
    commands: ["echo built $KILN_COMMIT"]
"#,
    )?;
    let pipeline = register(coordinator, &repo).await?;
    let commit = repo.commit("model.txt", "v2\n")?;
    let body = push_payload("main", &commit);

    // No secret set yet: the hook cannot be checked, so nothing runs.
    let (status, _) = deliver(coordinator, &pipeline, body.clone(), &[]).await?;
    assert_eq!(status, 503);
    coordinator.set_secret("HOOK_KEY", HOOK_KEY).await?;

    let (status, answer) = deliver(coordinator, &pipeline, body.clone(), &[]).await?;
    assert_eq!(status, 401, "unsigned: {answer}");
    let wrong = format!("sha256={}", sign(&body, "not-the-key"));
    let (status, answer) = deliver(
        coordinator,
        &pipeline,
        body.clone(),
        &[("X-Hub-Signature-256", wrong)],
    )
    .await?;
    assert_eq!(status, 401, "wrongly signed: {answer}");
    // Signed for another body: the signature covers every byte.
    let mut tampered = body.clone();
    tampered.push(b' ');
    let signature = format!("sha256={}", sign(&body, HOOK_KEY));
    let (status, _) = deliver(
        coordinator,
        &pipeline,
        tampered,
        &[("X-Hub-Signature-256", signature.clone())],
    )
    .await?;
    assert_eq!(status, 401);
    assert!(runs(coordinator, &pipeline).await?.is_empty());

    let (status, answer) = deliver(
        coordinator,
        &pipeline,
        body.clone(),
        &[
            ("X-Hub-Signature-256", signature),
            ("X-GitHub-Event", "push".into()),
        ],
    )
    .await?;
    assert_eq!(status, 201, "{answer}");
    let id = answer["run_id"].as_u64().expect("the answer names the run");
    let mut client = coordinator.client().await?;
    let run = wait_run(&mut client, id, Duration::from_secs(60)).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    assert_eq!(run.commit, commit);
    assert_eq!(run.triggered_by, "push:alice@main");
    let lines = logs(&mut client, id, "build").await?;
    assert!(
        lines.iter().any(|l| l
            .line
            .as_ref()
            .is_some_and(|l| l.text == format!("built {commit}"))),
        "{lines:#?}"
    );

    // A branch the pipeline does not build, signed Gitea-style.
    let feature = push_payload("feature/x", &commit);
    let gitea = sign(&feature, HOOK_KEY);
    let (status, answer) = deliver(
        coordinator,
        &pipeline,
        feature,
        &[
            ("X-Gitea-Signature", gitea),
            ("X-Gitea-Event", "push".into()),
        ],
    )
    .await?;
    assert_eq!(status, 202, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap_or_default()
            .contains("feature/x")
    );
    // A matching pattern, Gitea-style.
    let release = push_payload("release/1.0", &commit);
    let gitea = sign(&release, HOOK_KEY);
    let (status, answer) = deliver(
        coordinator,
        &pipeline,
        release,
        &[
            ("X-Gitea-Signature", gitea),
            ("X-Gitea-Event", "push".into()),
        ],
    )
    .await?;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(runs(coordinator, &pipeline).await?.len(), 2);

    // Signed deliveries are in the audit log; unsigned ones are only logged.
    let audit = client
        .list_audit(pb::ListAuditRequest { limit: 100 })
        .await?
        .into_inner()
        .entries;
    let hooks: Vec<_> = audit
        .iter()
        .filter(|e| e.principal == format!("webhook:{pipeline}"))
        .collect();
    assert!(!hooks.iter().any(|e| e.outcome == "401"), "{hooks:#?}");
    assert_eq!(
        hooks.iter().filter(|e| e.outcome == "201").count(),
        2,
        "{hooks:#?}"
    );
    assert!(hooks.iter().any(|e| e.outcome == "202"), "{hooks:#?}");
    Ok(())
}

/// Waits until the wall clock is `seconds` past a minute boundary.
async fn until_second(seconds: u64) {
    loop {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        if now.as_secs() % 60 == seconds {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for the pipeline to have exactly `n` runs, then checks it stays
/// there for `quiet`.
async fn exactly(
    coordinator: &Coordinator,
    pipeline: &str,
    n: usize,
    limit: Duration,
    quiet: Duration,
) -> Result<Vec<pb::Run>> {
    eventually(limit, &format!("{n} runs of {pipeline}"), || async {
        Ok((runs(coordinator, pipeline).await?.len() >= n).then_some(()))
    })
    .await?;
    tokio::time::sleep(quiet).await;
    let all = runs(coordinator, pipeline).await?;
    ensure!(
        all.len() == n,
        "expected {n} runs, found {}: {all:#?}",
        all.len()
    );
    Ok(all)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_fires_once_per_slot_across_restarts_and_catches_up_once() -> Result<()> {
    let data = tempfile::tempdir()?;
    let work = tempfile::tempdir()?;
    let grpc = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?.to_string()
    };
    let options = CoordinatorOptions {
        grpc: grpc.clone(),
        ..Default::default()
    };
    let repo = Repo::new(
        r#"
pipeline: nightly
triggers:
  schedule: "* * * * *"
stages:
  retrain:
    commands: ["echo retrained"]
"#,
    )?;
    // Registered just after a minute starts, so the first slot is ~a
    // minute away and the test has time to restart in between.
    until_second(2).await;
    let mut coordinator = Coordinator::start(data.path(), &options)?;
    let _agent = start_agent(
        &coordinator.url(),
        "cron-agent",
        "role=build",
        2,
        work.path(),
    )?;
    let pipeline = register(&coordinator, &repo).await?;

    // The first slot fires once.
    let first = exactly(
        &coordinator,
        &pipeline,
        1,
        Duration::from_secs(75),
        Duration::from_secs(2),
    )
    .await?;
    assert!(
        first[0].triggered_by.starts_with("schedule:"),
        "{:?}",
        first[0].triggered_by
    );

    // A crash right after: the slot is not fired again.
    coordinator.process.kill9();
    coordinator = Coordinator::start(data.path(), &options)?;
    exactly(
        &coordinator,
        &pipeline,
        1,
        Duration::from_secs(5),
        Duration::from_secs(4),
    )
    .await?;

    // Down across the next slot: exactly one catch-up run on start.
    coordinator.process.terminate(Duration::from_secs(10))?;
    until_second(5).await;
    let restarted = Instant::now();
    coordinator = Coordinator::start(data.path(), &options)?;
    let all = exactly(
        &coordinator,
        &pipeline,
        2,
        Duration::from_secs(10),
        Duration::from_secs(3),
    )
    .await?;
    assert!(
        restarted.elapsed() < Duration::from_secs(50),
        "the catch-up waited for a later slot"
    );
    let mut client = coordinator.client().await?;
    let run = wait_run(&mut client, all[1].id, Duration::from_secs(60)).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    Ok(())
}

fn write_slowly(path: &Path, parts: &[&str], pause: Duration) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    for part in parts {
        file.write_all(part.as_bytes())?;
        file.flush()?;
        std::thread::sleep(pause);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn new_data_starts_exactly_one_run_after_it_settles() -> Result<()> {
    let raw = tempfile::tempdir()?;
    let farm = Farm::start(
        &CoordinatorOptions::default(),
        &[("data-agent", "role=build", 2)],
    )?;
    let coordinator = &farm.coordinator;
    let repo = Repo::new(&format!(
        r#"
pipeline: fresh-data
triggers:
  data: {{ watch: {}, every: 1s, settle: 3s, into: data/raw }}
stages:
  train:
    commands: ["cat data/raw/*.csv", "wc -l < data/raw/customers.csv"]
"#,
        raw.path().display()
    ))?;
    let pipeline = register(coordinator, &repo).await?;
    // Empty directory: nothing to train on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(runs(coordinator, &pipeline).await?.is_empty());

    // Written in two parts, 1.5 s apart: one run, with the whole file.
    let file = raw.path().join("customers.csv");
    let writer = {
        let file = file.clone();
        tokio::task::spawn_blocking(move || {
            write_slowly(
                &file,
                &["id,bought\n1,0\n", "2,1\n3,1\n"],
                Duration::from_millis(1500),
            )
        })
    };
    writer.await??;
    let all = exactly(
        coordinator,
        &pipeline,
        1,
        Duration::from_secs(20),
        Duration::from_secs(5),
    )
    .await?;
    let mut client = coordinator.client().await?;
    let run = wait_run(&mut client, all[0].id, Duration::from_secs(60)).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    assert!(
        run.triggered_by.starts_with("data:"),
        "{}",
        run.triggered_by
    );
    assert_eq!(run.datasets.len(), 1, "{run:#?}");
    let dataset = &run.datasets[0];
    assert_eq!(dataset.path, "data/raw");
    assert!(dataset.digest.starts_with("sha256:") && dataset.content_digest.starts_with("sha256:"));
    let lines: Vec<String> = logs(&mut client, run.id, "train")
        .await?
        .into_iter()
        .filter_map(|entry| entry.line.map(|line| line.text))
        .collect();
    assert!(lines.iter().any(|l| l == "3,1"), "{lines:#?}");
    assert!(lines.iter().any(|l| l.trim() == "4"), "{lines:#?}");
    let _ = stage(&run, "train");

    // Changed content: one more run, with a different dataset digest.
    std::fs::write(raw.path().join("more.csv"), "4,0\n")?;
    let all = exactly(
        coordinator,
        &pipeline,
        2,
        Duration::from_secs(20),
        Duration::from_secs(4),
    )
    .await?;
    assert_ne!(all[1].datasets[0].content_digest, dataset.content_digest);
    Ok(())
}
