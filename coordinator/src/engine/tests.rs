//! The engine driven directly: events in, durable effects out, time moved by
//! hand. No network, no sleeps.

use std::sync::Arc;
use std::time::Duration;

use kiln_proto::v1 as pb;
use pb::agent_message::Msg;
use pb::coordinator_message::Msg as Out;
use tokio::sync::oneshot;

use super::*;
use crate::clock::ManualClock;
use crate::engine::delivery::monitor;
use crate::store::{SledStore, StageState};

const LEASE_MS: u64 = 3_000;

const DIAMOND: &str = "
pipeline: diamond
defaults: { retries: 1 }
stages:
  a: { commands: [echo a] }
  b: { needs: [a], commands: [echo b] }
  c: { needs: [a], commands: [echo c], retries: 0 }
  d: { needs: [b, c], commands: [echo d] }
";

struct Harness {
    engine: Engine,
    store: Arc<dyn Store>,
    blobs: Arc<BlobStore>,
    clock: ManualClock,
    _dir: tempfile::TempDir,
}

struct FakeAgent {
    name: String,
    conn: ConnId,
    rx: super::pool::AgentRx,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let clock = ManualClock::new(1_000_000);
        let config = EngineConfig {
            lease_ttl: Duration::from_millis(LEASE_MS),
            heartbeat_interval: Duration::from_millis(500),
            max_run_artifact_bytes: 1 << 30,
            max_delivery_keys: super::MAX_DELIVERY_KEYS,
        };
        let blobs = Arc::new(BlobStore::open(dir.path(), 1 << 30).unwrap());
        let engine = Engine::recover(
            store.clone(),
            blobs.clone(),
            Arc::new(clock.clone()),
            config,
            Default::default(),
        )
        .unwrap();
        Self {
            engine,
            store,
            blobs,
            clock,
            _dir: dir,
        }
    }

    /// A coordinator restart: a new engine over the same store.
    fn restart(&mut self) {
        let config = self.engine.config;
        let clock = Arc::new(self.clock.clone());
        self.engine = Engine::recover(
            self.store.clone(),
            self.blobs.clone(),
            clock,
            config,
            Default::default(),
        )
        .unwrap();
    }

    /// Every agent stays silent past its lease; the engine notices.
    fn lapse_lease(&mut self) {
        self.clock.advance(LEASE_MS + 1);
        self.engine.tick();
        self.commit();
    }

    /// What the runner and the commit thread do: output checks on the
    /// side (here, at once), then apply, flush and run the effects.
    fn commit(&mut self) {
        let mut events = Vec::new();
        loop {
            for event in events.drain(..) {
                self.engine.handle(event);
            }
            let (batch, effects) = self.engine.take_commit();
            self.store.apply(&batch).unwrap();
            self.store.flush().unwrap();
            for effect in effects {
                effect();
            }
            // What the runner does off the loop, here at once.
            let secrets = self.engine.secrets.clone();
            events.extend(
                self.engine
                    .take_secrets_to_open()
                    .into_iter()
                    .map(|work| work.run(secrets.as_deref())),
            );
            events.extend(
                self.engine
                    .take_checks()
                    .into_iter()
                    .map(|check| check.run(&self.blobs)),
            );
            if events.is_empty() {
                return;
            }
        }
    }

    fn ask<T>(&mut self, event: impl FnOnce(Reply<T>) -> Event) -> Result<T, ApiError> {
        let (reply, mut answer) = oneshot::channel();
        self.engine.handle(event(reply));
        self.commit();
        answer.try_recv().expect("answered after the commit")
    }

    fn start_run(&mut self, yaml: &str) -> RunId {
        let pipeline = NewPipeline {
            name: spec::parse("kiln.yml", yaml).unwrap().name,
            file_name: "kiln.yml".into(),
            spec_yaml: yaml.into(),
            repo: "/nowhere".into(),
            branch: "main".into(),
            subdir: String::new(),
            path: String::new(),
            repository: String::new(),
            status: None,
            poll_ms: 0,
        };
        let (pipeline, _) = self
            .ask(|reply| Event::Register { pipeline, reply })
            .unwrap();
        let run = self
            .ask(|reply| Event::Trigger {
                request: crate::engine::TriggerRequest {
                    pipeline,
                    at_commit: None,
                    commit: "0".repeat(40),
                    rev: "main".into(),
                    triggered_by: "test".into(),
                    source_digest: None,
                    datasets: Vec::new(),
                    params: Default::default(),
                    variables: Default::default(),
                    deliveries: Vec::new(),
                    trigger_state: None,
                    changed: None,
                },
                reply,
            })
            .unwrap();
        RunId(run.id)
    }

    fn connect(
        &mut self,
        name: &str,
        conn: u64,
        capacity: u32,
        held: Vec<pb::StageRef>,
    ) -> FakeAgent {
        let (tx, rx) = AgentTx::channel();
        let hello = pb::Hello {
            name: name.into(),
            capacity,
            held,
            ..Default::default()
        };
        self.engine.handle(Event::AgentHello {
            hello,
            conn: ConnId(conn),
            tx,
        });
        self.commit();
        FakeAgent {
            name: name.into(),
            conn: ConnId(conn),
            rx,
        }
    }

    fn send(&mut self, agent: &FakeAgent, msg: Msg) {
        self.engine.handle(Event::AgentMessage {
            agent: agent.name.clone(),
            conn: agent.conn,
            msg,
        });
        self.commit();
    }

    fn finish(&mut self, agent: &FakeAgent, stage: pb::StageRef, outcome: pb::Outcome) {
        let finished = pb::StageFinished {
            stage: Some(stage),
            outcome: outcome as i32,
            ..Default::default()
        };
        self.send(agent, Msg::Finished(finished));
    }

    fn run(&mut self, run: RunId) -> pb::Run {
        self.commit();
        crate::views::stored_run(&*self.store, run).unwrap()
    }

    fn stage(&mut self, run: RunId, name: &str) -> pb::Stage {
        self.run(run)
            .stages
            .into_iter()
            .find(|stage| stage.name == name)
            .unwrap()
    }
}

