//! Operating a farm: retrying a failed stage, draining an agent, and an
//! agent that is asked to stop mid-stage.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use kiln_proto::v1 as pb;
use kiln_tests::{
    Coordinator, CoordinatorOptions, Farm, Repo, binary, eventually, get_run, stage, start_agent,
    wait_run,
};

fn state(stage: &pb::Stage) -> pb::StageState {
    pb::StageState::try_from(stage.state).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn retrying_a_failed_stage_reruns_it_and_its_skipped_dependents() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let work = tempfile::tempdir()?;
    let _agent = start_agent(&coordinator.url(), "solo", "", 1, work.path())?;
    // Fails the first time only: a flaky test, say.
    let marker = tempfile::tempdir()?;
    let flag = marker.path().join("ran-once");
    let yaml = format!(
        "pipeline: flaky\nstages:\n  test:\n    commands: [\"test -f {flag} || {{ touch {flag}; exit 1; }}\"]\n  ship:\n    needs: [test]\n    commands: [\"echo shipped\"]\n",
        flag = flag.display()
    );
    let repo = Repo::new(&yaml)?;
    let dir = repo.path().to_str().unwrap();
    assert_eq!(
        coordinator
            .kiln(&["pipeline", "register", dir])
            .status
            .code(),
        Some(0)
    );
    let run = coordinator.kiln(&["run", "flaky", "--wait"]);
    assert_eq!(run.status.code(), Some(1));
    let mut client = coordinator.client().await?;
    let first = get_run(&mut client, 1).await?;
    assert_eq!(state(stage(&first, "ship")), pb::StageState::Skipped);

    let retried = coordinator.kiln(&["retry", "1", "test"]);
    assert_eq!(
        retried.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&retried.stderr)
    );
    let run = wait_run(&mut client, 1, Duration::from_secs(30)).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    assert_eq!(stage(&run, "test").attempt, 2);
    assert_eq!(state(stage(&run, "ship")), pb::StageState::Succeeded);

    let again = coordinator.kiln(&["retry", "1", "test"]);
    assert_eq!(
        again.status.code(),
        Some(2),
        "a succeeded stage cannot be retried"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drained_agent_gets_no_new_work() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let (w1, w2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let _busy = start_agent(&coordinator.url(), "busy", "", 4, w1.path())?;
    let _spare = start_agent(&coordinator.url(), "spare", "", 1, w2.path())?;
    let mut client = coordinator.client().await?;
    eventually(Duration::from_secs(20), "both agents to connect", || {
        let mut client = client.clone();
        async move {
            let agents = client
                .list_agents(pb::ListAgentsRequest {})
                .await?
                .into_inner()
                .agents;
            Ok((agents.iter().filter(|a| a.connected).count() == 2).then_some(()))
        }
    })
    .await?;
    assert_eq!(
        coordinator.kiln(&["agent", "drain", "busy"]).status.code(),
        Some(0)
    );
    let repo = Repo::new(
        "pipeline: spread\nstages:\n  a: { commands: [\"true\"] }\n  b: { commands: [\"true\"] }\n  c: { commands: [\"true\"] }\n",
    )?;
    assert_eq!(
        coordinator
            .kiln(&["pipeline", "register", repo.path().to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        coordinator.kiln(&["run", "spread", "--wait"]).status.code(),
        Some(0)
    );
    let run = get_run(&mut client, 1).await?;
    assert!(run.stages.iter().all(|s| s.agent == "spare"), "{run:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_hands_a_running_stage_back_without_charging_a_retry() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let (w1, w2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut leaving = kiln_tests::Process {
        child: Command::new(binary("kiln-agent"))
            .args([
                "--coordinator",
                &coordinator.url(),
                "--name",
                "leaving",
                "--capacity",
                "1",
            ])
            .args([
                "--drain-timeout",
                "1s",
                "--work-dir",
                w1.path().to_str().unwrap(),
            ])
            .env("KILN_AGENT_TOKEN", &coordinator.agent_token)
            .env("RUST_LOG", "warn")
            .spawn()?,
        name: "leaving".into(),
    };
    // retries: 0, so only a free hand-back lets the stage run again.
    let repo = Repo::new(
        "pipeline: long\nstages:\n  work:\n    retries: 0\n    commands: [\"sleep 3\", \"echo finished on $KILN_ATTEMPT\"]\n",
    )?;
    assert_eq!(
        coordinator
            .kiln(&["pipeline", "register", repo.path().to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(coordinator.kiln(&["run", "long"]).status.code(), Some(0));
    let mut client = coordinator.client().await?;
    eventually(
        Duration::from_secs(20),
        "the stage to run on `leaving`",
        || {
            let mut client = client.clone();
            async move {
                Ok((state(stage(&get_run(&mut client, 1).await?, "work"))
                    == pb::StageState::Running)
                    .then_some(()))
            }
        },
    )
    .await?;
    let status = leaving.terminate(Duration::from_secs(15))?;
    assert!(status.success(), "the agent exits cleanly: {status}");
    let _staying = start_agent(&coordinator.url(), "staying", "", 1, w2.path())?;
    let run = wait_run(&mut client, 1, Duration::from_secs(30)).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    let work = stage(&run, "work");
    assert_eq!((work.agent.as_str(), work.attempt), ("staying", 2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_coordinator_stops_promptly_with_agents_connected_after_audited_calls() -> Result<()> {
    let mut farm = Farm::start(
        &CoordinatorOptions::default(),
        &[("stays", "role=build", 1)],
    )?;
    let coordinator = &mut farm.coordinator;
    let mut client = coordinator.client().await?;
    eventually(Duration::from_secs(10), "the agent to connect", || {
        let mut client = client.clone();
        async move {
            let agents = client
                .list_agents(pb::ListAgentsRequest {})
                .await?
                .into_inner();
            Ok(agents.agents.iter().any(|a| a.connected).then_some(()))
        }
    })
    .await?;
    // An audited call: its record goes through the commit thread, which
    // must still end on shutdown although the agent's stream is open.
    client
        .create_token(pb::CreateTokenRequest {
            name: "reader".into(),
            role: pb::Role::Viewer as i32,
            pipeline: String::new(),
        })
        .await?;
    let status = coordinator.process.terminate(Duration::from_secs(15))?;
    assert!(status.success(), "{status:?}");
    Ok(())
}
