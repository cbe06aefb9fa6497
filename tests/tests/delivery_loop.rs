//! Closing the loop end to end: what happens after a rollback.
//!
//! - The real example model server (`examples/customer-behavior/serve.py`,
//!   in the `kiln/python-ml` image) exports input drift; a monitor rule on
//!   it rolls a release back, the restored release is watched again, and
//!   when it breaches too the environment freezes with an alert that
//!   blames the data, with no second rollback.
//! - `on_breach: [rollback, retrain]` starts the pipeline again on the
//!   newest commit after the rollback, and the new candidate has to pass
//!   the gate against the restored champion.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_proto::v1 as pb;
use kiln_tests::delivery::{
    Containers, ML_IMAGE, all_runs, copy_example, environment, farm, free_port, history,
    ml_image_ready, model_server, release_state, ship, ship_run, spec, webhook,
};
use kiln_tests::docker::start_docker_agent;
use kiln_tests::{Repo, eventually, get_run, stage};

/// The example's own stages, trained in Docker on the real Caravan data;
/// production is deployed by the process agent with the example's
/// deploy.sh and watched on input drift alone.
fn drift_spec(serve: &Path, port: u16) -> String {
    let serve = serve.display();
    format!(
        r#"
pipeline: drift
defaults:
  image: {ML_IMAGE}
stages:
  prepare:
    executor: docker
    commands: [python -m src.prepare --raw data/raw/caravan.csv --out build/data]
    artifacts: [build/data]
  train:
    needs: [prepare]
    executor: docker
    commands: [python -m src.train --data build/data --out build/model]
    artifacts: [build/model]
  deploy-production:
    needs: [train]
    environment: production
    executor: process
    env: {{ KILN_SERVE_ROOT: "{serve}" }}
    commands: [./deploy.sh production]
    monitor:
      scrape: http://127.0.0.1:{port}/metrics
      every: 1s
      rollback_when: {{ model_input_psi: "> 0.25" }}
      failure_limit: 3
      for: 5m
      on_missing: fail
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn input_drift_rolls_back_and_a_restored_release_that_drifts_too_freezes() -> Result<()> {
    const TEST: &str = "input_drift_rolls_back_and_a_restored_release_that_drifts_too_freezes";
    if !ml_image_ready(TEST).await? {
        return Ok(());
    }
    let serve = tempfile::tempdir()?;
    let port = free_port()?;
    let (hook, alerts) = webhook().await?;
    let farm = farm(&hook)?;
    let work = tempfile::tempdir()?;
    let _trainer = start_docker_agent(
        &farm.coordinator.url(),
        &format!("trainer-{}", std::process::id()),
        work.path(),
        &[],
    )?;
    let repo = Repo::new(&drift_spec(serve.path(), port))?;
    copy_example(&repo, |yaml| yaml.to_owned())?;
    repo.commit("kiln.yml", &drift_spec(serve.path(), port))?;

    // The real model server, watching production's serving directory.
    let mut scenery = Containers(Vec::new());
    let tag = std::process::id();
    let server = format!("kiln-test-serve-{tag}");
    let env_dir = serve.path().join("production");
    scenery.run(
        &server,
        &[repo.path(), serve.path()],
        repo.path(),
        &[
            "python",
            "serve.py",
            "--env-dir",
            env_dir.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ],
    )?;

    // Two releases of the same recipe, trained on the real data.
    let first = ship_run(&farm, &repo, "drift").await?;
    assert_eq!(first.state, pb::RunState::Succeeded as i32, "{first:#?}");
    repo.commit("NOTES", "a second release\n")?;
    let second = ship_run(&farm, &repo, "drift").await?;
    assert_eq!(second.state, pb::RunState::Succeeded as i32, "{second:#?}");
    let releases = history(&farm, "drift/production").await?;
    let (old, new) = (
        releases.iter().find(|r| r.run_id == first.id).unwrap().id,
        releases.iter().find(|r| r.run_id == second.id).unwrap().id,
    );

    // Upstream breaks: half the customers arrive with every attribute
    // moved one column over. No model is to blame, whichever serves.
    scenery.run(
        &format!("kiln-test-traffic-{tag}"),
        &[repo.path()],
        repo.path(),
        &[
            "python",
            "traffic.py",
            "--url",
            &format!("http://127.0.0.1:{port}"),
            "--data",
            "data/raw/caravan.csv",
            "--rate",
            "100",
            "--duration",
            "0",
            "--drift-share",
            "0.5",
        ],
    )?;

    // The monitor sees the drift on release `new` and rolls back to `old`,
    // which is watched again, breaches too, and freezes production.
    let frozen = eventually(Duration::from_secs(120), "production to freeze", || {
        let farm = &farm;
        async move {
            let env = environment(farm, "drift", "production").await?;
            Ok((!env.frozen.is_empty()).then_some(env))
        }
    })
    .await
    .with_context(|| scenery.logs(&server))?;
    assert!(
        frozen.frozen.contains(&format!(
            "release {old} was restored by a rollback and breaches too"
        )) && frozen.frozen.contains("likely the data"),
        "{}",
        frozen.frozen
    );
    assert!(
        frozen.frozen.contains("model_input_psi="),
        "{}",
        frozen.frozen
    );
    assert_eq!(frozen.live_release, old, "nothing rolled back further");
    let releases = history(&farm, "drift/production").await?;
    let bad = releases.iter().find(|r| r.id == new).unwrap();
    assert_eq!(release_state(bad), pb::ReleaseState::RolledBack);
    assert!(bad.reason.contains("model_input_psi="), "{}", bad.reason);
    let restored = releases.iter().find(|r| r.id == old).unwrap();
    assert!(restored.restored_by_rollback);
    assert!(
        restored.monitor_until_ms > 0,
        "the restored release is watched"
    );
    let rollbacks = all_runs(&farm)
        .await?
        .into_iter()
        .filter(|run| run.rollback.is_some())
        .count();
    assert_eq!(rollbacks, 1, "one rollback, never a second");
    eventually(
        Duration::from_secs(10),
        "the data alert at the webhook",
        || {
            let alerts = alerts.clone();
            async move {
                let bodies = alerts.lock().unwrap().clone();
                Ok(bodies
                    .iter()
                    .any(|b| b.contains("KilnDataSuspected") && b.contains("likely the data"))
                    .then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}

/// `on_breach: [rollback, retrain]`: the rollback is followed by a run on
/// the newest commit, whose candidate the gate compares with the restored
/// champion; here it is worse, so the champion stays.
#[tokio::test(flavor = "multi_thread")]
async fn a_retrain_after_a_rollback_has_to_beat_the_restored_champion() -> Result<()> {
    let serve = tempfile::tempdir()?;
    let server = model_server(serve.path().to_path_buf()).await?;
    let (hook, _alerts) = webhook().await?;
    let farm = farm(&hook)?;
    // Sampled every second, so the newest commit lands before the third
    // breach.
    let yaml = spec(serve.path(), server.port)
        .replace("every: 200ms", "every: 1s")
        .replace("for: 60s", "for: 60s\n      on_breach: [rollback, retrain]");
    let repo = Repo::new(&yaml)?;
    let good = ship(&farm, &repo, "good-1\n", r#"{"recall": 0.8}"#).await?;
    assert_eq!(good.state, pb::RunState::Succeeded as i32, "{good:#?}");
    let bad = ship(&farm, &repo, "bad\n", r#"{"recall": 0.78}"#).await?;
    assert_eq!(bad.state, pb::RunState::Succeeded as i32, "{bad:#?}");
    // New data arrives meanwhile: a weaker model.
    repo.commit("model.txt", "weak\n")?;
    let newest = repo.commit("metrics.json", r#"{"recall": 0.6}"#)?;

    let retrain = eventually(
        Duration::from_secs(60),
        "the retraining run to finish",
        || {
            let farm = &farm;
            async move {
                let runs = all_runs(farm).await?;
                Ok(runs.into_iter().find(|run| {
                    run.triggered_by.starts_with("retrain after rollback")
                        && run.state != pb::RunState::Running as i32
                        && run.state != pb::RunState::Queued as i32
                }))
            }
        },
    )
    .await?;
    assert!(
        retrain
            .triggered_by
            .contains("retrain after rollback of release"),
        "{}",
        retrain.triggered_by
    );
    assert_eq!(retrain.commit, newest, "the newest commit is retrained");
    let mut client = farm.coordinator.client().await?;
    let retrain = get_run(&mut client, retrain.id).await?;
    assert_eq!(retrain.state, pb::RunState::Failed as i32, "{retrain:#?}");
    let gate = stage(&retrain, "acceptance").gate.clone().unwrap();
    let check = gate
        .checks
        .iter()
        .find(|c| c.rule.contains("vs production"))
        .unwrap();
    assert_eq!(
        (check.value, check.champion, check.passed),
        (Some(0.6), Some(0.8), false),
        "compared with the restored champion"
    );
    let releases = history(&farm, "production").await?;
    let live: Vec<&pb::Release> = releases
        .iter()
        .filter(|r| release_state(r) == pb::ReleaseState::Live)
        .collect();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].run_id, good.id, "the champion stays");
    assert!(live[0].restored_by_rollback && live[0].monitor_until_ms > 0);
    let retrains = all_runs(&farm)
        .await?
        .into_iter()
        .filter(|run| run.triggered_by.starts_with("retrain"))
        .count();
    assert_eq!(retrains, 1);
    Ok(())
}