impl FakeAgent {
    fn received(&mut self) -> Vec<Out> {
        std::iter::from_fn(|| self.rx.try_recv())
            .filter_map(|msg| msg.ok()?.msg)
            .collect()
    }

    fn assignments(&mut self) -> Vec<pb::StageRef> {
        self.received()
            .into_iter()
            .filter_map(|msg| match msg {
                Out::Assign(assign) => assign.stage,
                _ => None,
            })
            .collect()
    }
}

fn acks(messages: Vec<Out>) -> Vec<pb::Ack> {
    messages
        .into_iter()
        .filter_map(|msg| match msg {
            Out::Ack(ack) => Some(ack),
            _ => None,
        })
        .collect()
}

/// Assignments that reached any of `agents`, with the receiving agent's index.
fn assignments(agents: &mut [FakeAgent]) -> Vec<(usize, pb::StageRef)> {
    let mut out = Vec::new();
    for (i, agent) in agents.iter_mut().enumerate() {
        out.extend(agent.assignments().into_iter().map(|stage| (i, stage)));
    }
    out
}

#[test]
fn diamond_runs_in_dependency_order_with_the_middle_in_parallel() {
    let mut h = Harness::new();
    let run = h.start_run(DIAMOND);
    let mut agents = [
        h.connect("one", 1, 1, vec![]),
        h.connect("two", 2, 1, vec![]),
    ];
    let first = assignments(&mut agents);
    assert_eq!(
        first.iter().map(|(_, s)| s.stage_idx).collect::<Vec<_>>(),
        [0],
        "only `a` is ready"
    );
    h.finish(&agents[first[0].0], first[0].1, pb::Outcome::Succeeded);

    let middle = assignments(&mut agents);
    let mut idx: Vec<_> = middle.iter().map(|(_, stage)| stage.stage_idx).collect();
    idx.sort();
    assert_eq!(idx, [1, 2], "b and c go out together");
    assert_ne!(middle[0].0, middle[1].0, "one on each agent");
    assert!(assignments(&mut agents).is_empty(), "d waits for both");
    h.finish(&agents[middle[0].0], middle[0].1, pb::Outcome::Succeeded);
    assert!(
        assignments(&mut agents).is_empty(),
        "d still waits for the other"
    );
    h.finish(&agents[middle[1].0], middle[1].1, pb::Outcome::Succeeded);

    let last = assignments(&mut agents);
    assert_eq!(
        last.iter().map(|(_, s)| s.stage_idx).collect::<Vec<_>>(),
        [3]
    );
    h.finish(&agents[last[0].0], last[0].1, pb::Outcome::Succeeded);
    assert_eq!(h.run(run).state, pb::RunState::Succeeded as i32);
}

#[test]
fn a_failed_stage_skips_its_dependents_and_fails_the_run() {
    let mut h = Harness::new();
    let run = h.start_run(DIAMOND);
    let mut agents = [h.connect("one", 1, 2, vec![])];
    let a = assignments(&mut agents)[0].1;
    h.finish(&agents[0], a, pb::Outcome::Succeeded);
    let middle = assignments(&mut agents);
    let c = middle.iter().find(|(_, s)| s.stage_idx == 2).unwrap().1;
    let b = middle.iter().find(|(_, s)| s.stage_idx == 1).unwrap().1;
    h.finish(&agents[0], c, pb::Outcome::Failed);
    assert_eq!(h.stage(run, "d").state, pb::StageState::Skipped as i32);
    assert_eq!(
        h.run(run).state,
        pb::RunState::Running as i32,
        "b still runs"
    );
    h.finish(&agents[0], b, pb::Outcome::Succeeded);
    assert_eq!(h.run(run).state, pb::RunState::Failed as i32);
}

#[test]
fn an_allowed_failure_lets_its_dependents_run_and_the_run_succeed() {
    let mut h = Harness::new();
    let run = h.start_run(
        "pipeline: p\nstages:\n  lint: { commands: [x], allow_failure: true, retries: 0 }\n  build: { needs: [lint], commands: [y] }\n",
    );
    let mut agents = [h.connect("one", 1, 1, vec![])];
    let lint = assignments(&mut agents)[0].1;
    h.finish(&agents[0], lint, pb::Outcome::Failed);
    let lint = h.stage(run, "lint");
    assert_eq!(lint.state, pb::StageState::Failed as i32);
    assert!(
        lint.message.ends_with("(allowed to fail)"),
        "{}",
        lint.message
    );
    let build = assignments(&mut agents);
    assert_eq!(build.len(), 1, "build runs after an allowed failure");
    h.finish(&agents[0], build[0].1, pb::Outcome::Succeeded);
    assert_eq!(h.run(run).state, pb::RunState::Succeeded as i32);
}

#[test]
fn retries_follow_their_causes() {
    let mut h = Harness::new();
    let run = h.start_run(
        "pipeline: p\nstages:\n  flaky: { commands: [x], retries: { max: 1, when: [failed] } }\n  plain: { commands: [y], retries: 2 }\n",
    );
    let mut agents = [h.connect("one", 1, 2, vec![])];
    let first = assignments(&mut agents);
    let flaky = first.iter().find(|(_, s)| s.stage_idx == 0).unwrap().1;
    let plain = first.iter().find(|(_, s)| s.stage_idx == 1).unwrap().1;
    h.finish(&agents[0], flaky, pb::Outcome::Failed);
    h.finish(&agents[0], plain, pb::Outcome::Failed);
    assert_eq!(
        h.stage(run, "plain").state,
        pb::StageState::Failed as i32,
        "a plain count does not retry a failure of the commands"
    );
    let again = assignments(&mut agents);
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].1.stage_idx, again[0].1.attempt), (0, 2));
    h.finish(&agents[0], again[0].1, pb::Outcome::Failed);
    let flaky = h.stage(run, "flaky");
    assert_eq!(flaky.state, pb::StageState::Failed as i32);
    assert!(
        flaky.message.contains("no retries left"),
        "{}",
        flaky.message
    );
    assert_eq!(h.run(run).state, pb::RunState::Failed as i32);
}

