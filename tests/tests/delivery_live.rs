//! Live staging acceptance end to end, on the example itself: its kiln.yml
//! (ports and serving directory moved aside), trained in Docker on the real
//! Caravan data, deployed by a process agent to real `serve.py` servers.
//!
//! The staging stage's `endpoint:` reaches the `live-acceptance` stage as
//! `KILN_ENDPOINT`; it sends the held-out customers to the deployed model
//! and writes metrics from its answers, and the gate decides on offline and
//! live values together. A model whose offline metrics pass but whose
//! served answers are wrong (the demo's inverted model) stops in staging.

use anyhow::Result;
use kiln_proto::v1 as pb;
use kiln_tests::delivery::{
    Containers, copy_example, environment, farm, free_port, history, ml_image_ready, release_state,
    ship_run, state, webhook,
};
use kiln_tests::docker::start_docker_agent;
use kiln_tests::{Repo, logs, stage};

/// The `unit-tests` stage's cache lines (what the agent did with its
/// virtualenv cache) and its wall time in seconds.
async fn unit_tests_cache(farm: &kiln_tests::Farm, run: &pb::Run) -> Result<(String, f64)> {
    let mut client = farm.coordinator.client().await?;
    let lines = logs(&mut client, run.id, "unit-tests").await?;
    let cache: Vec<String> = lines
        .iter()
        .filter_map(|entry| entry.line.as_ref())
        .map(|line| line.text.clone())
        .filter(|text| text.contains("cache `venv-py311-"))
        .collect();
    assert!(
        !cache.is_empty(),
        "run {}: unit-tests logged no cache line",
        run.id
    );
    let unit = stage(run, "unit-tests");
    Ok((
        cache.join("; "),
        unit.finished_ms.saturating_sub(unit.started_ms) as f64 / 1000.0,
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn live_acceptance_stops_a_model_that_passes_offline_but_answers_wrongly() -> Result<()> {
    const TEST: &str = "live_acceptance_stops_a_model_that_passes_offline_but_answers_wrongly";
    if !ml_image_ready(TEST).await? {
        return Ok(());
    }
    let serve = tempfile::tempdir()?;
    let (staging_port, production_port) = (free_port()?, free_port()?);
    let (hook, _alerts) = webhook().await?;
    let farm = farm(&hook)?;
    let work = tempfile::tempdir()?;
    let _trainer = start_docker_agent(
        &farm.coordinator.url(),
        &format!("trainer-{}", std::process::id()),
        work.path(),
        &[],
    )?;
    let repo = Repo::new("pipeline: placeholder\nstages: { a: { commands: [x] } }\n")?;
    let serve_root = serve.path().display().to_string();
    copy_example(&repo, |yaml| {
        yaml.replace("/tmp/kiln-serve", &serve_root)
            .replace("127.0.0.1:9102", &format!("127.0.0.1:{staging_port}"))
            .replace("127.0.0.1:9101", &format!("127.0.0.1:{production_port}"))
    })?;
    let mut scenery = Containers(Vec::new());
    let tag = std::process::id();
    for (env, port) in [("staging", staging_port), ("production", production_port)] {
        let env_dir = serve.path().join(env);
        scenery.run(
            &format!("kiln-test-{env}-{tag}"),
            &[repo.path(), serve.path()],
            repo.path(),
            &[
                "python",
                "serve.py",
                "--env-dir",
                env_dir.to_str().unwrap(),
                "--port",
                &port.to_string(),
                "--poll",
                "0.2",
            ],
        )?;
    }

    // A healthy model: the staging server's answers on the held-out
    // customers are the offline evaluation's, value for value.
    let good = ship_run(&farm, &repo, "customer-behavior").await?;
    assert_eq!(
        good.state,
        pb::RunState::Succeeded as i32,
        "{good:#?}\n{}",
        scenery.logs(&format!("kiln-test-staging-{tag}"))
    );
    let gate = stage(&good, "acceptance").gate.clone().unwrap();
    let value = |gate: &pb::GateDecision, metric: &str| {
        gate.checks
            .iter()
            .find(|c| c.metric == metric && !c.rule.contains(" vs "))
            .and_then(|c| c.value)
    };
    for metric in ["recall", "precision", "accuracy"] {
        let (offline, live) = (
            value(&gate, metric),
            value(&gate, &format!("live_{metric}")),
        );
        assert!(offline.is_some(), "{metric}: {gate:#?}");
        assert_eq!(offline, live, "{metric} offline and live");
    }
    let staging = history(&farm, "customer-behavior/staging").await?;
    assert_eq!(
        staging[0].endpoint,
        format!("http://127.0.0.1:{staging_port}"),
        "the release records where it is served"
    );
    let production = history(&farm, "customer-behavior/production").await?;
    assert_eq!(production.len(), 1);
    // The unit tests' virtualenv (requirements-test.txt from PyPI) was
    // built on this first run and kept as the stage's cache.
    let (first_cache, first_secs) = unit_tests_cache(&farm, &good).await?;
    assert!(first_cache.contains("miss"), "{first_cache}");

    // The demo's fault: the same estimator, inverted when served.
    let kiln_yml = std::fs::read_to_string(repo.path().join("kiln.yml"))?;
    repo.commit(
        "kiln.yml",
        &kiln_yml.replace("KILN_DEMO_FAULT: none", "KILN_DEMO_FAULT: invert"),
    )?;
    let inverted = ship_run(&farm, &repo, "customer-behavior").await?;
    assert_eq!(inverted.state, pb::RunState::Failed as i32, "{inverted:#?}");
    let acceptance = stage(&inverted, "acceptance");
    assert_eq!(state(acceptance), pb::StageState::Failed);
    let gate = acceptance.gate.clone().unwrap();
    let check = |metric: &str| {
        gate.checks
            .iter()
            .find(|c| c.metric == metric && !c.rule.contains(" vs "))
            .unwrap_or_else(|| panic!("no check of {metric}: {gate:#?}"))
            .clone()
    };
    for metric in ["recall", "precision", "accuracy", "roc_auc"] {
        assert!(check(metric).passed, "offline {metric} passes: {gate:#?}");
    }
    // Same requirements file: the second run restores the virtualenv
    // instead of asking PyPI again.
    let (second_cache, second_secs) = unit_tests_cache(&farm, &inverted).await?;
    assert!(second_cache.contains("restored"), "{second_cache}");
    println!(
        "unit-tests: {first_secs:.1} s on the first run ({first_cache}), \
         {second_secs:.1} s on the second ({second_cache})"
    );
    let live_accuracy = check("live_accuracy");
    assert!(
        !live_accuracy.passed && live_accuracy.value.unwrap() < 0.5,
        "{gate:#?}"
    );
    assert!(!check("live_precision").passed, "{gate:#?}");
    assert!(gate.summary.contains("live_accuracy"), "{}", gate.summary);
    assert_eq!(
        state(stage(&inverted, "deploy-production")),
        pb::StageState::Skipped
    );
    let production = history(&farm, "customer-behavior/production").await?;
    assert_eq!(production.len(), 1, "production never saw it");
    assert_eq!(release_state(&production[0]), pb::ReleaseState::Live);
    assert_eq!(production[0].run_id, good.id);
    let env = environment(&farm, "customer-behavior", "production").await?;
    assert!(env.frozen.is_empty());
    // `kiln release show` says where the staging release is served.
    let shown = farm
        .coordinator
        .kiln(&["release", "show", &staging[0].id.to_string()]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains(&format!("endpoint   http://127.0.0.1:{staging_port}")),
        "{text}"
    );
    Ok(())
}
