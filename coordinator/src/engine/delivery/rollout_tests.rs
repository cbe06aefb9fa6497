//! The rollout controller on its own: runs are plain records, the clock a
//! number, decisions come back as store ops and queued runs.

use std::collections::BTreeMap;

use kiln_common::ids::{EnvKey, RunId, StageKey};
use kiln_common::spec;

use super::monitor::Observation;
use super::rollout::RolloutCommand;
use super::*;
use crate::engine::runs::RunView;
use crate::store::{RolloutOutcome, RolloutPhase, RunRecord, RunState, StageRecord};

const CANARY: &str = "
pipeline: credit
stages:
  deploy:
    environment: production
    commands: [x]
    strategy:
      canary:
        steps: [10, 50, 100]
        pause: 1m
        analysis:
          scrape: http://127.0.0.1:9/metrics
          every: 1s
          rollback_when: { error_ratio: \"> 0.1\" }
          failure_limit: 2
";

const MINUTE: u64 = 60_000;

/// A run of the `deploy` stage as the run book would lend it; `plan` makes
/// it one of a rollout's runs.
struct Run {
    record: RunRecord,
    stages: Vec<StageRecord>,
    spec: spec::Pipeline,
}

impl Run {
    fn new(id: u64, plan: Option<RollbackPlan>) -> Self {
        let spec = spec::parse("kiln.yml", CANARY).unwrap();
        let record = RunRecord {
            rollback: plan,
            ..RunRecord::for_test(id, "credit", RunState::Running)
        };
        let stages = vec![StageRecord::new(
            StageKey {
                run: RunId(id),
                idx: 0,
            },
            "deploy",
            Vec::new(),
        )];
        Self {
            record,
            stages,
            spec,
        }
    }

    fn view(&self) -> RunView<'_> {
        RunView {
            record: &self.record,
            stages: &self.stages,
            spec: &self.spec,
        }
    }
}

fn env() -> EnvKey {
    EnvKey::of_pipeline("credit", "production")
}

/// Release 1 live (nothing to roll out over: it goes live at once), then
/// run 2's deploy starts a rollout of release 2 at 10% at time 0.
fn rolling_out() -> DeliveryController {
    let mut delivery = DeliveryController::load(Vec::new(), Vec::new(), Default::default());
    delivery.deployed(&Run::new(1, None).view(), 0, 0);
    assert_eq!(delivery.live(&env()), Some(1), "a first release goes live");
    delivery.take_work();
    delivery.deployed(&Run::new(2, None).view(), 0, 0);
    delivery
}

fn rollout(delivery: &mut DeliveryController) -> crate::store::RolloutRecord {
    delivery
        .rollout_command(&env(), &RolloutCommand::Status, 0)
        .unwrap()
        .0
}

fn sample(delivery: &mut DeliveryController, error_ratio: f64, now: u64) -> Vec<Op> {
    let analysis = CANARY_ANALYSIS.with(Clone::clone);
    let observation = Observation {
        release: 2,
        environment: env(),
        values: Ok(BTreeMap::from([("error_ratio".into(), Some(error_ratio))])),
    };
    delivery.analyse(&observation, &analysis, now).1
}

thread_local! {
    static CANARY_ANALYSIS: spec::Monitor = spec::parse("kiln.yml", CANARY).unwrap().stages[0]
        .strategy
        .clone()
        .unwrap()
        .analysis
        .unwrap();
}

/// The one queued rollout run, deployed (or failed) as the run book would.
fn run_queued(
    delivery: &mut DeliveryController,
    id: u64,
    succeeded: bool,
    now: u64,
) -> RollbackPlan {
    let mut starts = delivery.take_rollout_runs();
    assert_eq!(starts.len(), 1, "one run at a time");
    let plan = starts.remove(0).plan;
    if succeeded {
        delivery.deployed(&Run::new(id, Some(plan.clone())).view(), 0, now);
    } else {
        delivery.rollback_ended(&plan, false, None, now);
    }
    plan
}

