//! A DAG on real agents: order, parallelism, failure, timeout, cancel.

use std::time::Duration;

use anyhow::Result;
use kiln_proto::v1 as pb;
use kiln_tests::{
    CoordinatorOptions, Farm, Repo, alive, eventually, get_run, logs, register_and_run, stage,
    wait_run,
};

const DIAMOND: &str = r#"
pipeline: diamond
stages:
  a:
    commands: ["echo a from $KILN_STAGE"]
  b:
    needs: [a]
    commands: ["sleep 1", "echo b done"]
  c:
    needs: [a]
    commands: ["sleep 1", "echo c done"]
  d:
    needs: [b, c]
    commands: ["echo d"]
"#;

/// A coordinator and `n` agents of capacity 1 each.
fn farm(n: usize) -> Result<Farm> {
    let names: Vec<String> = (0..n).map(|i| format!("agent-{i}")).collect();
    let agents: Vec<(&str, &str, u32)> = names
        .iter()
        .map(|name| (name.as_str(), "role=build", 1))
        .collect();
    Farm::start(&CoordinatorOptions::default(), &agents)
}

fn state(stage: &pb::Stage) -> pb::StageState {
    pb::StageState::try_from(stage.state).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn diamond_runs_in_order_with_b_and_c_in_parallel_on_two_agents() -> Result<()> {
    let farm = farm(2)?;
    let repo = Repo::new(DIAMOND)?;
    let id = register_and_run(&farm.coordinator, &repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, Duration::from_secs(60)).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    let (a, b, c, d) = (
        stage(&run, "a"),
        stage(&run, "b"),
        stage(&run, "c"),
        stage(&run, "d"),
    );
    assert!(b.started_ms >= a.finished_ms && c.started_ms >= a.finished_ms);
    assert!(d.started_ms >= b.finished_ms.max(c.finished_ms));
    assert!(
        b.started_ms < c.finished_ms && c.started_ms < b.finished_ms,
        "b and c overlap"
    );
    assert_ne!(b.agent, c.agent, "b and c ran on different agents");
    let a_logs = logs(&mut client, id, "a").await?;
    assert!(
        a_logs
            .iter()
            .any(|e| e.line.as_ref().unwrap().text == "a from a"),
        "{a_logs:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_stage_fails_the_run_and_skips_its_dependents() -> Result<()> {
    let farm = farm(2)?;
    let repo = Repo::new(
        "pipeline: failing\nstages:\n  a: { commands: [\"echo about to fail\", \"exit 3\"] }\n  b: { needs: [a], commands: [\"echo never\"] }\n  other: { commands: [\"true\"] }\n",
    )?;
    let id = register_and_run(&farm.coordinator, &repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, Duration::from_secs(60)).await?;
    assert_eq!(run.state, pb::RunState::Failed as i32);
    assert_eq!(state(stage(&run, "a")), pb::StageState::Failed);
    assert_eq!(stage(&run, "a").exit_code, 3);
    assert_eq!(state(stage(&run, "b")), pb::StageState::Skipped);
    assert_eq!(state(stage(&run, "other")), pb::StageState::Succeeded);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_kills_the_stage() -> Result<()> {
    let farm = farm(1)?;
    let repo = Repo::new(
        "pipeline: slow\nstages:\n  hang:\n    timeout: 1s\n    commands: [\"echo pid $$\", \"sleep 60\"]\n",
    )?;
    let id = register_and_run(&farm.coordinator, &repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, Duration::from_secs(30)).await?;
    let hang = stage(&run, "hang");
    assert_eq!(state(hang), pb::StageState::TimedOut, "{hang:?}");
    assert!(
        hang.finished_ms - hang.started_ms < 15_000,
        "killed well before the sleep ended"
    );
    let pid = shell_pid(&logs(&mut client, id, "hang").await?);
    assert!(!alive(pid), "the stage's shell {pid} was killed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_kills_a_running_stage() -> Result<()> {
    let farm = farm(1)?;
    let repo = Repo::new(
        "pipeline: long\nstages:\n  hang: { commands: [\"echo pid $$\", \"sleep 60\"] }\n  after: { needs: [hang], commands: [\"true\"] }\n",
    )?;
    let id = register_and_run(&farm.coordinator, &repo).await?;
    let mut client = farm.coordinator.client().await?;
    let pid = eventually(
        Duration::from_secs(30),
        "the stage to print its pid",
        || {
            let mut client = client.clone();
            async move {
                let entries = logs(&mut client, id, "hang").await?;
                Ok(entries
                    .iter()
                    .any(|e| e.line.as_ref().unwrap().text.starts_with("pid "))
                    .then(|| shell_pid(&entries)))
            }
        },
    )
    .await?;
    assert!(alive(pid));
    let cancelled = client
        .cancel_run(pb::CancelRunRequest { run_id: id })
        .await?
        .into_inner();
    assert_eq!(cancelled.state, pb::RunState::Cancelled as i32);
    assert_eq!(state(stage(&cancelled, "after")), pb::StageState::Cancelled);
    eventually(
        Duration::from_secs(15),
        "the stage's process to die",
        || async move { Ok((!alive(pid)).then_some(())) },
    )
    .await?;
    let run = get_run(&mut client, id).await?;
    assert_eq!(state(stage(&run, "hang")), pb::StageState::Cancelled);
    // The agent's slot is free again: a new run goes through.
    let quick = Repo::new("pipeline: quick\nstages:\n  x: { commands: [\"true\"] }\n")?;
    let id = register_and_run(&farm.coordinator, &quick).await?;
    let run = match wait_run(&mut client, id, Duration::from_secs(30)).await {
        Ok(run) => run,
        Err(error) => {
            // Say where it stuck: the run's stages and what each agent holds.
            let run = get_run(&mut client, id).await?;
            let agents = client.list_agents(pb::ListAgentsRequest {}).await?;
            return Err(error.context(format!("run: {run:?}; agents: {agents:?}")));
        }
    };
    assert_eq!(run.state, pb::RunState::Succeeded as i32);
    Ok(())
}

fn shell_pid(entries: &[pb::LogEntry]) -> i32 {
    entries
        .iter()
        .find_map(|e| {
            e.line
                .as_ref()?
                .text
                .strip_prefix("pid ")?
                .trim()
                .parse()
                .ok()
        })
        .expect("the stage printed its pid")
}
