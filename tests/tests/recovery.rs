//! Crashes: an agent killed mid-stage, a coordinator killed mid-run.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Result;
use kiln_proto::v1 as pb;
use kiln_tests::{
    Coordinator, CoordinatorOptions, Repo, eventually, get_run, logs, register_and_run, stage,
    start_agent, wait_run,
};
use pb::agent_message::Msg;
use pb::coordinator_message::Msg as Out;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agents_stage_reruns_elsewhere_and_its_late_completion_is_rejected() -> Result<()>
{
    let data = tempfile::tempdir()?;
    let options = CoordinatorOptions {
        lease_ttl: "2s",
        heartbeat: "200ms",
        ..Default::default()
    };
    let coordinator = Coordinator::start(data.path(), &options)?;
    let (work1, work2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut first = start_agent(&coordinator.url(), "first", "", 1, work1.path())?;
    let repo = Repo::new(
        "pipeline: crash\nstages:\n  work:\n    retries: 1\n    commands: [\"echo working on $KILN_ATTEMPT\", \"sleep 3\", \"echo done\"]\n",
    )?;
    let id = register_and_run(&coordinator, &repo).await?;
    let mut client = coordinator.client().await?;
    let held = eventually(
        Duration::from_secs(30),
        "the stage to run on `first`",
        || {
            let mut client = client.clone();
            async move {
                let run = get_run(&mut client, id).await?;
                let work = stage(&run, "work").clone();
                Ok((work.state == pb::StageState::Running as i32).then_some(work))
            }
        },
    )
    .await?;
    assert_eq!((held.agent.as_str(), held.attempt), ("first", 1));
    first.kill9();
    let _second = start_agent(&coordinator.url(), "second", "", 1, work2.path())?;

    let run = wait_run(&mut client, id, Duration::from_secs(60)).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    let work = stage(&run, "work");
    assert_eq!((work.agent.as_str(), work.attempt), ("second", 2));

    // `first` comes back (a fake with its name) still claiming attempt 1.
    let stale = pb::StageRef {
        run_id: id,
        stage_idx: 0,
        attempt: 1,
    };
    let channel = kiln_tests::channel(&coordinator.url(), &coordinator.agent_token).await?;
    let mut agent = pb::agent_service_client::AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::unbounded_channel();
    let hello = pb::Hello {
        name: "first".into(),
        capacity: 1,
        held: vec![stale],
        ..Default::default()
    };
    tx.send(pb::AgentMessage {
        msg: Some(Msg::Hello(hello)),
    })?;
    let mut inbound = agent
        .connect(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    let Some(pb::CoordinatorMessage {
        msg: Some(Out::Welcome(welcome)),
    }) = inbound.message().await?
    else {
        panic!("expected a welcome");
    };
    assert_eq!(welcome.drop, [stale], "told to drop the stale attempt");
    let finished = pb::StageFinished {
        stage: Some(stale),
        outcome: pb::Outcome::Succeeded as i32,
        ..Default::default()
    };
    tx.send(pb::AgentMessage {
        msg: Some(Msg::Finished(finished)),
    })?;
    let Some(pb::CoordinatorMessage {
        msg: Some(Out::Ack(ack)),
    }) = inbound.message().await?
    else {
        panic!("expected an ack");
    };
    assert!(ack.rejected && !ack.finished, "{ack:?}");
    assert!(ack.reason.contains("stale attempt 1"), "{}", ack.reason);
    let run = get_run(&mut client, id).await?;
    assert_eq!(
        stage(&run, "work").attempt,
        2,
        "the late completion changed nothing"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_coordinator_restarts_without_losing_or_doubling_log_lines() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let port = coordinator.grpc.clone();
    let work = tempfile::tempdir()?;
    let _agent = start_agent(&coordinator.url(), "steady", "", 2, work.path())?;
    let repo = Repo::new(
        "pipeline: chatty\nstages:\n  count:\n    commands: [\"for i in $(seq 1 60); do echo line-$i; sleep 0.05; done\"]\n  after:\n    needs: [count]\n    commands: [\"echo after\"]\n",
    )?;
    let id = register_and_run(&coordinator, &repo).await?;
    let client = coordinator.client().await?;
    eventually(Duration::from_secs(30), "some lines to be stored", || {
        let mut client = client.clone();
        async move { Ok((logs(&mut client, id, "count").await?.len() >= 10).then_some(())) }
    })
    .await?;
    let mut coordinator = coordinator;
    coordinator.process.kill9();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let options = CoordinatorOptions {
        grpc: port,
        ..Default::default()
    };
    let coordinator = Coordinator::start(data.path(), &options)?;
    let mut client = coordinator.client().await?;
    let run = wait_run(&mut client, id, Duration::from_secs(60)).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    let count = stage(&run, "count");
    assert_eq!(
        count.attempt, 1,
        "the agent kept its stage through the restart"
    );
    let lines: Vec<String> = logs(&mut client, id, "count")
        .await?
        .into_iter()
        .map(|entry| entry.line.unwrap().text)
        .filter(|text| text.starts_with("line-"))
        .collect();
    let expected: Vec<String> = (1..=60).map(|i| format!("line-{i}")).collect();
    assert_eq!(lines, expected, "every line exactly once, in order");
    let seqs: BTreeSet<u64> = logs(&mut client, id, "count")
        .await?
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        seqs.len() as u64,
        *seqs.iter().max().unwrap() + 1,
        "no gaps in sequence numbers"
    );
    Ok(())
}
