//! ML delivery end to end on real processes: gates decided by the
//! coordinator from metrics it parsed, releases per environment, a monitor
//! that scrapes a live endpoint and rolls back after exactly
//! `failure_limit` breaches, manual approval and rejection, manual
//! rollback, and alerts reaching a webhook.
//!
//! The "model" is a text file and the "server" a tiny exposition endpoint
//! in this test whose error ratio depends on which model is deployed, so a
//! bad release degrades live and the restored one heals it.

use std::time::Duration;

use anyhow::{Context, Result};
use kiln_proto::v1 as pb;
use kiln_tests::delivery::{
    farm, history, model_server, release_state, ship, ship_pipeline, spec, state, webhook,
};
use kiln_tests::{CoordinatorOptions, Farm, Repo, eventually, get_run, stage, wait_run};

#[tokio::test(flavor = "multi_thread")]
async fn promotion_gates_monitoring_and_automatic_rollback() -> Result<()> {
    let serve = tempfile::tempdir()?;
    let server = model_server(serve.path().to_path_buf()).await?;
    let (port, scrapes) = (server.port, server.scrapes.clone());
    let (hook, alerts) = webhook().await?;
    let farm = farm(&hook)?;
    let repo = Repo::new(&spec(serve.path(), port))?;

    // 1. First deployment: no champion yet, thresholds alone decide.
    let first = ship(
        &farm,
        &repo,
        "good-1\n",
        r#"{"recall": 0.8, "precision": 0.3}"#,
    )
    .await?;
    assert_eq!(first.state, pb::RunState::Succeeded as i32, "{first:#?}");
    let gate = stage(&first, "acceptance").gate.clone().unwrap();
    assert!(
        gate.passed && gate.summary.contains("first deployment"),
        "{}",
        gate.summary
    );
    assert_eq!(stage(&first, "evaluate").metrics["recall"], 0.8);
    let production = history(&farm, "production").await?;
    assert_eq!(production.len(), 1);
    let good = production[0].clone();
    assert_eq!(release_state(&good), pb::ReleaseState::Live);
    assert!(
        good.artifacts
            .iter()
            .any(|a| a.path == "build/model" && a.stage == "train"),
        "{good:#?}"
    );
    assert_eq!(good.metrics["recall"], 0.8);

    // 2. A model that passes the offline gate but misbehaves live.
    let scrapes_before = *scrapes.lock().unwrap();
    let second = ship(
        &farm,
        &repo,
        "bad\n",
        r#"{"recall": 0.78, "precision": 0.31}"#,
    )
    .await?;
    assert_eq!(second.state, pb::RunState::Succeeded as i32, "{second:#?}");
    let gate = stage(&second, "acceptance").gate.clone().unwrap();
    let check = gate
        .checks
        .iter()
        .find(|c| c.rule.contains("vs production"))
        .unwrap();
    assert_eq!((check.value, check.champion), (Some(0.78), Some(0.8)));
    let bad_id = eventually(
        Duration::from_secs(30),
        "the bad release to be rolled back",
        || {
            let farm = &farm;
            async move {
                let releases = history(farm, "production").await?;
                let bad = releases.iter().find(|r| r.run_id == second.id).cloned();
                Ok(bad
                    .filter(|r| release_state(r) == pb::ReleaseState::RolledBack)
                    .map(|r| r.id))
            }
        },
    )
    .await?;
    let releases = history(&farm, "production").await?;
    let bad = releases.iter().find(|r| r.id == bad_id).unwrap();
    assert!(
        bad.reason.contains("3 consecutive breaches"),
        "{}",
        bad.reason
    );
    assert!(
        bad.reason.contains("model_error_ratio=0.9"),
        "{}",
        bad.reason
    );
    let live: Vec<&pb::Release> = releases
        .iter()
        .filter(|r| release_state(r) == pb::ReleaseState::Live)
        .collect();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].id, good.id, "the previous release is live again");
    assert!(live[0].restored_by_rollback);
    assert_eq!(
        std::fs::read_to_string(serve.path().join("production"))?.trim(),
        "good-1",
        "the good model serves again"
    );
    // The dashboard charts the monitor's samples of the watched releases,
    // the breaching rounds marked (curl-style, with the admin token).
    let pipeline = history_pipeline(&releases);
    let page = reqwest::Client::new()
        .get(format!(
            "http://{}/environments/{pipeline}/production",
            farm.coordinator.http
        ))
        .bearer_auth(&farm.coordinator.admin_token)
        .send()
        .await?
        .text()
        .await?;
    let figure = page
        .split(r#"id="monitor-samples""#)
        .nth(1)
        .and_then(|rest| rest.split("</figure>").next())
        .with_context(|| format!("no monitor chart on the environment page: {page}"))?;
    assert!(
        figure.matches(r#"class="mark""#).count() >= 3,
        "the three breaching rounds are marked: {figure}"
    );
    // Exactly failure_limit breaches: the rollback began at the third bad
    // scrape, not before (a few more scrapes may land while it runs).
    let scrapes_during = *scrapes.lock().unwrap() - scrapes_before;
    assert!(scrapes_during >= 3, "{scrapes_during} scrapes");
    eventually(
        Duration::from_secs(10),
        "the rollback alert at the webhook",
        || {
            let alerts = alerts.clone();
            async move {
                let bodies = alerts.lock().unwrap().clone();
                Ok(bodies
                    .iter()
                    .any(|b| b.contains("KilnRollback") && b.contains("production"))
                    .then_some(()))
            }
        },
    )
    .await?;

    // 3. A regression beyond max_regression is stopped by the gate.
    let third = ship(
        &farm,
        &repo,
        "worse\n",
        r#"{"recall": 0.6, "precision": 0.2}"#,
    )
    .await?;
    assert_eq!(third.state, pb::RunState::Failed as i32);
    let acceptance = stage(&third, "acceptance");
    assert_eq!(state(acceptance), pb::StageState::Failed);
    let gate = acceptance.gate.clone().unwrap();
    assert!(
        gate.summary.contains("recall 0.6000 vs champion 0.8000"),
        "{}",
        gate.summary
    );
    assert_eq!(
        state(stage(&third, "deploy-production")),
        pb::StageState::Skipped
    );
    let status = farm.coordinator.kiln(&["status", &third.id.to_string()]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("FAIL recall drop <= 0.1 vs production 0.6000 (champion 0.8000)"),
        "{text}"
    );

    // 4. A missing metric fails the gate and says which policy decided.
    let fourth = ship(
        &farm,
        &repo,
        "good-2\n",
        r#"{"precision": 0.5, "recall": NaN}"#,
    )
    .await?;
    let gate = stage(&fourth, "acceptance").gate.clone().unwrap();
    assert!(!gate.passed);
    assert!(
        gate.summary
            .contains("recall missing or NaN for `>= 0.5` (on_missing: fail decided)"),
        "{}",
        gate.summary
    );

    // 5. Manual rollback of staging to its first release.
    let staging = history(&farm, "staging").await?;
    let first_staging = staging.iter().find(|r| r.run_id == first.id).unwrap().id;
    let rollback = farm.coordinator.kiln(&[
        "--output",
        "json",
        "rollback",
        "staging",
        "--to",
        &first_staging.to_string(),
    ]);
    assert_eq!(
        rollback.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rollback.stderr)
    );
    let run: serde_json::Value = serde_json::from_slice(&rollback.stdout)?;
    let mut client = farm.coordinator.client().await?;
    let finished = wait_run(
        &mut client,
        run["id"].as_u64().unwrap(),
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(
        finished.state,
        pb::RunState::Succeeded as i32,
        "{finished:#?}"
    );
    assert_eq!(
        std::fs::read_to_string(serve.path().join("staging"))?.trim(),
        "good-1"
    );
    let staging = history(&farm, "staging").await?;
    let live = staging
        .iter()
        .find(|r| release_state(r) == pb::ReleaseState::Live)
        .unwrap();
    assert_eq!(live.id, first_staging);
    // The restore made an old release live again: not counted as a new one.
    let (_, exposition) = kiln_tests::prom::http_get(&farm.coordinator.http, "/metrics")?;
    let sample = |series: &str| {
        exposition
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok())
    };
    assert_eq!(
        sample(r#"kiln_releases_total{environment="staging",pipeline="model"}"#),
        Some(staging.len() as f64),
        "{exposition}"
    );
    assert_eq!(
        sample(
            r#"kiln_rollbacks_total{environment="staging",outcome="succeeded",pipeline="model"}"#
        ),
        Some(1.0),
        "{exposition}"
    );
    assert!(
        sample(r#"kiln_stage_duration_seconds_count{pipeline="model",state="succeeded"}"#)
            .is_some_and(|count| count >= 1.0),
        "{exposition}"
    );

    // The release's model is restorable byte for byte by its digest.
    let out = tempfile::tempdir()?;
    let model = good
        .artifacts
        .iter()
        .find(|a| a.path == "build/model")
        .unwrap();
    let channel = farm.coordinator.channel().await?;
    let mut artifacts = pb::artifact_service_client::ArtifactServiceClient::new(channel);
    kiln_agent::transfer::download_and_unpack(
        &mut artifacts,
        &model.digest,
        out.path(),
        out.path(),
        kiln_common::archive::Limits::UNLIMITED,
        |_| {},
    )
    .await?;
    assert_eq!(
        std::fs::read_to_string(out.path().join("build/model/weights"))?,
        "good-1\n"
    );
    let shown = farm
        .coordinator
        .kiln(&["release", "show", &good.id.to_string()]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains(&model.digest) && text.contains("gate       acceptance"),
        "{text}"
    );
    Ok(())
}

/// The live release of `environment`, by id.
async fn live(farm: &Farm, environment: &str) -> Result<u64> {
    let releases = history(farm, environment).await?;
    let live: Vec<u64> = releases
        .iter()
        .filter(|r| release_state(r) == pb::ReleaseState::Live)
        .map(|r| r.id)
        .collect();
    assert_eq!(live.len(), 1, "{environment}: {releases:#?}");
    Ok(live[0])
}

/// Two pipelines, each with `staging` and `production`, on one
/// coordinator: champions, histories, monitors and rollbacks stay within
/// their pipeline.
#[tokio::test(flavor = "multi_thread")]
async fn two_pipelines_keep_their_own_champions_histories_and_rollbacks() -> Result<()> {
    let (hook, alerts) = webhook().await?;
    let farm = farm(&hook)?;
    let (serve_a, serve_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let server_a = model_server(serve_a.path().to_path_buf()).await?;
    let server_b = model_server(serve_b.path().to_path_buf()).await?;
    let model = Repo::new(&spec(serve_a.path(), server_a.port))?;
    let churn = Repo::new(
        &spec(serve_b.path(), server_b.port).replace("pipeline: model", "pipeline: churn"),
    )?;

    let a1 = ship(&farm, &model, "good-a1\n", r#"{"recall": 0.8}"#).await?;
    assert_eq!(a1.state, pb::RunState::Succeeded as i32, "{a1:#?}");

    // churn's first candidate would fail against model's champion (0.6 is
    // more than 10% below 0.8); it has no champion of its own yet.
    let b1 = ship_pipeline(&farm, &churn, "churn", "good-b1\n", r#"{"recall": 0.6}"#).await?;
    assert_eq!(b1.state, pb::RunState::Succeeded as i32, "{b1:#?}");
    let gate = stage(&b1, "acceptance").gate.clone().unwrap();
    assert!(
        gate.passed && gate.summary.contains("first deployment"),
        "{}",
        gate.summary
    );
    // Its second candidate is compared with its own champion only.
    let b2 = ship_pipeline(&farm, &churn, "churn", "good-b2\n", r#"{"recall": 0.58}"#).await?;
    assert_eq!(b2.state, pb::RunState::Succeeded as i32, "{b2:#?}");
    let gate = stage(&b2, "acceptance").gate.clone().unwrap();
    let check = gate
        .checks
        .iter()
        .find(|c| c.rule.contains("vs production"))
        .unwrap();
    assert_eq!((check.value, check.champion), (Some(0.58), Some(0.6)));

    // Each pipeline has its own history and live release.
    let model_production = history(&farm, "model/production").await?;
    assert_eq!(model_production.len(), 1);
    assert_eq!(model_production[0].run_id, a1.id);
    let churn_production = history(&farm, "churn/production").await?;
    let runs: Vec<u64> = churn_production.iter().map(|r| r.run_id).collect();
    assert_eq!(runs, [b2.id, b1.id]);
    assert!(churn_production.iter().all(|r| r.pipeline == "churn"));
    let model_live = live(&farm, "model/production").await?;
    assert_eq!(model_live, model_production[0].id);
    let churn_live = live(&farm, "churn/production").await?;

    // A name two pipelines share is refused alone, with the candidates.
    let ambiguous = farm.coordinator.kiln(&["rollback", "production"]);
    assert_eq!(ambiguous.status.code(), Some(2));
    let message = String::from_utf8_lossy(&ambiguous.stderr);
    assert!(
        message.contains("churn/production, model/production"),
        "{message}"
    );
    let listed = farm.coordinator.kiln(&["env", "ls"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    for name in [
        "model/staging",
        "model/production",
        "churn/staging",
        "churn/production",
    ] {
        assert!(text.contains(name), "{text}");
    }

    // A monitor breach in model rolls model back and leaves churn alone.
    let a2 = ship(&farm, &model, "bad\n", r#"{"recall": 0.79}"#).await?;
    assert_eq!(a2.state, pb::RunState::Succeeded as i32, "{a2:#?}");
    eventually(
        Duration::from_secs(30),
        "model's bad release to be rolled back",
        || {
            let farm = &farm;
            async move {
                let releases = history(farm, "model/production").await?;
                Ok(releases
                    .iter()
                    .any(|r| r.run_id == a2.id && release_state(r) == pb::ReleaseState::RolledBack)
                    .then_some(()))
            }
        },
    )
    .await?;
    assert_eq!(live(&farm, "model/production").await?, model_live);
    assert_eq!(live(&farm, "churn/production").await?, churn_live);
    assert_eq!(history(&farm, "churn/production").await?.len(), 2);
    eventually(Duration::from_secs(10), "the rollback alert", || {
        let alerts = alerts.clone();
        async move {
            let bodies = alerts.lock().unwrap().clone();
            Ok(bodies
                .iter()
                .any(|b| b.contains("KilnRollback") && b.contains("\"pipeline\":\"model\""))
                .then_some(()))
        }
    })
    .await?;

    // Rolling churn's production back restores churn's previous release,
    // says so first, and leaves model's live release untouched.
    let rollback = farm.coordinator.kiln(&["rollback", "churn/production"]);
    let said = String::from_utf8_lossy(&rollback.stdout);
    assert_eq!(
        rollback.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rollback.stderr)
    );
    let churn_previous = churn_production[1].id;
    assert!(
        said.starts_with(&format!(
            "rolling churn/production back from release {churn_live} to release {churn_previous}"
        )),
        "{said}"
    );
    eventually(Duration::from_secs(30), "churn's rollback", || {
        let farm = &farm;
        async move { Ok((live(farm, "churn/production").await? == churn_previous).then_some(())) }
    })
    .await?;
    assert_eq!(
        std::fs::read_to_string(serve_b.path().join("production"))?.trim(),
        "good-b1"
    );
    assert_eq!(live(&farm, "model/production").await?, model_live);
    assert_eq!(
        std::fs::read_to_string(serve_a.path().join("production"))?.trim(),
        "good-a1"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn manual_approval_waits_and_rejection_fails() -> Result<()> {
    let (hook, _alerts) = webhook().await?;
    let farm = farm(&hook)?;
    let yaml = "pipeline: careful\nstages:\n  evaluate:\n    commands: [\"mkdir -p b\", \"echo '{\\\"auc\\\": 0.9}' > b/m.json\"]\n    metrics: b/m.json\n  signoff:\n    needs: [evaluate]\n    gate: { require: { auc: \">= 0.8\" }, approval: manual }\n  ship:\n    needs: [signoff]\n    environment: prod\n    commands: [\"true\"]\n";
    let repo = Repo::new(yaml)?;
    assert_eq!(
        farm.coordinator
            .kiln(&["pipeline", "register", repo.path().to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    let mut client = farm.coordinator.client().await?;
    for (verdict, expected) in [
        ("approve", pb::RunState::Succeeded),
        ("reject", pb::RunState::Failed),
    ] {
        let started = farm.coordinator.kiln(&["run", "careful"]);
        let id: u64 = String::from_utf8(started.stdout)?.trim().parse()?;
        eventually(
            Duration::from_secs(30),
            "the gate to wait for approval",
            || {
                let mut client = client.clone();
                async move {
                    let run = get_run(&mut client, id).await?;
                    Ok(
                        (state(stage(&run, "signoff")) == pb::StageState::AwaitingApproval)
                            .then_some(()),
                    )
                }
            },
        )
        .await?;
        let reason = format!("{verdict}d after reading the report");
        let decided =
            farm.coordinator
                .kiln(&[verdict, &id.to_string(), "signoff", "--reason", &reason]);
        assert_eq!(
            decided.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&decided.stderr)
        );
        let run = wait_run(&mut client, id, Duration::from_secs(30)).await?;
        assert_eq!(run.state, expected as i32, "{verdict}: {run:#?}");
        let gate = stage(&run, "signoff").gate.clone().unwrap();
        // Who decided comes from the token, not from what the client says.
        assert_eq!(gate.decided_by, "admin");
        assert!(
            gate.summary.ends_with(&format!("by admin: {reason}")),
            "{}",
            gate.summary
        );
        assert!(
            stage(&run, "signoff").message.ends_with(&reason),
            "the reason is on the stage: {}",
            stage(&run, "signoff").message
        );
    }
    let again = farm.coordinator.kiln(&["approve", "1", "signoff"]);
    assert_eq!(
        again.status.code(),
        Some(2),
        "a decided gate cannot be decided again"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_freeze_keeps_the_release_and_stops_promotions() -> Result<()> {
    let serve = tempfile::tempdir()?;
    let port = model_server(serve.path().to_path_buf()).await?.port;
    let (hook, alerts) = webhook().await?;
    let farm = farm(&hook)?;
    let yaml = spec(serve.path(), port)
        .replace("      for: 60s", "      for: 60s\n      on_breach: freeze");
    let repo = Repo::new(&yaml)?;
    let first = ship(&farm, &repo, "good-1\n", r#"{"recall": 0.8}"#).await?;
    assert_eq!(first.state, pb::RunState::Succeeded as i32);
    let second = ship(&farm, &repo, "bad\n", r#"{"recall": 0.8}"#).await?;
    assert_eq!(second.state, pb::RunState::Succeeded as i32);
    eventually(Duration::from_secs(20), "production to freeze", || {
        let farm = &farm;
        async move {
            let mut client = farm.coordinator.client().await?;
            let environments = client
                .list_environments(pb::ListEnvironmentsRequest {})
                .await?
                .into_inner()
                .environments;
            Ok(environments
                .iter()
                .any(|e| e.name == "production" && !e.frozen.is_empty())
                .then_some(()))
        }
    })
    .await?;
    // What runs stays: the bad release is still live, nothing rolled back.
    let production = history(&farm, "production").await?;
    assert_eq!(release_state(&production[0]), pb::ReleaseState::Live);
    assert_eq!(production[0].run_id, second.id);
    assert!(
        alerts
            .lock()
            .unwrap()
            .iter()
            .any(|b| b.contains("KilnMonitorBreach"))
    );
    // No promotion while frozen.
    let third = ship(&farm, &repo, "good-2\n", r#"{"recall": 0.8}"#).await?;
    let blocked = stage(&third, "deploy-production");
    assert_eq!(state(blocked), pb::StageState::Failed);
    assert!(blocked.message.contains("frozen"), "{}", blocked.message);
    assert_eq!(
        farm.coordinator
            .kiln(&["env", "unfreeze", "production"])
            .status
            .code(),
        Some(0)
    );
    let fourth = ship(&farm, &repo, "good-3\n", r#"{"recall": 0.81}"#).await?;
    assert_eq!(fourth.state, pb::RunState::Succeeded as i32, "{fourth:#?}");
    Ok(())
}

/// The monitor reads a real Prometheus server (which scrapes the model
/// server), and the rollback alert reaches a real Alertmanager.
#[tokio::test(flavor = "multi_thread")]
async fn prometheus_query_monitor_rolls_back_and_alertmanager_gets_the_alert() -> Result<()> {
    const TEST: &str = "prometheus_query_monitor_rolls_back_and_alertmanager_gets_the_alert";
    let serve = tempfile::tempdir()?;
    let port = model_server(serve.path().to_path_buf()).await?.port;
    let target = format!("127.0.0.1:{port}");
    let Some(prometheus) = kiln_tests::prom::Prometheus::start(TEST, &[target.as_str()])? else {
        return Ok(());
    };
    let Some(alertmanager) = kiln_tests::prom::Alertmanager::start(TEST)? else {
        return Ok(());
    };
    let options = CoordinatorOptions {
        extra_args: vec![
            "--alertmanager-url".into(),
            format!("http://{}", alertmanager.addr),
        ],
        ..Default::default()
    };
    let farm = Farm::start(&options, &[("deliver", "", 2)])?;
    let monitor = format!(
        "    monitor:\n      prometheus: {{ url: \"http://{}\", query: \"max(model_error_ratio)\" }}\n      every: 500ms\n      rollback_when: {{ model_error_ratio: \"> 0.5\" }}\n      failure_limit: 2\n      for: 60s\n",
        prometheus.addr
    );
    let base = spec(serve.path(), port);
    let cut = base.find("    monitor:").unwrap();
    let repo = Repo::new(&format!("{}{monitor}", &base[..cut]))?;

    let first = ship(&farm, &repo, "good-1\n", r#"{"recall": 0.8}"#).await?;
    assert_eq!(first.state, pb::RunState::Succeeded as i32, "{first:#?}");
    let second = ship(&farm, &repo, "bad\n", r#"{"recall": 0.8}"#).await?;
    assert_eq!(second.state, pb::RunState::Succeeded as i32, "{second:#?}");
    eventually(
        Duration::from_secs(30),
        "the rollback driven by Prometheus",
        || {
            let farm = &farm;
            async move {
                let releases = history(farm, "production").await?;
                Ok(releases
                    .iter()
                    .any(|r| {
                        r.run_id == second.id && release_state(r) == pb::ReleaseState::RolledBack
                    })
                    .then_some(()))
            }
        },
    )
    .await?;
    assert_eq!(
        std::fs::read_to_string(serve.path().join("production"))?.trim(),
        "good-1"
    );
    eventually(Duration::from_secs(15), "the alert in Alertmanager", || {
        let alertmanager = &alertmanager;
        async move {
            let alerts = alertmanager.alerts()?;
            Ok(alerts
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| {
                    a["labels"]["alertname"] == "KilnRollback"
                        && a["labels"]["environment"] == "production"
                })
                .then_some(()))
        }
    })
    .await?;
    Ok(())
}

/// The pipeline the releases belong to (one here).
fn history_pipeline(releases: &[pb::Release]) -> String {
    releases
        .first()
        .map(|release| release.pipeline.clone())
        .unwrap_or_default()
}