#[test]
fn a_run_past_its_timeout_is_stopped_and_fails() {
    let mut h = Harness::new();
    let run = h.start_run(
        "pipeline: p\ntimeout: 1m\nstages:\n  slow: { commands: [sleep] }\n  after: { needs: [slow], commands: [y] }\n",
    );
    let mut agent = h.connect("one", 1, 1, vec![]);
    let slow = agent.assignments()[0];
    h.clock.advance(30_000);
    // The agent keeps its lease meanwhile.
    h.send(&agent, Msg::Heartbeat(pb::Heartbeat { running: 1 }));
    h.engine.tick();
    assert_eq!(h.run(run).state, pb::RunState::Running as i32);
    h.clock.advance(31_000);
    h.send(&agent, Msg::Heartbeat(pb::Heartbeat { running: 1 }));
    h.engine.tick();
    let stopped = h.run(run);
    assert_eq!(stopped.state, pb::RunState::Failed as i32);
    let slow_stage = h.stage(run, "slow");
    assert_eq!(slow_stage.state, pb::StageState::TimedOut as i32);
    assert!(
        slow_stage
            .message
            .contains("the run's timeout of 60s passed"),
        "{}",
        slow_stage.message
    );
    assert_eq!(
        h.stage(run, "after").state,
        pb::StageState::Cancelled as i32
    );
    let cancels: Vec<pb::Cancel> = agent
        .received()
        .into_iter()
        .filter_map(|msg| match msg {
            Out::Cancel(cancel) => Some(cancel),
            _ => None,
        })
        .collect();
    assert_eq!(cancels.len(), 1, "the agent is told to stop");
    assert_eq!(cancels[0].stage, Some(slow));
}

#[test]
fn lost_lease_requeues_and_fences_off_the_old_attempt() {
    let mut h = Harness::new();
    let run = h.start_run("pipeline: p\nstages:\n  only: { commands: [sleep 1] }\n");
    let mut old = h.connect("old", 1, 1, vec![]);
    let first = old.assignments()[0];
    assert_eq!(first.attempt, 1);
    // `old` goes silent; the lease runs out.
    h.lapse_lease();
    let stage = h.stage(run, "only");
    assert_eq!(
        (stage.state, stage.attempt),
        (pb::StageState::Ready as i32, 2)
    );
    let mut new = h.connect("new", 2, 1, vec![]);
    let second = new.assignments()[0];
    assert_eq!(second.attempt, 2);

    // The old agent comes back still holding attempt 1: told to drop it.
    let mut old = h.connect("old", 3, 1, vec![first]);
    let welcome = old.received().into_iter().find_map(|msg| match msg {
        Out::Welcome(welcome) => Some(welcome),
        _ => None,
    });
    assert_eq!(welcome.unwrap().drop, [first]);
    // Its late completion is rejected and changes nothing.
    h.finish(&old, first, pb::Outcome::Succeeded);
    let rejected = acks(old.received());
    assert!(rejected[0].rejected, "{rejected:?}");
    assert!(
        rejected[0].reason.contains("stale attempt 1"),
        "{}",
        rejected[0].reason
    );
    assert_eq!(h.stage(run, "only").state, pb::StageState::Assigned as i32);

    // The rightful completion counts once; a repeat is acknowledged again.
    h.finish(&new, second, pb::Outcome::Succeeded);
    h.finish(&new, second, pb::Outcome::Failed);
    let acked = acks(new.received());
    assert_eq!(acked.len(), 2);
    assert!(acked.iter().all(|ack| ack.finished && !ack.rejected));
    assert_eq!(h.stage(run, "only").state, pb::StageState::Succeeded as i32);
    assert_eq!(h.run(run).state, pb::RunState::Succeeded as i32);
}

#[test]
fn a_stage_without_retries_fails_with_agent_lost_and_skips_dependents() {
    let mut h = Harness::new();
    let run = h.start_run("pipeline: p\ndefaults: { retries: 0 }\nstages:\n  a: { commands: [x] }\n  b: { needs: [a], commands: [y] }\n");
    let mut agent = h.connect("gone", 1, 1, vec![]);
    assert_eq!(agent.assignments().len(), 1);
    h.lapse_lease();
    let a = h.stage(run, "a");
    assert_eq!(a.state, pb::StageState::Failed as i32);
    assert!(a.message.contains("agent gone lost"), "{}", a.message);
    assert_eq!(h.stage(run, "b").state, pb::StageState::Skipped as i32);
    assert_eq!(h.run(run).state, pb::RunState::Failed as i32);
}

#[test]
fn resent_log_lines_are_stored_once() {
    let mut h = Harness::new();
    let run = h.start_run("pipeline: p\nstages:\n  a: { commands: [x] }\n");
    let mut agent = h.connect("one", 1, 1, vec![]);
    let stage = agent.assignments()[0];
    let batch = |first: u64, n: u64| {
        let lines = (first..first + n)
            .map(|seq| pb::LogLine {
                stream: 1,
                text: format!("line {seq}"),
                at_ms: 0,
            })
            .collect();
        Msg::Logs(pb::LogBatch {
            stage: Some(stage),
            first_seq: first,
            lines,
        })
    };
    h.send(&agent, batch(0, 3));
    h.send(&agent, batch(1, 4));
    let next: Vec<u64> = acks(agent.received())
        .iter()
        .map(|ack| ack.next_log_seq)
        .collect();
    assert_eq!(next, [3, 5]);
    let key = StageKey { run, idx: 0 };
    let texts: Vec<String> = h
        .store
        .log_page(key, 1, 0, u64::MAX, 1000)
        .unwrap()
        .into_iter()
        .map(|log| log.line.text)
        .collect();
    assert_eq!(
        texts,
        (0..5).map(|seq| format!("line {seq}")).collect::<Vec<_>>()
    );
}