#[test]
fn a_canary_goes_through_its_steps_and_goes_live() {
    let mut delivery = rolling_out();
    assert_eq!(
        delivery.live(&env()),
        Some(1),
        "the candidate is not live yet"
    );
    assert_eq!(delivery.release(2).unwrap().state, ReleaseState::RollingOut);
    let first = rollout(&mut delivery);
    assert_eq!(
        (first.candidate, first.previous, first.weight()),
        (2, 1, 10)
    );
    assert_eq!(first.phase, RolloutPhase::Analysing { until_ms: MINUTE });
    let (watches, _) = delivery.take_work();
    assert_eq!(
        watches
            .iter()
            .map(|w| (w.release, w.until_ms))
            .collect::<Vec<_>>(),
        [(2, MINUTE)],
        "the candidate is analysed for the pause"
    );

    sample(&mut delivery, 0.02, 1_000);
    sample(&mut delivery, 0.2, 2_000);
    sample(&mut delivery, 0.02, 3_000);
    assert!(
        delivery.rollout_tick(MINUTE - 1).is_empty(),
        "still pausing"
    );
    assert!(!delivery.rollout_tick(MINUTE).is_empty());
    let plan = run_queued(&mut delivery, 3, true, MINUTE + 10);
    assert_eq!((plan.from, plan.to), (1, 2));
    assert_eq!(
        plan.rollout.as_ref().map(|s| (s.step, s.weight, s.restore)),
        Some((1, 50, false))
    );
    assert_eq!(
        (plan.kind(), plan.describe().as_str()),
        (
            "rollout_step",
            "rollout step 2/3 of release 2 to production at 50%"
        ),
        "the step's run says what it is"
    );
    assert_eq!(rollout(&mut delivery).weight(), 50);
    assert_eq!(
        delivery.rollouts_by_run(),
        [(
            RunId(2),
            "deploy".to_owned(),
            "rolling out release 2 to `credit/production`: step 2 of 3 (50%) deployed, \
             analysing; the stages after it wait for the rollout (`kiln rollout status \
             credit/production`)"
                .to_owned()
        )],
        "run 2's deploy stage waits for it"
    );
    assert!(delivery.take_rollouts_ended().is_empty());

    delivery.rollout_tick(2 * MINUTE + 10);
    let plan = run_queued(&mut delivery, 4, true, 2 * MINUTE + 20);
    assert_eq!(plan.rollout.map(|s| s.weight), Some(100));
    assert_eq!(delivery.live(&env()), Some(2));
    let history = delivery.history(&env());
    assert_eq!(history[0].state, ReleaseState::Superseded);
    let ended = history[1]
        .rollout
        .clone()
        .expect("the rollout is kept on the release");
    assert_eq!(ended.outcome, Some(RolloutOutcome::Promoted));
    assert_eq!(ended.rounds.len(), 3, "every round is recorded");
    assert!(ended.rounds[1].breached, "one breach is not two in a row");
    assert!(
        delivery.rollout_in_progress(&env()).is_none(),
        "the environment takes deployments again"
    );
    let ended = delivery.take_rollouts_ended();
    assert_eq!(ended.len(), 1);
    assert_eq!(
        (ended[0].run, ended[0].stage.as_str()),
        (RunId(2), "deploy")
    );
    assert!(ended[0].promoted);
    assert_eq!(
        ended[0].message,
        "rolled out to `credit/production`: passed 2 step(s) of analysis; release 2 takes all traffic"
    );
}

#[test]
fn breaches_in_a_row_abort_and_restore_the_previous_release_at_100() {
    let mut delivery = rolling_out();
    assert!(
        sample(&mut delivery, 0.3, 1_000).len() == 1,
        "one breach: recorded"
    );
    assert!(delivery.take_rollout_runs().is_empty());
    sample(&mut delivery, 0.4, 2_000);
    let plan = run_queued(&mut delivery, 3, true, 3_000);
    assert_eq!(
        (plan.from, plan.to),
        (2, 1),
        "the previous release is deployed again"
    );
    assert_eq!(
        plan.rollout.map(|s| (s.weight, s.restore)),
        Some((100, true))
    );
    assert_eq!(delivery.live(&env()), Some(1));
    let aborted = delivery.release(2).unwrap();
    assert_eq!(aborted.state, ReleaseState::Aborted);
    let reason = aborted.reason.clone().unwrap();
    assert!(reason.contains("error_ratio=0.4"), "{reason}");
    assert!(reason.contains("step 1 (10%)"), "{reason}");
    assert_eq!(
        aborted.rollout.as_ref().and_then(|r| r.outcome),
        Some(RolloutOutcome::Aborted)
    );
    let (_, alerts) = delivery.take_work();
    assert!(alerts.iter().any(|a| a.name == "KilnRolloutAborted"));
    let ended = delivery.take_rollouts_ended();
    assert_eq!(ended.len(), 1);
    assert!(!ended[0].promoted, "run 2's deploy stage fails");
    assert!(
        ended[0]
            .message
            .starts_with("rollout to `credit/production` aborted at step 1 of 3 (10%): ")
            && ended[0].message.contains("error_ratio=0.4")
            && ended[0].message.ends_with("; release 1 is back at 100%"),
        "{}",
        ended[0].message
    );
    assert!(
        delivery
            .plan_rollback(&env(), None, "x".into(), None)
            .is_err(),
        "an aborted release is never a rollback target: release 1 is live and first"
    );
}

