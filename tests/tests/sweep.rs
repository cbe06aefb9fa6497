//! A hyperparameter sweep end to end: a real coordinator, two real process
//! agents, a `matrix:` of four cells that each train (write a model file and
//! a metrics file from their own values), a best-of gate that picks the cell
//! with the highest recall, and an environment stage that deploys exactly the
//! winner's model.

use std::time::Duration;

use anyhow::{Context, Result};
use kiln_proto::v1 as pb;
use kiln_tests::{CoordinatorOptions, Farm, Repo, logs, register_and_run, stage, wait_run};

const SWEEP: &str = r#"
pipeline: sweep
stages:
  train:
    matrix: { weight: [1, 2, 3, 4] }
    metrics: out/metrics.json
    artifacts: [model]
    commands:
      - mkdir -p out model
      - echo "model trained with class weight $weight" > model/weights.txt
      # Recall peaks at weight 3: 0.61, 0.68, 0.74, 0.70.
      - 'case $weight in 1) r=0.61;; 2) r=0.68;; 3) r=0.74;; 4) r=0.70;; esac; printf "{\"recall\": %s}" $r > out/metrics.json'
  best:
    needs: [train]
    gate: { select: { metric: recall, max: true }, require: { recall: ">= 0.6" } }
  deploy:
    needs: [best]
    environment: production
    commands: ["cat model/weights.txt"]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_promotes_the_cell_with_the_best_recall() -> Result<()> {
    let farm = Farm::start(
        &CoordinatorOptions::default(),
        &[("one", "", 2), ("two", "", 2)],
    )?;
    let repo = Repo::new(SWEEP)?;
    let id = register_and_run(&farm.coordinator, &repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, Duration::from_secs(120)).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:?}");

    let agents: std::collections::BTreeSet<&str> = run
        .stages
        .iter()
        .filter(|s| s.name.starts_with("train["))
        .map(|s| s.agent.as_str())
        .collect();
    assert_eq!(
        agents.len(),
        2,
        "the cells spread over both agents: {agents:?}"
    );

    let gate = stage(&run, "best").gate.as_ref().context("no decision")?;
    assert_eq!(gate.selected, "train[weight=3]");
    let values: Vec<(String, Option<f64>)> = gate
        .candidates
        .iter()
        .map(|c| (c.stage.clone(), c.value))
        .collect();
    assert_eq!(
        values,
        [
            ("train[weight=1]".to_string(), Some(0.61)),
            ("train[weight=2]".to_string(), Some(0.68)),
            ("train[weight=3]".to_string(), Some(0.74)),
            ("train[weight=4]".to_string(), Some(0.70)),
        ],
        "the decision lists every cell's value"
    );
    println!("best-of gate: {}", gate.summary);

    let deployed: Vec<String> = logs(&mut client, id, "deploy")
        .await?
        .into_iter()
        .filter_map(|entry| entry.line.map(|line| line.text))
        .collect();
    assert!(
        deployed.contains(&"model trained with class weight 3".to_string()),
        "the environment stage got the winner's model: {deployed:?}"
    );
    let history = client
        .environment_history(pb::EnvironmentHistoryRequest {
            environment: "production".into(),
            pipeline: "sweep".into(),
        })
        .await?
        .into_inner();
    let release = history.releases.last().context("no release")?;
    assert_eq!(release.metrics["recall"], 0.74);
    let released: Vec<(&str, &str)> = release
        .artifacts
        .iter()
        .map(|a| (a.stage.as_str(), a.path.as_str()))
        .collect();
    assert!(
        released.contains(&("train[weight=3]", "model")),
        "{released:?}"
    );
    assert!(
        released
            .iter()
            .all(|(stage, _)| *stage == "train[weight=3]"),
        "only the winner's artifacts are released: {released:?}"
    );
    Ok(())
}