#[test]
fn recovery_resumes_unfinished_runs_and_waits_for_their_agents() {
    let mut h = Harness::new();
    let run = h.start_run(
        "pipeline: p\nstages:\n  a: { commands: [x] }\n  b: { needs: [a], commands: [y] }\n",
    );
    let mut agent = h.connect("one", 1, 1, vec![]);
    let stage = agent.assignments()[0];
    h.restart();
    let mut agent = h.connect("one", 2, 1, vec![stage]);
    let resumed = agent.received().into_iter().find_map(|msg| match msg {
        Out::Welcome(welcome) => Some(welcome.resume),
        _ => None,
    });
    assert_eq!(resumed.unwrap()[0].stage, Some(stage));
    h.finish(&agent, stage, pb::Outcome::Succeeded);
    assert_eq!(agent.assignments().len(), 1, "b follows after the restart");
    assert_eq!(h.run(run).state, pb::RunState::Running as i32);
}

#[test]
fn after_a_restart_a_stage_whose_agent_never_returns_is_requeued() {
    let mut h = Harness::new();
    let run = h.start_run("pipeline: p\nstages:\n  only: { commands: [sleep 1] }\n");
    let mut agent = h.connect("gone", 1, 1, vec![]);
    assert_eq!(agent.assignments()[0].attempt, 1);
    h.restart();
    // `gone` never reconnects: one lease after the restart its stage is
    // handed to another agent.
    h.lapse_lease();
    let stage = h.stage(run, "only");
    assert_eq!(
        (stage.state, stage.attempt),
        (pb::StageState::Ready as i32, 2),
        "{stage:?}"
    );
    let mut other = h.connect("other", 2, 1, vec![]);
    assert_eq!(other.assignments()[0].attempt, 2);
}

