//! The containerized farm (issue 3): the coordinator and two agents, each
//! in its own container on a private Docker network, running a DAG whose
//! stages are sibling containers. One agent is cut off the network in the
//! middle of a stage; the stage must move to the other agent once the lease
//! expires, the run must succeed, and no stage may complete twice, not even
//! when the cut-off agent comes back with its late result.
//!
//! Needs a Docker engine, `busybox-static` for the stage image, and
//! kiln/base:bookworm or root to build it (`tests/setup.sh` provides all
//! three; without them the test fails, or skips with `KILN_ALLOW_SKIP=1`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use kiln_proto::v1 as pb;
use kiln_tests::docker::TEST_IMAGE;
use kiln_tests::farm::{Farm, FarmOptions};
use kiln_tests::{Repo, eventually, get_run, logs, stage, wait_run};

const LEASE_TTL: Duration = Duration::from_secs(3);
const SUCCEEDED: &str = "kiln_stages_finished_total{state=\"succeeded\"}";

fn pipeline() -> String {
    format!(
        r#"pipeline: farm
defaults:
  image: {TEST_IMAGE}
  retries: 1
  timeout: 2m
stages:
  prepare:
    commands: ["echo preparing", "echo done prepare attempt $KILN_ATTEMPT"]
  train:
    needs: [prepare]
    commands: ["echo training attempt $KILN_ATTEMPT", "sleep 8", "echo done train attempt $KILN_ATTEMPT"]
  lint:
    needs: [prepare]
    commands: ["echo done lint attempt $KILN_ATTEMPT"]
  report:
    needs: [train, lint]
    commands: ["test -f kiln.yml", "echo done report attempt $KILN_ATTEMPT"]
"#
    )
}