#[test]
fn promote_skips_the_pauses_and_abort_waits_for_a_deploying_step() {
    let mut delivery = rolling_out();
    let (promoted, ops) = delivery
        .rollout_command(&env(), &RolloutCommand::Promote, 5_000)
        .unwrap();
    assert!(!ops.is_empty());
    assert!(promoted.promote_requested);
    let plan = run_queued(&mut delivery, 3, true, 6_000);
    assert_eq!(
        plan.rollout.map(|s| s.weight),
        Some(100),
        "straight to the last step"
    );
    assert_eq!(delivery.live(&env()), Some(2));

    // Another rollout, aborted by hand while its second step deploys.
    delivery.deployed(&Run::new(5, None).view(), 0, 10 * MINUTE);
    assert_eq!(rollout(&mut delivery).candidate, 3);
    delivery.rollout_tick(11 * MINUTE);
    let mut starts = delivery.take_rollout_runs();
    let step = starts.remove(0).plan;
    let (aborting, _) = delivery
        .rollout_command(
            &env(),
            &RolloutCommand::Abort { user: "ana".into() },
            11 * MINUTE + 1,
        )
        .unwrap();
    assert_eq!(aborting.reason.as_deref(), Some("aborted by ana"));
    assert!(
        delivery.take_rollout_runs().is_empty(),
        "no restore races the step that is deploying"
    );
    delivery.deployed(&Run::new(6, Some(step)).view(), 0, 11 * MINUTE + 2);
    let plan = run_queued(&mut delivery, 7, true, 11 * MINUTE + 3);
    assert_eq!((plan.to, plan.rollout.map(|s| s.restore)), (2, Some(true)));
    assert_eq!(delivery.release(3).unwrap().state, ReleaseState::Aborted);
    assert_eq!(delivery.live(&env()), Some(2));
    assert!(
        delivery
            .rollout_command(&env(), &RolloutCommand::Abort { user: "ana".into() }, 0)
            .is_err(),
        "nothing in progress"
    );
}

#[test]
fn a_failed_step_aborts_and_a_failed_restore_freezes() {
    let mut delivery = rolling_out();
    delivery.rollout_tick(MINUTE);
    run_queued(&mut delivery, 3, false, MINUTE + 1);
    let restore = run_queued(&mut delivery, 4, false, MINUTE + 2);
    assert!(restore.rollout.is_some_and(|s| s.restore));
    let frozen = delivery.frozen(&env()).expect("frozen");
    assert!(
        frozen.contains("the deploy of step 2 (50%) failed"),
        "{frozen}"
    );
    assert!(frozen.contains("restoring release 1"), "{frozen}");
    assert_eq!(
        delivery
            .release(2)
            .and_then(|r| r.rollout.as_ref()?.outcome),
        Some(RolloutOutcome::RestoreFailed)
    );
    let (_, alerts) = delivery.take_work();
    assert!(alerts.iter().any(|a| a.name == "KilnRolloutRestoreFailed"));
}

#[test]
fn a_restarted_controller_resumes_the_rollout_from_its_records() {
    // What the store holds: the last write of every record.
    let mut environments = BTreeMap::new();
    let mut releases = BTreeMap::new();
    let mut keep = |ops: Vec<Op>| {
        for op in ops {
            match op {
                Op::Environment(env) => {
                    environments.insert(env.key.clone(), env);
                }
                Op::Release(release) => {
                    releases.insert(release.id, release);
                }
                _ => {}
            }
        }
    };
    let mut fresh = DeliveryController::load(Vec::new(), Vec::new(), Default::default());
    keep(fresh.deployed(&Run::new(1, None).view(), 0, 0));
    keep(fresh.deployed(&Run::new(2, None).view(), 0, 0));
    keep(sample(&mut fresh, 0.3, 1_000));

    let mut restarted = DeliveryController::load(
        environments.into_values().collect(),
        releases.into_values().collect(),
        Default::default(),
    );
    let resumed = restarted.analyses_to_resume();
    assert_eq!(resumed.len(), 1);
    assert_eq!(
        (resumed[0].1.id, resumed[0].2),
        (2, MINUTE),
        "the same pause"
    );
    // The breach before the restart still counts: one more aborts.
    sample(&mut restarted, 0.5, 2_000);
    let plan = run_queued(&mut restarted, 3, true, 3_000);
    assert_eq!(plan.to, 1);
    assert_eq!(restarted.release(2).unwrap().state, ReleaseState::Aborted);
}

#[test]
fn a_run_stopped_mid_rollout_aborts_it() {
    let mut delivery = rolling_out();
    assert!(
        delivery
            .abort_rollout_of_run(RunId(9), "was stopped (cancelled by user)", 1_000)
            .is_empty(),
        "run 9 made no candidate"
    );
    let ops = delivery.abort_rollout_of_run(RunId(2), "was stopped (cancelled by user)", 1_000);
    assert!(!ops.is_empty());
    let plan = run_queued(&mut delivery, 3, true, 2_000);
    assert_eq!(
        plan.describe(),
        "restore release 1 in production at 100% after the aborted rollout of release 2"
    );
    let aborted = delivery.release(2).unwrap();
    assert_eq!(aborted.state, ReleaseState::Aborted);
    assert_eq!(
        aborted.reason.as_deref(),
        Some("run 2 that made release 2 was stopped (cancelled by user)")
    );
    assert_eq!(delivery.live(&env()), Some(1));
}
