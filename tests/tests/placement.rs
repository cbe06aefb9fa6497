//! Placement by capability, end to end: a real coordinator, one real docker
//! agent (declaring one GPU with `--gpus 1`) and one real process agent.
//! Stages without an image go only to the process agent; a GPU stage goes
//! only where a GPU is declared, and on this machine, which has no NVIDIA
//! runtime, the engine's refusal reaches the stage's message; a stage no
//! connected agent can run waits and says what it needs.

use std::time::Duration;

use anyhow::Result;
use kiln_proto::v1 as pb;
use kiln_tests::docker::{DockerFarm, TEST_IMAGE};
use kiln_tests::{Repo, eventually, get_run, stage, start_agent};

const LIMIT: Duration = Duration::from_secs(120);

fn state(stage: &pb::Stage) -> pb::StageState {
    pb::StageState::try_from(stage.state).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn stages_go_only_to_agents_that_can_run_them() -> Result<()> {
    let Some(farm) = DockerFarm::start_with("placement", &["--gpus", "1"]).await? else {
        return Ok(());
    };
    let host_dir = tempfile::tempdir()?;
    let host_name = format!("host-{}", std::process::id());
    let _host = start_agent(&farm.coordinator.url(), &host_name, "", 2, host_dir.path())?;
    let repo = Repo::new(&format!(
        r#"
pipeline: placement
stages:
  plain-1: {{ commands: ["echo on a host"] }}
  plain-2: {{ commands: ["echo on a host"] }}
  plain-3: {{ commands: ["echo on a host"] }}
  plain-4: {{ commands: ["echo on a host"] }}
  gpu:
    image: {TEST_IMAGE}
    retries: 0
    resources: {{ gpus: 1 }}
    commands: ["echo never"]
  nowhere:
    image: {TEST_IMAGE}
    resources: {{ gpus: 2 }}
    commands: ["echo never"]
"#
    ))?;
    let run = farm.run(&repo).await?;
    let mut client = farm.coordinator.client().await?;

    let settled = eventually(LIMIT, "every placeable stage ended", || async {
        let mut client = farm.coordinator.client().await?;
        let snapshot = get_run(&mut client, run).await?;
        let placeable = ["plain-1", "plain-2", "plain-3", "plain-4", "gpu"];
        Ok(placeable
            .iter()
            .all(|name| {
                matches!(
                    state(stage(&snapshot, name)),
                    pb::StageState::Succeeded | pb::StageState::Failed
                )
            })
            .then_some(snapshot))
    })
    .await?;
    for name in ["plain-1", "plain-2", "plain-3", "plain-4"] {
        let plain = stage(&settled, name);
        assert_eq!(state(plain), pb::StageState::Succeeded, "{plain:?}");
        assert_eq!(
            plain.agent, host_name,
            "a stage without an image runs only as a host process: {plain:?}"
        );
    }
    let gpu = stage(&settled, "gpu");
    assert_eq!(
        gpu.agent, farm.agent_name,
        "only the docker agent declares a gpu"
    );
    assert_eq!(state(gpu), pb::StageState::Failed, "{gpu:?}");
    assert!(
        gpu.message.contains("could not select device driver")
            && gpu.message.contains("NVIDIA Container Toolkit"),
        "the engine's own words and what to do: {}",
        gpu.message
    );
    println!("the gpu stage ended with: {}", gpu.message);

    let nowhere = stage(&settled, "nowhere");
    assert_eq!(state(nowhere), pb::StageState::Ready, "{nowhere:?}");
    assert!(
        nowhere.message.contains("waiting for an agent")
            && nowhere.message.contains("it needs 2 gpus")
            && nowhere
                .message
                .contains(&format!("`{}` has gpus [0]", farm.agent_name)),
        "{}",
        nowhere.message
    );

    client
        .cancel_run(pb::CancelRunRequest { run_id: run })
        .await?;
    let containers = farm.containers().await?;
    assert!(containers.is_empty(), "left behind: {containers:?}");
    Ok(())
}
