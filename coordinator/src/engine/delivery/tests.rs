//! The delivery controller on its own: runs are plain records lent to it,
//! decisions come back as verdicts and store ops. No engine, no store, no
//! clock.

use std::collections::BTreeMap;

use kiln_common::ids::{EnvKey, RunId, StageKey};
use kiln_common::spec::{self, OnBreach};

use super::monitor::Observation;
use super::*;
use crate::engine::runs::RunView;
use crate::store::{RunRecord, RunState, StageRecord};

const CREDIT: &str = "
pipeline: credit
stages:
  evaluate: { commands: [x], metrics: m.json }
  acceptance:
    needs: [evaluate]
    gate:
      require: { recall: \">= 0.5\" }
      compare_to: production
      max_regression: { recall: 10% }
  deploy:
    needs: [acceptance]
    environment: production
    commands: [x]
    monitor:
      scrape: http://127.0.0.1:9/metrics
      every: 1s
      rollback_when: { error_ratio: \"> 0.5\" }
      failure_limit: 2
      for: 10m
";

/// A run of `yaml`'s pipeline whose `evaluate` measured `recall`, every
/// stage's record as the run book would hold it.
pub(super) struct Run {
    pub(super) record: RunRecord,
    pub(super) stages: Vec<StageRecord>,
    spec: spec::Pipeline,
}

impl Run {
    pub(super) fn new(yaml: &str, id: u64, recall: f64) -> Self {
        let spec = spec::parse("kiln.yml", yaml).unwrap();
        let run = RunId(id);
        let record = RunRecord {
            commit: "c".repeat(40),
            ..RunRecord::for_test(id, &spec.name, RunState::Running)
        };
        let mut stages: Vec<StageRecord> = spec
            .stages
            .iter()
            .enumerate()
            .map(|(idx, stage)| {
                let key = StageKey {
                    run,
                    idx: idx as u32,
                };
                StageRecord::new(key, &stage.name, Vec::new())
            })
            .collect();
        stages[0].metrics = BTreeMap::from([("recall".to_string(), Some(recall))]);
        Self {
            record,
            stages,
            spec,
        }
    }

    pub(super) fn view(&self) -> RunView<'_> {
        RunView {
            record: &self.record,
            stages: &self.stages,
            spec: &self.spec,
        }
    }

    pub(super) fn idx(&self, name: &str) -> usize {
        self.spec.stage_idx(name).unwrap()
    }
}

pub(super) fn controller() -> DeliveryController {
    DeliveryController::load(Vec::new(), Vec::new(), Default::default())
}

fn production(pipeline: &str) -> EnvKey {
    EnvKey::of_pipeline(pipeline, "production")
}

/// Runs the gate and the deployment of `run` as the run book would.
fn ship(delivery: &mut DeliveryController, run: &Run) -> GateVerdict {
    let (_, verdict) = delivery
        .decide_gate(&run.view(), run.idx("acceptance"), 10)
        .unwrap();
    if matches!(verdict, GateVerdict::Passed(_)) {
        let ops = delivery.deployed(&run.view(), run.idx("deploy"), 20);
        assert!(!ops.is_empty(), "a deployment writes its release");
    }
    verdict
}

#[test]
fn a_gate_compares_only_with_its_own_pipelines_champion() {
    let mut delivery = controller();
    assert!(matches!(
        ship(&mut delivery, &Run::new(CREDIT, 1, 0.9)),
        GateVerdict::Passed(_)
    ));
    let other = CREDIT.replace("pipeline: credit", "pipeline: juice");
    let verdict = ship(&mut delivery, &Run::new(&other, 2, 0.6));
    let GateVerdict::Passed(summary) = verdict else {
        panic!("juice's first model has no champion: {verdict:?}");
    };
    assert!(summary.contains("first deployment"), "{summary}");

    let verdict = ship(&mut delivery, &Run::new(CREDIT, 3, 0.6));
    let GateVerdict::Failed(summary) = verdict else {
        panic!("0.6 is more than 10% below credit's 0.9: {verdict:?}");
    };
    assert!(summary.contains("vs champion 0.9000"), "{summary}");
    let (_, alerts) = delivery.take_work();
    let alert = alerts
        .iter()
        .find(|a| a.name == "KilnGateFailed")
        .expect("a failed gate raises an alert");
    assert_eq!(alert.labels["pipeline"], "credit");
    assert_eq!(delivery.live(&production("credit")), Some(1));
}

#[test]
fn a_deployment_supersedes_the_live_release_and_asks_for_a_monitor_and_a_signature() {
    let mut delivery = controller();
    ship(&mut delivery, &Run::new(CREDIT, 1, 0.9));
    ship(&mut delivery, &Run::new(CREDIT, 2, 0.95));
    assert_eq!(delivery.live(&production("credit")), Some(2));
    let history = delivery.history(&production("credit"));
    assert_eq!(history[0].state, ReleaseState::Superseded);
    assert_eq!(history[1].state, ReleaseState::Live);
    assert_eq!(history[1].metrics["recall"], Some(0.95));
    assert_eq!(delivery.take_to_sign(), vec![1, 2]);
    let (monitors, _) = delivery.take_work();
    assert_eq!(
        monitors.iter().map(|m| m.release).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

#[test]
fn a_rollback_restores_the_previous_release_of_the_same_pipeline() {
    let mut delivery = controller();
    let other = CREDIT.replace("pipeline: credit", "pipeline: juice");
    ship(&mut delivery, &Run::new(CREDIT, 1, 0.9));
    ship(&mut delivery, &Run::new(&other, 2, 0.9));
    ship(&mut delivery, &Run::new(CREDIT, 3, 0.95));
    let env = production("credit");

    let start = delivery
        .plan_rollback(&env, None, "by hand".into(), None)
        .unwrap();
    assert_eq!((start.plan.from, start.plan.to), (3, 1));
    assert_eq!(start.target.pipeline, "credit");
    let refused = delivery.plan_rollback(&env, None, "again".into(), Some(RunId(9)));
    assert!(
        refused
            .err()
            .unwrap()
            .to_string()
            .contains("already running as run 9")
    );
    assert!(
        delivery
            .plan_rollback(&env, Some(2), "x".into(), None)
            .is_err(),
        "release 2 is juice's"
    );

    // The rollback run's environment stage succeeded.
    let mut rollback = Run::new(CREDIT, 4, 0.0);
    rollback.record.rollback = Some(start.plan);
    delivery.deployed(&rollback.view(), rollback.idx("deploy"), 30);
    assert_eq!(delivery.live(&env), Some(1));
    let history = delivery.history(&env);
    assert_eq!(history[1].state, ReleaseState::RolledBack);
    assert_eq!(history[1].reason.as_deref(), Some("by hand"));
    assert_eq!(delivery.live(&production("juice")), Some(2), "untouched");
    assert!(
        delivery
            .plan_rollback(&env, None, "x".into(), None)
            .err()
            .unwrap()
            .to_string()
            .contains("no earlier release"),
        "release 3 was rolled back, release 1 is live"
    );
}

#[test]
fn breaches_ask_for_one_rollback_at_the_limit_or_freeze() {
    let mut delivery = controller();
    ship(&mut delivery, &Run::new(CREDIT, 1, 0.9));
    let spec = spec::parse("kiln.yml", CREDIT).unwrap();
    let mut monitor = spec.stages[2].monitor.clone().unwrap();
    let env = production("credit");
    let sample = |value: f64| Observation {
        release: 1,
        environment: env.clone(),
        values: Ok(BTreeMap::from([("error_ratio".to_string(), Some(value))])),
    };
    assert!(matches!(
        delivery.observe(&sample(0.9), &monitor, 0).1,
        Breach::Quiet
    ));
    assert!(matches!(
        delivery.observe(&sample(0.1), &monitor, 0).1,
        Breach::Quiet
    ));
    assert!(matches!(
        delivery.observe(&sample(0.9), &monitor, 0).1,
        Breach::Quiet
    ));
    let (kept, breach) = delivery.observe(&sample(0.9), &monitor, 77);
    let kept = kept.expect("a live release's rounds are kept");
    assert!(kept.breached && kept.at_ms == 77 && kept.values["error_ratio"] == Some(0.9));
    let Breach::RollBack {
        environment,
        release,
        reason,
        retrain,
    } = breach
    else {
        panic!("the second breach in a row reaches the limit");
    };
    assert_eq!((environment, release, retrain), (env.clone(), 1, false));
    assert!(reason.contains("error_ratio=0.9"), "{reason}");
    assert!(
        matches!(delivery.observe(&sample(0.9), &monitor, 0).1, Breach::Quiet),
        "acted once"
    );

    ship(&mut delivery, &Run::new(CREDIT, 2, 0.9));
    monitor.on_breach = OnBreach::Freeze;
    let mut second = sample(0.9);
    second.release = 2;
    delivery.observe(&second, &monitor, 0);
    assert!(matches!(
        delivery.observe(&second, &monitor, 0).1,
        Breach::Frozen(ops) if ops.len() == 1
    ));
    assert!(delivery.frozen(&env).is_some());
    let (_, record) = delivery.unfreeze(&env).unwrap();
    assert_eq!(record.frozen, None);
}

/// The restored release is watched again; when it breaches too the
/// environment freezes with an alert naming the data, never a second
/// rollback; `[rollback, retrain]` queues one retraining run, and a release
/// that came from a retrain does not retrain again.
#[test]
fn a_restored_release_is_watched_and_its_breach_freezes_and_blames_the_data() {
    let yaml = CREDIT.replace("for: 10m", "for: 10m\n      on_breach: [rollback, retrain]");
    let mut delivery = controller();
    let env = production("credit");
    ship(&mut delivery, &Run::new(&yaml, 1, 0.9));
    ship(&mut delivery, &Run::new(&yaml, 2, 0.9));
    let (watches, _) = delivery.take_work();
    assert_eq!(watches.len(), 2, "both releases were watched");
    let spec = spec::parse("kiln.yml", &yaml).unwrap();
    let monitor = spec.stages[2].monitor.clone().unwrap();
    let sample = |release: u64| Observation {
        release,
        environment: env.clone(),
        values: Ok(BTreeMap::from([("error_ratio".to_string(), Some(0.9))])),
    };
    delivery.observe(&sample(2), &monitor, 0);
    let Breach::RollBack { retrain: true, .. } = delivery.observe(&sample(2), &monitor, 0).1 else {
        panic!("the second breach rolls back and asks for a retrain");
    };
    let mut start = delivery
        .plan_rollback(&env, None, "breach".into(), None)
        .unwrap();
    start.plan.retrain = true;
    let mut rollback = Run::new(&yaml, 3, 0.0);
    rollback.record.rollback = Some(start.plan);
    delivery.deployed(&rollback.view(), rollback.idx("deploy"), 1_000);

    // Release 1 is live again, watched for its stage's whole window.
    assert_eq!(delivery.live(&env), Some(1));
    let restored = delivery.release(1).unwrap();
    assert!(restored.restored_by_rollback);
    assert_eq!(restored.monitor_until_ms, Some(1_000 + 600_000));
    let (watches, alerts) = delivery.take_work();
    assert_eq!(
        watches.iter().map(|w| w.release).collect::<Vec<_>>(),
        [1],
        "the restored release has a monitor again"
    );
    assert!(alerts.iter().any(|a| a.name == "KilnRollback"));
    let retrains = delivery.take_retrains();
    assert_eq!(retrains.len(), 1);
    assert_eq!(retrains[0].pipeline, "credit");
    assert!(
        retrains[0].triggered_by.starts_with(RETRAIN),
        "{}",
        retrains[0].triggered_by
    );

    // It breaches too: freeze, blame the data, no rollback.
    assert!(matches!(
        delivery.observe(&sample(1), &monitor, 0).1,
        Breach::Quiet
    ));
    let Breach::Frozen(ops) = delivery.observe(&sample(1), &monitor, 0).1 else {
        panic!("a restored release that breaches freezes its environment");
    };
    assert_eq!(ops.len(), 1);
    let frozen = delivery.frozen(&env).unwrap().to_owned();
    assert!(frozen.contains("likely the data"), "{frozen}");
    assert_eq!(delivery.live(&env), Some(1), "nothing rolled back further");
    let (_, alerts) = delivery.take_work();
    let alert = alerts
        .iter()
        .find(|a| a.name == "KilnDataSuspected")
        .unwrap();
    assert!(alert.summary.contains("nothing is rolled back further"));

    // A release that came from the retrain and breaches rolls back, but
    // does not retrain again.
    delivery.unfreeze(&env).unwrap();
    let mut retrained = Run::new(&yaml, 4, 0.9);
    retrained.record.triggered_by = retrains[0].triggered_by.clone();
    ship(&mut delivery, &retrained);
    let live = delivery.live(&env).unwrap();
    delivery.observe(&sample(live), &monitor, 0);
    let Breach::RollBack { retrain, .. } = delivery.observe(&sample(live), &monitor, 0).1 else {
        panic!("the retrained release rolls back");
    };
    assert!(!retrain, "one retrain per rollback, never a loop");
}

const SWEEP: &str = "
pipeline: sweep
stages:
  train:
    commands: [x]
    metrics: m.json
    artifacts: [model]
    matrix: { weight: [1, 2, 3, 4] }
  best:
    needs: [train]
    gate: { select: { metric: recall, max: true }, require: { recall: \">= 0.5\" } }
  deploy:
    needs: [best]
    environment: production
    commands: [x]
";

#[test]
fn a_best_of_gate_picks_the_winner_and_the_release_gets_its_model() {
    let mut delivery = controller();
    let mut run = Run::new(SWEEP, 1, 0.0);
    for (cell, recall) in [0.61, 0.74, 0.52, 0.70].into_iter().enumerate() {
        let stage = &mut run.stages[cell];
        stage.metrics = BTreeMap::from([("recall".to_string(), Some(recall))]);
        stage.outputs = vec![crate::store::ArtifactRecord {
            path: "model".into(),
            digest: format!("sha256:{}", format!("{cell}").repeat(64)),
            size: 1,
        }];
    }
    let (decision, verdict) = delivery
        .decide_gate(&run.view(), run.idx("best"), 10)
        .unwrap();
    let GateVerdict::Passed(summary) = &verdict else {
        panic!("{verdict:?}");
    };
    let selection = decision.selection.clone().unwrap();
    assert_eq!(selection.winner.as_deref(), Some("train[weight=2]"));
    assert_eq!(
        selection.candidates.len(),
        4,
        "every cell's value is recorded"
    );
    assert!(summary.contains("selected train[weight=2]"), "{summary}");
    assert!(summary.contains("train[weight=3]=0.5200"), "{summary}");
    assert_eq!(
        decision.checks[0].value,
        Some(0.74),
        "the rule sees the winner"
    );

    let best = run.idx("best");
    run.stages[best].gate = Some(decision);
    delivery.deployed(&run.view(), run.idx("deploy"), 20);
    let history = delivery.history(&production("sweep"));
    let release = &history[0];
    assert_eq!(release.metrics["recall"], Some(0.74));
    assert_eq!(
        release
            .artifacts
            .iter()
            .map(|a| a.stage.as_str())
            .collect::<Vec<_>>(),
        ["train[weight=2]"],
        "the environment stage gets the winner's model, and only it"
    );
}

#[test]
fn a_best_of_gate_without_values_fails() {
    let mut delivery = controller();
    let mut run = Run::new(SWEEP, 1, 0.0);
    for stage in &mut run.stages[..4] {
        stage.metrics.clear();
    }
    let (decision, verdict) = delivery
        .decide_gate(&run.view(), run.idx("best"), 10)
        .unwrap();
    assert!(!decision.passed);
    let GateVerdict::Failed(summary) = verdict else {
        panic!("nothing to select");
    };
    assert!(
        summary.contains("no stage it needs has a value of `recall`"),
        "{summary}"
    );
}