async fn register_and_run(farm: &Farm, repo: &Repo) -> Result<u64> {
    let mut client = farm.client().await?;
    let pipeline = client
        .register_pipeline(pb::RegisterPipelineRequest {
            file_name: "kiln.yml".into(),
            spec_yaml: std::fs::read_to_string(repo.path().join("kiln.yml"))?,
            repo: repo.path().display().to_string(),
            branch: "main".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .pipeline
        .expect("a registered pipeline");
    let run = client
        .trigger_run(pb::TriggerRunRequest {
            pipeline: pipeline.name,
            triggered_by: "farm test".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(run.id)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_agents_stage_moves_to_the_other_agent_and_completes_once() -> Result<()> {
    let repo = Repo::new(&pipeline())?;
    let options = FarmOptions {
        agents: &["a", "b"],
        capacity: 1,
        lease_ttl: "3s",
        heartbeat: "300ms",
        repos: &[repo.path()],
    };
    let Some(farm) = Farm::start("farm", &options).await? else {
        return Ok(());
    };
    let id = register_and_run(&farm, &repo).await?;
    let mut client = farm.client().await?;

    // `train` runs on one agent, in a sibling container of that agent's.
    let held = eventually(Duration::from_secs(120), "train to run", || {
        let mut client = client.clone();
        async move {
            let run = get_run(&mut client, id).await?;
            let train = stage(&run, "train").clone();
            Ok((train.state == pb::StageState::Running as i32).then_some(train))
        }
    })
    .await?;
    assert_eq!(held.attempt, 1, "{held:?}");
    let cut_off = held.agent.clone();
    let other = farm
        .agents
        .iter()
        .map(|agent| agent.name.clone())
        .find(|name| *name != cut_off)
        .expect("two agents");
    // `running` comes before the checkout; wait for the container itself.
    eventually(
        Duration::from_secs(60),
        "train's container, a sibling of its agent's, to exist",
        || async { Ok((!farm.stage_containers(&cut_off).await?.is_empty()).then_some(())) },
    )
    .await?;

    // Partition: the agent's container leaves the farm network.
    let cut_at = Instant::now();
    farm.disconnect(&cut_off).await?;
    let moved = eventually(
        Duration::from_secs(60),
        "train to be re-dispatched to the other agent",
        || {
            let mut client = client.clone();
            let other = other.clone();
            async move {
                let run = get_run(&mut client, id).await?;
                let train = stage(&run, "train").clone();
                Ok((train.agent == other && train.attempt == 2).then_some(train))
            }
        },
    )
    .await?;
    let waited = cut_at.elapsed();
    assert!(
        waited >= LEASE_TTL - Duration::from_millis(700),
        "train moved after {waited:?}, before the {LEASE_TTL:?} lease could expire: {moved:?}"
    );

    let run = wait_run(&mut client, id, Duration::from_secs(180)).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    let placement: BTreeMap<&str, (u32, &str)> = run
        .stages
        .iter()
        .map(|s| (s.name.as_str(), (s.attempt, s.agent.as_str())))
        .collect();
    assert_eq!(placement["train"], (2, other.as_str()), "{placement:?}");
    for name in ["prepare", "lint", "report"] {
        assert_eq!(placement[name].0, 1, "{name} ran once: {placement:?}");
    }
    for s in &run.stages {
        assert_eq!(s.state, pb::StageState::Succeeded as i32, "{s:?}");
        assert!(
            s.image_digest.starts_with("sha256:"),
            "{} reports the image it ran in: {s:?}",
            s.name
        );
    }
    let stages = run.stages.len() as f64;
    assert_eq!(farm.metric(SUCCEEDED)?, stages, "one success per stage");
    assert_done_once(&mut client, id, &run).await?;

    // The cut-off agent's own container for attempt 1 still runs (or ran)
    // on the engine: the partition cut the agent off the coordinator, not
    // off the engine. It comes back with a result nobody may accept.
    farm.connect(&cut_off).await?;
    eventually(
        Duration::from_secs(60),
        "the cut-off agent to reconnect",
        || async { Ok(farm.agent_connected(&cut_off).await?.then_some(())) },
    )
    .await?;
    eventually(
        Duration::from_secs(60),
        "the cut-off agent's stage container to be removed",
        || async {
            Ok(farm
                .stage_containers(&cut_off)
                .await?
                .is_empty()
                .then_some(()))
        },
    )
    .await?;
    // Several heartbeats for anything the agent re-sends to be handled.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = get_run(&mut client, id).await?;
    assert_eq!(after, run, "the late result changed the run");
    assert_eq!(
        farm.metric(SUCCEEDED)?,
        stages,
        "still one success per stage"
    );
    assert_done_once(&mut client, id, &after).await?;
    assert!(farm.agent_connected(&cut_off).await?);
    assert!(farm.agent_connected(&other).await?);
    for agent in &farm.agents {
        assert_eq!(
            farm.stage_containers(&agent.name).await?,
            Vec::<String>::new(),
            "{} left a stage container behind",
            agent.name
        );
    }
    farm.finish();
    Ok(())
}

/// Every stage's last line, `done <stage> attempt <n>`, is stored exactly
/// once, and from the attempt the run records.
async fn assert_done_once(
    client: &mut pb::control_service_client::ControlServiceClient<
        kiln_common::channel::KilnChannel,
    >,
    id: u64,
    run: &pb::Run,
) -> Result<()> {
    let entries = logs(client, id, "").await?;
    for s in &run.stages {
        let done: Vec<(u32, &str)> = entries
            .iter()
            .filter(|entry| entry.stage == s.name)
            .filter_map(|entry| {
                let text = entry.line.as_ref()?.text.as_str();
                text.starts_with("done ").then_some((entry.attempt, text))
            })
            .collect();
        let expected = format!("done {} attempt {}", s.name, s.attempt);
        assert_eq!(
            done,
            [(s.attempt, expected.as_str())],
            "{} completed exactly once",
            s.name
        );
    }
    Ok(())
}