const WATCHED: &str = "
pipeline: w
stages:
  deploy:
    environment: prod
    commands: [x]
    monitor:
      scrape: http://127.0.0.1:9/metrics
      every: 1s
      rollback_when: { error_ratio: \"> 0.5\" }
      failure_limit: 3
      for: 10m
";

/// `prod` of the pipeline `w` in [`WATCHED`].
fn prod() -> EnvKey {
    EnvKey::of_pipeline("w", "prod")
}

fn sample(release: u64, value: f64) -> Event {
    sample_of(prod(), release, value)
}

fn sample_of(environment: EnvKey, release: u64, value: f64) -> Event {
    let values = Ok([("error_ratio".to_string(), Some(value))].into());
    Event::MonitorSample(monitor::Observation {
        release,
        environment,
        values,
    })
}

#[test]
fn rollback_starts_at_exactly_failure_limit_consecutive_breaches() {
    let mut h = Harness::new();
    let mut agent = h.connect("one", 1, 1, vec![]);
    for _ in 0..2 {
        h.start_run(WATCHED);
        let stage = agent.assignments()[0];
        h.finish(&agent, stage, pb::Outcome::Succeeded);
    }
    let (requests, _) = h.engine.take_requests();
    assert_eq!(requests.len(), 2, "each release is watched");
    let live = h.engine.delivery.live(&prod()).unwrap();
    let runs_before = h.engine.next_run_id;

    // Two breaches, a healthy sample (the count starts over), two more:
    // still nothing. The third consecutive one rolls back.
    for value in [0.9, 0.9, 0.1, 0.9, 0.9] {
        h.engine.handle(sample(live, value));
        h.commit();
        assert_eq!(
            h.engine.next_run_id, runs_before,
            "no rollback after {value}"
        );
    }
    h.engine.handle(sample(live, 0.9));
    h.commit();
    assert_eq!(
        h.engine.next_run_id,
        runs_before + 1,
        "the rollback run started"
    );
    let rollback = agent.assignments()[0];
    h.finish(&agent, rollback, pb::Outcome::Succeeded);
    let restored = h.engine.delivery.live(&prod()).unwrap();
    assert_eq!(restored, live - 1, "the previous release is live again");
    let rolled_back = h.store.release(live).unwrap().unwrap();
    assert_eq!(rolled_back.state, crate::store::ReleaseState::RolledBack);
    assert!(rolled_back.reason.unwrap().contains("error_ratio=0.9"));
    // Later samples of the replaced release change nothing.
    h.engine.handle(sample(live, 0.9));
    h.commit();
    assert_eq!(h.engine.next_run_id, runs_before + 1);
}

#[test]
fn retrying_one_of_two_failed_needs_still_lets_the_run_finish() {
    let mut h = Harness::new();
    let run = h.start_run("pipeline: p\nstages:\n  a: { commands: [x] }\n  b: { commands: [y] }\n  c: { needs: [a, b], commands: [z] }\n");
    let mut agents = [h.connect("one", 1, 2, vec![])];
    for (_, stage) in assignments(&mut agents) {
        h.finish(&agents[0], stage, pb::Outcome::Failed);
    }
    assert_eq!(h.run(run).state, pb::RunState::Failed as i32);
    let retried = h
        .ask(|reply| Event::RetryStage {
            stored: None,
            run,
            stage: "a".into(),
            reply,
        })
        .unwrap();
    assert_eq!(retried.state, pb::RunState::Running as i32);
    let again = assignments(&mut agents);
    assert_eq!(again.len(), 1, "only a runs again");
    h.finish(&agents[0], again[0].1, pb::Outcome::Succeeded);
    // b is still failed, so c can never run: skipped, and the run ends.
    assert_eq!(h.stage(run, "c").state, pb::StageState::Skipped as i32);
    assert_eq!(h.run(run).state, pb::RunState::Failed as i32);
}

#[test]
fn a_retry_upstream_leaves_stages_skipped_by_their_condition_skipped() {
    let mut h = Harness::new();
    // `publish` never runs on this run (no branch is "release"), nor does
    // `announce` after it; `report` was skipped only because `a` failed.
    let run = h.start_run(
        "pipeline: p\nstages:\n  a: { commands: [x] }\n  publish: { needs: [a], if: 'branch == \"release\"', commands: [y] }\n  announce: { needs: [publish], commands: [z] }\n  report: { needs: [a], commands: [w] }\n",
    );
    assert_eq!(
        h.stage(run, "publish").state,
        pb::StageState::Skipped as i32
    );
    let mut agents = [h.connect("one", 1, 2, vec![])];
    let first = assignments(&mut agents);
    assert_eq!(first.len(), 1);
    h.finish(&agents[0], first[0].1, pb::Outcome::Failed);
    assert_eq!(h.stage(run, "report").state, pb::StageState::Skipped as i32);
    assert_eq!(h.run(run).state, pb::RunState::Failed as i32);

    h.ask(|reply| Event::RetryStage {
        stored: None,
        run,
        stage: "a".into(),
        reply,
    })
    .unwrap();
    let again = assignments(&mut agents);
    h.finish(&agents[0], again[0].1, pb::Outcome::Succeeded);
    let after = assignments(&mut agents);
    assert_eq!(after.len(), 1, "only report runs after the retried a");
    h.finish(&agents[0], after[0].1, pb::Outcome::Succeeded);
    for name in ["publish", "announce"] {
        let stage = h.stage(run, name);
        assert_eq!(stage.state, pb::StageState::Skipped as i32, "{name}");
    }
    assert!(
        h.stage(run, "publish").message.contains("is false"),
        "{}",
        h.stage(run, "publish").message
    );
    assert_eq!(h.run(run).state, pb::RunState::Succeeded as i32);
}

#[test]
fn gates_are_decided_even_when_no_agent_has_a_free_slot() {
    let mut h = Harness::new();
    let run = h.start_run(
        "pipeline: p\nstages:\n  m: { commands: [x] }\n  busy: { commands: [sleep] }\n  queued: { commands: [y] }\n  g: { needs: [m], gate: { require: { auc: \">= 0.5\" }, on_missing: pass } }\n",
    );
    let mut agents = [h.connect("one", 1, 1, vec![])];
    let first = assignments(&mut agents);
    assert_eq!(first[0].1.stage_idx, 0, "m goes first");
    h.finish(&agents[0], first[0].1, pb::Outcome::Succeeded);
    // `busy` takes the only slot, `queued` waits for it, and the gate that
    // became ready behind them is decided anyway.
    assert_eq!(h.stage(run, "busy").state, pb::StageState::Assigned as i32);
    assert_eq!(h.stage(run, "queued").state, pb::StageState::Ready as i32);
    assert_eq!(h.stage(run, "g").state, pb::StageState::Succeeded as i32);
}

#[test]
fn releases_environments_and_monitors_survive_a_restart() {
    let mut h = Harness::new();
    let mut agent = h.connect("one", 1, 1, vec![]);
    for _ in 0..2 {
        h.start_run(WATCHED);
        let stage = agent.assignments()[0];
        h.finish(&agent, stage, pb::Outcome::Succeeded);
    }
    let live = h.engine.delivery.live(&prod()).unwrap();
    h.restart();
    assert_eq!(h.engine.delivery.live(&prod()), Some(live));
    assert_eq!(h.engine.delivery.history(&prod()).len(), 2);
    assert_eq!(
        h.engine.delivery.release(live - 1).map(|r| r.state),
        Some(crate::store::ReleaseState::Superseded)
    );
    let (monitors, _) = h.engine.take_requests();
    let watched: Vec<u64> = monitors.iter().map(|m| m.release).collect();
    assert_eq!(watched, [live], "only the live release is watched again");
    // New releases continue the numbering.
    let mut agent = h.connect("one", 2, 1, vec![]);
    h.start_run(WATCHED);
    let stage = agent.assignments()[0];
    h.finish(&agent, stage, pb::Outcome::Succeeded);
    assert_eq!(h.engine.delivery.live(&prod()), Some(live + 1));
}

#[test]
fn a_breach_rolls_back_its_own_pipeline_and_never_touches_another() {
    let mut h = Harness::new();
    let mut agent = h.connect("one", 1, 1, vec![]);
    let other = WATCHED.replace("pipeline: w", "pipeline: v");
    // w: releases 1 and 2; then v: release 3, in an environment of the
    // same name.
    for yaml in [WATCHED, WATCHED, other.as_str()] {
        h.start_run(yaml);
        let stage = agent.assignments()[0];
        h.finish(&agent, stage, pb::Outcome::Succeeded);
    }
    let v_prod = EnvKey::of_pipeline("v", "prod");
    assert_eq!(h.engine.delivery.live(&prod()), Some(2));
    assert_eq!(h.engine.delivery.live(&v_prod), Some(3));
    assert_eq!(
        h.store.release(2).unwrap().unwrap().state,
        crate::store::ReleaseState::Live,
        "v's first release leaves w's live one alone"
    );

    // v's release breaching under w's name is not w's business.
    for _ in 0..3 {
        h.engine.handle(sample_of(prod(), 3, 0.9));
        h.commit();
    }
    assert!(agent.assignments().is_empty(), "nothing rolled back");

    for _ in 0..3 {
        h.engine.handle(sample(2, 0.9));
        h.commit();
    }
    let rollback = agent.assignments()[0];
    let plan = h.engine.runs[&RunId(rollback.run_id)]
        .record
        .rollback
        .clone()
        .unwrap();
    assert_eq!((plan.environment, plan.from, plan.to), (prod(), 2, 1));
    h.finish(&agent, rollback, pb::Outcome::Succeeded);
    assert_eq!(h.engine.delivery.live(&prod()), Some(1));
    assert_eq!(h.engine.delivery.live(&v_prod), Some(3));
    assert_eq!(
        h.store.release(3).unwrap().unwrap().state,
        crate::store::ReleaseState::Live
    );
}

#[test]
fn refused_lines_of_a_cancelled_run_free_the_agents_slot() {
    let mut h = Harness::new();
    let run = h.start_run("pipeline: p\nstages:\n  hang: { commands: [sleep] }\n");
    let mut agent = h.connect("one", 1, 1, vec![]);
    let hang = agent.assignments()[0];
    h.ask(|reply| Event::CancelRun { run, reply }).unwrap();
    h.commit();
    // The run is over and retired; the agent, not yet stopped, prints on.
    h.send(&agent, log_batch(hang, 0, &["still here"]));
    let refused = acks(agent.received());
    assert!(
        refused.iter().any(|ack| ack.rejected),
        "the lines are refused: {refused:?}"
    );
    // An agent told so forgets the attempt without a completion: its slot
    // must not stay taken.
    let next = h.start_run("pipeline: q\nstages:\n  x: { commands: [make] }\n");
    let given = agent.assignments();
    assert_eq!(given.len(), 1, "the one slot is free again");
    assert_eq!(given[0].run_id, next.0);
}

fn log_batch(stage: pb::StageRef, first: u64, texts: &[&str]) -> Msg {
    let lines = texts
        .iter()
        .map(|text| pb::LogLine {
            stream: 1,
            text: (*text).into(),
            at_ms: 0,
        })
        .collect();
    Msg::Logs(pb::LogBatch {
        stage: Some(stage),
        first_seq: first,
        lines,
    })
}

fn stored_texts(h: &Harness, key: StageKey, attempt: u32) -> Vec<String> {
    h.store
        .log_page(key, attempt, 0, u64::MAX, 1000)
        .unwrap()
        .into_iter()
        .map(|log| log.line.text)
        .collect()
}

#[test]
fn a_batch_that_would_leave_a_gap_is_refused_and_asked_again() {
    let mut h = Harness::new();
    let run = h.start_run("pipeline: p\nstages:\n  a: { commands: [x] }\n");
    let mut agent = h.connect("one", 1, 1, vec![]);
    let stage = agent.assignments()[0];
    let key = StageKey { run, idx: 0 };
    h.send(&agent, log_batch(stage, 0, &["0", "1"]));
    // A fake agent that skips lines 2..5.
    h.send(&agent, log_batch(stage, 5, &["5", "6"]));
    let acks = acks(agent.received());
    assert_eq!(acks.len(), 2);
    assert_eq!((acks[0].next_log_seq, acks[0].resend), (2, false));
    assert_eq!(
        (acks[1].next_log_seq, acks[1].resend, acks[1].rejected),
        (2, true, false),
        "the agent is told to send again from line 2"
    );
    assert_eq!(stored_texts(&h, key, 1), ["0", "1"], "nothing past the gap");
    h.send(&agent, log_batch(stage, 2, &["2", "3", "4", "5", "6"]));
    assert_eq!(
        stored_texts(&h, key, 1),
        ["0", "1", "2", "3", "4", "5", "6"]
    );
}

#[test]
fn an_illegal_stage_transition_is_refused_and_changes_nothing() {
    let mut h = Harness::new();
    let run = h.start_run("pipeline: p\nstages:\n  a: { commands: [x] }\n");
    let mut agent = h.connect("one", 1, 1, vec![]);
    let stage = agent.assignments()[0];
    let key = StageKey { run, idx: 0 };
    // Assigned cannot go back to pending, nor skip to awaiting approval.
    assert!(!h.engine.move_stage(key, StageState::Pending));
    assert!(!h.engine.move_stage(key, StageState::AwaitingApproval));
    assert_eq!(h.stage(run, "a").state, pb::StageState::Assigned as i32);
    h.finish(&agent, stage, pb::Outcome::Succeeded);
    assert_eq!(h.stage(run, "a").state, pb::StageState::Succeeded as i32);
    // A late "started" for the finished attempt moves nothing either.
    h.send(
        &agent,
        Msg::Started(pb::StageStarted { stage: Some(stage) }),
    );
    assert_eq!(h.stage(run, "a").state, pb::StageState::Succeeded as i32);
}

#[test]
fn lines_that_cannot_be_masked_are_never_stored_and_the_stage_fails() {
    let mut h = Harness::new();
    let secrets = secrets_with_api_token(&h);
    h.engine.with_secrets(secrets.clone());
    let run = h.start_run(
        "pipeline: p\nstages:\n  a: { commands: [x], secrets: [API_TOKEN] }\n  b: { needs: [a], commands: [y] }\n",
    );
    let mut agent = h.connect("one", 1, 1, vec![]);
    let stage = agent.assignments()[0];
    let key = StageKey { run, idx: 0 };
    // After a restart the masker is rebuilt from the secrets store, where
    // the secret is gone.
    futures::executor::block_on(secrets.remove("API_TOKEN")).unwrap();
    h.restart();
    h.engine.with_secrets(secrets.clone());
    let mut agent = h.connect("one", 2, 1, vec![stage]);
    agent.received();
    h.send(
        &agent,
        log_batch(stage, 0, &["token is hunter2-very-secret"]),
    );
    assert!(
        stored_texts(&h, key, 1).is_empty(),
        "no unmasked line stored"
    );
    let a = h.stage(run, "a");
    assert_eq!(a.state, pb::StageState::Failed as i32);
    assert!(a.message.contains("API_TOKEN"), "{}", a.message);
    assert!(!a.message.contains("hunter2"), "{}", a.message);
    assert_eq!(h.stage(run, "b").state, pb::StageState::Skipped as i32);
    let received = agent.received();
    assert!(
        received.iter().any(|msg| matches!(msg, Out::Cancel(_))),
        "the agent is told to stop: {received:?}"
    );
    assert!(acks(received).iter().any(|ack| ack.rejected));
}

#[test]
fn a_completion_with_outputs_is_settled_only_when_its_check_answers() {
    let mut h = Harness::new();
    let run = h.start_run(
        "pipeline: p\nstages:\n  a: { commands: [x], artifacts: [out] }\n  b: { needs: [a], commands: [y], artifacts: [gone] }\n",
    );
    let mut agent = h.connect("one", 1, 1, vec![]);
    let stage = agent.assignments()[0];
    let blob = h
        .blobs
        .store_with(|writer| writer.write_all(b"an archive"))
        .unwrap();
    let finished = pb::StageFinished {
        stage: Some(stage),
        outcome: pb::Outcome::Succeeded as i32,
        outputs: vec![pb::Artifact {
            path: "out".into(),
            digest: blob.digest.to_string(),
            size: blob.size,
            stage: "a".into(),
        }],
        ..Default::default()
    };
    // The engine hands the blob store's part to the runner and waits.
    h.engine.handle(Event::AgentMessage {
        agent: "one".into(),
        conn: ConnId(1),
        msg: Msg::Finished(finished.clone()),
    });
    let checks = h.engine.take_checks();
    assert_eq!(checks.len(), 1);
    // A repeat while the check is out starts no second one.
    h.engine.handle(Event::AgentMessage {
        agent: "one".into(),
        conn: ConnId(1),
        msg: Msg::Finished(finished),
    });
    assert!(h.engine.take_checks().is_empty());
    assert_eq!(h.stage(run, "a").state, pb::StageState::Assigned as i32);
    assert!(acks(agent.received()).is_empty(), "no ack before the check");
    for check in checks {
        let event = check.run(&h.blobs);
        h.engine.handle(event);
    }
    let a = h.stage(run, "a");
    assert_eq!(a.state, pb::StageState::Succeeded as i32);
    assert_eq!(a.outputs.len(), 1);
    let received = agent.received();
    assert!(acks(received.clone()).iter().any(|ack| ack.finished));

    // An output that was never uploaded fails the stage, through the same
    // check.
    let b = received
        .into_iter()
        .find_map(|msg| match msg {
            Out::Assign(assign) => assign.stage,
            _ => None,
        })
        .expect("b assigned");
    let missing = pb::StageFinished {
        stage: Some(b),
        outcome: pb::Outcome::Succeeded as i32,
        outputs: vec![pb::Artifact {
            path: "gone".into(),
            digest: kiln_common::archive::BlobDigest::of(b"never sent").to_string(),
            size: 10,
            stage: "b".into(),
        }],
        ..Default::default()
    };
    h.send(&agent, Msg::Finished(missing));
    let b = h.stage(run, "b");
    assert_eq!(b.state, pb::StageState::Failed as i32);
    assert!(b.message.contains("never uploaded"), "{}", b.message);
}

/// A secrets store over the harness's store holding `API_TOKEN`, written
/// through a committer of its own (the harness commits the engine's
/// batches by hand).
fn secrets_with_api_token(h: &Harness) -> Arc<crate::secrets::Secrets> {
    let (committer, _thread) = crate::commit::Committer::start(h.store.clone(), |_| {});
    let key_file = h._dir.path().join("secrets.key");
    let secrets = Arc::new(
        crate::secrets::Secrets::load(
            h.store.clone(),
            crate::commit::Writer::new(committer),
            &key_file,
        )
        .unwrap(),
    );
    futures::executor::block_on(secrets.put("API_TOKEN", "hunter2-very-secret", "test")).unwrap();
    secrets
}

#[test]
fn an_assignment_leaves_only_with_its_secrets_opened_off_the_loop() {
    let mut h = Harness::new();
    let secrets = secrets_with_api_token(&h);
    h.engine.with_secrets(secrets);
    let run = h.start_run(
        "pipeline: p\nstages:\n  a: { commands: [x], secrets: [API_TOKEN] }\n  b: { commands: [y], secrets: [NOT_SET] }\n",
    );
    // Both are placed at once; their secrets are opened off the loop, so
    // the engine hands them to the runner instead of sending Assigns.
    let (tx, mut rx) = AgentTx::channel();
    h.engine.handle(Event::AgentHello {
        hello: pb::Hello {
            name: "one".into(),
            capacity: 2,
            ..Default::default()
        },
        conn: ConnId(1),
        tx,
    });
    let _ = h.engine.take_commit();
    let work = h.engine.take_secrets_to_open();
    assert_eq!(work.len(), 2);
    let early: Vec<_> = std::iter::from_fn(|| rx.try_recv()).collect();
    assert!(
        early.is_empty(),
        "nothing sent before the commit and the secrets"
    );
    let secrets = h.engine.secrets.clone();
    for item in work {
        let event = item.run(secrets.as_deref());
        h.engine.handle(event);
    }
    let (batch, effects) = h.engine.take_commit();
    h.store.apply(&batch).unwrap();
    for effect in effects {
        effect();
    }
    let assigns: Vec<pb::Assign> = std::iter::from_fn(|| rx.try_recv())
        .filter_map(|msg| match msg.ok()?.msg? {
            Out::Assign(assign) => Some(assign),
            _ => None,
        })
        .collect();
    assert_eq!(assigns.len(), 1, "only the stage whose secret opened");
    assert_eq!(assigns[0].stage_name, "a");
    assert_eq!(assigns[0].secrets["API_TOKEN"], "hunter2-very-secret");
    let b = h.stage(run, "b");
    assert_eq!(b.state, pb::StageState::Failed as i32);
    assert!(b.message.contains("NOT_SET"), "{}", b.message);
    assert!(b.agent.is_empty(), "it never reached an agent");
}

const CANARY_THEN_AFTER: &str = "
pipeline: w
stages:
  deploy:
    environment: prod
    commands: [x]
    strategy:
      canary:
        steps: [10, 100]
        pause: 1m
        analysis:
          scrape: http://127.0.0.1:9/metrics
          every: 1s
          rollback_when: { error_ratio: \"> 0.5\" }
  after:
    needs: [deploy]
    commands: [y]
";

#[test]
fn a_rolling_out_stage_holds_its_run_through_a_repeated_completion_and_a_restart() {
    let mut h = Harness::new();
    let mut agent = h.connect("one", 1, 1, vec![]);
    // Release 1 goes live at once (nothing to replace): no rollout.
    let first = h.start_run(CANARY_THEN_AFTER);
    let deploy = agent.assignments()[0];
    h.finish(&agent, deploy, pb::Outcome::Succeeded);
    let after = agent.assignments()[0];
    h.finish(&agent, after, pb::Outcome::Succeeded);
    assert_eq!(h.run(first).state, pb::RunState::Succeeded as i32);

    let second = h.start_run(CANARY_THEN_AFTER);
    let deploy = agent.assignments()[0];
    h.finish(&agent, deploy, pb::Outcome::Succeeded);
    let stage = h.stage(second, "deploy");
    assert_eq!(stage.state, pb::StageState::RollingOut as i32);
    assert!(
        stage
            .message
            .starts_with("rolling out release 2 to `w/prod`"),
        "{}",
        stage.message
    );
    assert_eq!(
        h.stage(second, "after").state,
        pb::StageState::Pending as i32
    );
    assert!(agent.assignments().is_empty(), "`after` waits");

    // The agent did not hear the ack and reports again: acknowledged as
    // settled, and the stage still waits.
    agent.received();
    h.finish(&agent, deploy, pb::Outcome::Succeeded);
    let acked = acks(agent.received());
    assert!(
        acked.iter().all(|ack| ack.finished && !ack.rejected),
        "{acked:?}"
    );
    assert_eq!(
        h.stage(second, "deploy").state,
        pb::StageState::RollingOut as i32
    );

    h.restart();
    assert_eq!(h.run(second).state, pb::RunState::Running as i32);
    assert_eq!(
        h.stage(second, "deploy").state,
        pb::StageState::RollingOut as i32
    );

    // The pause ends: the last step deploys, the candidate goes live, and
    // only then does the run go on.
    h.clock.advance(60_001);
    h.engine.tick();
    h.commit();
    // (The agent's lease lapsed with the pause: it comes back.)
    let mut agent = h.connect("one", 3, 1, vec![]);
    let step = agent.assignments();
    assert_eq!(step.len(), 1, "the 100% step's run");
    assert_ne!(step[0].run_id, second.0);
    h.finish(&agent, step[0], pb::Outcome::Succeeded);
    assert_eq!(
        h.engine.delivery.live(&EnvKey::of_pipeline("w", "prod")),
        Some(2)
    );
    let stage = h.stage(second, "deploy");
    assert_eq!(stage.state, pb::StageState::Succeeded as i32);
    assert!(
        stage.message.starts_with("rolled out to `w/prod`"),
        "{}",
        stage.message
    );
    let after = agent.assignments();
    assert_eq!(after.len(), 1, "`after` runs now");
    h.finish(&agent, after[0], pb::Outcome::Succeeded);
    assert_eq!(h.run(second).state, pb::RunState::Succeeded as i32);
}

#[test]
fn a_run_past_its_timeout_during_its_rollout_aborts_the_rollout() {
    let mut h = Harness::new();
    let mut agent = h.connect("one", 1, 1, vec![]);
    // The run's 30s pass during the rollout's 1m pause.
    let timed = CANARY_THEN_AFTER.replace("pipeline: w\n", "pipeline: w\ntimeout: 30s\n");
    let first = h.start_run(&timed);
    for _ in 0..2 {
        let stage = agent.assignments()[0];
        h.finish(&agent, stage, pb::Outcome::Succeeded);
    }
    assert_eq!(h.run(first).state, pb::RunState::Succeeded as i32);
    let second = h.start_run(&timed);
    let deploy = agent.assignments()[0];
    h.finish(&agent, deploy, pb::Outcome::Succeeded);
    assert_eq!(
        h.stage(second, "deploy").state,
        pb::StageState::RollingOut as i32
    );

    h.clock.advance(31_000);
    h.send(&agent, Msg::Heartbeat(pb::Heartbeat { running: 0 }));
    h.engine.tick();
    h.commit();
    assert_eq!(h.run(second).state, pb::RunState::Failed as i32);
    let stage = h.stage(second, "deploy");
    assert_eq!(stage.state, pb::StageState::Cancelled as i32);
    assert!(
        stage.message.contains("the run's timeout of 30s passed")
            && stage.message.contains("its rollout is aborted"),
        "{}",
        stage.message
    );
    assert_eq!(
        h.stage(second, "after").state,
        pb::StageState::Cancelled as i32
    );
    // Release 1 is deployed again at 100%.
    let restore = agent.assignments();
    assert_eq!(restore.len(), 1, "the restore's run");
    h.finish(&agent, restore[0], pb::Outcome::Succeeded);
    assert_eq!(
        h.engine.delivery.live(&EnvKey::of_pipeline("w", "prod")),
        Some(1)
    );
    let aborted = h.engine.delivery.release(2).unwrap();
    assert_eq!(aborted.state, crate::store::ReleaseState::Aborted);
    assert_eq!(
        aborted.reason.as_deref(),
        Some("run 2 that made release 2 was stopped (the run's timeout of 30s passed)")
    );
}
