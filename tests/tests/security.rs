//! Secrets, the audit log and the limits, end to end: the real CLI, a real
//! coordinator and a process agent.

use std::time::Duration;

use anyhow::{Context, Result};
use kiln_proto::v1 as pb;
use kiln_tests::{
    Coordinator, CoordinatorOptions, Farm, Repo, eventually, get_run, kiln, kiln_as, logs,
    register_and_run, stage, wait_run,
};
use pb::agent_service_client::AgentServiceClient;
use pb::control_service_client::ControlServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const VALUE: &str = "hunter2-s3cret-value";

/// Sets a secret the way an admin would: the value on stdin.
fn set_secret(url: &str, admin: &str, name: &str, value: &str) -> Result<std::process::Output> {
    kiln_as(
        url,
        Some(admin),
        format!("{value}\n").as_bytes(),
        &["secret", "set", name],
    )
}

/// The stage checks it got the value (through its rot13, so the value
/// itself is nowhere in kiln.yml), prints it whole, in two writes 300 ms
/// apart (two reads of the pipe), on stderr, and then puts it in the path
/// of an artifact error, which becomes the stage's failure message.
fn leaky_pipeline() -> String {
    let rot13: String = VALUE
        .chars()
        .map(|c| match c {
            'a'..='z' => (((c as u8 - b'a' + 13) % 26) + b'a') as char,
            other => other,
        })
        .collect();
    format!(
        r#"
pipeline: leaky
stages:
  leak:
    secrets: [API_KEY]
    artifacts: [out]
    commands:
      - test "$(printf '%s' "$API_KEY" | tr a-z n-za-m)" = {rot13} && echo match
      - echo "whole $API_KEY"
      - printf '%s' "${{API_KEY%????????????}}"; sleep 0.3; printf '%s\n' "${{API_KEY#????????}}"
      - printf '%s' "${{API_KEY%??????????}}"; sleep 0.3; printf '%s\n' "${{API_KEY#??????????}}"
      - echo "on stderr $API_KEY" >&2
      - mkdir out && ln -s "/tmp/$API_KEY" out/link
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_reaches_its_stage_and_nothing_else() -> Result<()> {
    let farm = Farm::start(&CoordinatorOptions::default(), &[("a1", "", 1)])?;
    let coordinator = &farm.coordinator;
    let url = coordinator.url();
    let set = set_secret(&url, &coordinator.admin_token, "API_KEY", VALUE)?;
    assert!(set.status.success(), "{set:?}");
    let mut seen = format!("{set:?}");
    for format in ["table", "json"] {
        let list = kiln(&url, &["secret", "list", "--output", format]);
        let stdout = String::from_utf8_lossy(&list.stdout);
        assert!(
            list.status.success() && stdout.contains("API_KEY"),
            "{list:?}"
        );
        seen += &format!("{list:?}");
    }

    let repo = Repo::new(&leaky_pipeline())?;
    let id = register_and_run(coordinator, &repo).await?;
    let mut client = coordinator.client().await?;
    let run = wait_run(&mut client, id, Duration::from_secs(60)).await?;
    let leak = stage(&run, "leak");
    assert_eq!(leak.state, pb::StageState::Failed as i32, "{run:#?}");
    // The symlink's target, which names the value, is in the message: masked.
    assert!(
        leak.message.contains("symlink `out/link` -> `/tmp/***`"),
        "{}",
        leak.message
    );

    let entries = logs(&mut client, id, "leak").await?;
    let lines: Vec<pb::LogLine> = entries.iter().filter_map(|e| e.line.clone()).collect();
    let texts: Vec<&str> = lines.iter().map(|line| line.text.as_str()).collect();
    for wanted in ["match", "whole ***", "***", "on stderr ***"] {
        assert!(texts.contains(&wanted), "no line {wanted:?} in {texts:#?}");
    }
    assert_eq!(
        texts.iter().filter(|text| **text == "***").count(),
        2,
        "both split writes are masked whole: {texts:#?}"
    );
    let stderr_line = lines
        .iter()
        .find(|line| line.text == "on stderr ***")
        .context("stderr line")?;
    assert_eq!(stderr_line.stream, pb::LogStream::Stderr as i32);
    seen += &format!("{entries:?}");

    let printed = kiln(&url, &["logs", &id.to_string()]);
    let printed_text = String::from_utf8_lossy(&printed.stdout);
    assert!(printed_text.contains("whole ***"), "{printed:?}");
    seen += &format!("{printed:?}");
    for args in [
        vec![
            "status".to_owned(),
            id.to_string(),
            "--output".into(),
            "json".into(),
        ],
        vec!["runs".into(), "--output".into(), "json".into()],
        vec!["audit".into(), "--output".into(), "json".into()],
        vec!["pipeline".into(), "show".into(), "leaky".into()],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = kiln(&url, &args);
        assert!(output.status.success(), "{args:?}: {output:?}");
        seen += &format!("{output:?}");
    }
    seen += &format!("{:?}", get_run(&mut client, id).await?);
    seen += &format!(
        "{:?}",
        client
            .list_runs(pb::ListRunsRequest::default())
            .await?
            .into_inner()
    );
    // The two halves are searched for too: a value split across two lines
    // would pass a search for the whole.
    for needle in [VALUE, "hunter2", "s3cret"] {
        assert!(!seen.contains(needle), "`{needle}` leaked:\n{seen}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stage_whose_secret_is_not_set_fails_once_naming_it() -> Result<()> {
    let farm = Farm::start(&CoordinatorOptions::default(), &[("a1", "", 1)])?;
    let repo = Repo::new(
        r#"
pipeline: unset
stages:
  deploy:
    secrets: [NOT_SET_YET]
    retries: 3
    commands: ["echo never"]
"#,
    )?;
    let id = register_and_run(&farm.coordinator, &repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, Duration::from_secs(20)).await?;
    let deploy = stage(&run, "deploy");
    assert_eq!(run.state, pb::RunState::Failed as i32, "{run:#?}");
    assert!(
        deploy.message.contains("secret `NOT_SET_YET` is not set")
            && deploy.message.contains("kiln secret set NOT_SET_YET"),
        "{}",
        deploy.message
    );
    assert!(deploy.attempt <= 1, "retried: {deploy:?}");
    assert!(deploy.agent.is_empty(), "it reached an agent: {deploy:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_values_that_cannot_be_masked_or_are_missing_are_refused() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let (url, admin) = (coordinator.url(), coordinator.admin_token.as_str());

    let short = set_secret(&url, admin, "SHORT", "abc")?;
    let stderr = String::from_utf8_lossy(&short.stderr);
    assert!(
        !short.status.success() && stderr.contains("too short to be masked"),
        "{short:?}"
    );
    assert!(!stderr.contains("abc"), "the value is echoed: {stderr}");
    let empty = kiln_as(&url, Some(admin), b"", &["secret", "set", "EMPTY"])?;
    let stderr = String::from_utf8_lossy(&empty.stderr);
    assert!(
        !empty.status.success() && stderr.contains("pipe its value to stdin"),
        "{empty:?}"
    );
    let bad_name = set_secret(&url, admin, "lower-case", VALUE)?;
    assert!(!bad_name.status.success(), "{bad_name:?}");
    let list = kiln(&url, &["secret", "list", "--output", "json"]);
    assert_eq!(
        String::from_utf8_lossy(&list.stdout).trim(),
        "[]",
        "{list:?}"
    );
    // Operators may run stages with secrets but not set them.
    let operator = kiln_tests::create_token(&url, admin, "op", pb::Role::Operator).await?;
    let denied = set_secret(&url, &operator, "API_KEY", VALUE)?;
    assert!(!denied.status.success(), "{denied:?}");
    Ok(())
}

/// The audit entries as `kiln audit --output json` prints them.
fn audit(url: &str) -> Result<Vec<serde_json::Value>> {
    let output = kiln(url, &["audit", "--output", "json", "--limit", "100"]);
    anyhow::ensure!(output.status.success(), "kiln audit: {output:?}");
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn state_changes_and_refusals_are_audited_newest_first() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let url = coordinator.url();
    let before = audit(&url)?.len();

    let created = kiln(&url, &["token", "create", "auditor", "--role", "viewer"]);
    assert!(created.status.success(), "{created:?}");
    let viewer = String::from_utf8(created.stdout)?.trim().to_owned();
    let repo = Repo::new("pipeline: audited\nstages:\n  wait:\n    commands: [\"sleep 30\"]\n")?;
    let id = register_and_run(&coordinator, &repo).await?.to_string();
    let denied = kiln_as(&url, Some(&viewer), b"", &["cancel", &id])?;
    assert!(!denied.status.success(), "{denied:?}");
    let cancelled = kiln(&url, &["cancel", &id]);
    assert!(cancelled.status.success(), "{cancelled:?}");
    // Reads leave no trace.
    for args in [
        &["runs"][..],
        &["status", &id],
        &["token", "list"],
        &["secret", "list"],
    ] {
        assert!(kiln(&url, args).status.success(), "{args:?}");
    }
    assert!(
        kiln_as(&url, Some(&viewer), b"", &["runs"])?
            .status
            .success()
    );

    let entries = audit(&url)?;
    let fields = |entry: &serde_json::Value| {
        ["principal", "method", "target", "outcome"].map(|field| {
            entry[field]
                .as_str()
                .unwrap_or_else(|| panic!("{field} missing in {entry}"))
                .to_owned()
        })
    };
    let new: Vec<[String; 4]> = entries[..entries.len() - before]
        .iter()
        .map(fields)
        .collect();
    let control = |method: &str| format!("/kiln.v1.ControlService/{method}");
    let run = format!("run {id}");
    let expected = [
        ["admin", &control("CancelRun"), &run, "OK"],
        ["auditor", &control("CancelRun"), "", "PERMISSION_DENIED"],
        ["admin", &control("TriggerRun"), &run, "OK"],
        [
            "admin",
            &control("RegisterPipeline"),
            "pipeline audited v1",
            "OK",
        ],
        ["admin", &control("CreateToken"), "token auditor", "OK"],
    ]
    .map(|row| row.map(str::to_owned));
    assert_eq!(new, expected, "{entries:#?}");
    let times: Vec<u64> = entries.iter().filter_map(|e| e["at_ms"].as_u64()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    assert!(
        entries[0]["peer"]
            .as_str()
            .is_some_and(|peer| peer.starts_with("127.0.0.1:")),
        "{}",
        entries[0]
    );
    // A viewer may not read the log.
    let refused = kiln_as(&url, Some(&viewer), b"", &["audit"])?;
    assert!(!refused.status.success(), "{refused:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_file_over_one_mib_is_refused_with_its_size() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let padding = format!("#{}\n", "x".repeat(1 << 20));
    let spec_yaml = format!("pipeline: big\nstages:\n  a:\n    commands: [\"true\"]\n{padding}");
    let size = spec_yaml.len();
    let mut client = coordinator.client().await?;
    let refused = client
        .register_pipeline(pb::RegisterPipelineRequest {
            file_name: "kiln.yml".into(),
            spec_yaml: spec_yaml.clone(),
            repo: "/nowhere".into(),
            branch: "main".into(),
            subdir: String::new(),
            path: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains(&format!("has {size} bytes"))
            && refused.message().contains("limit is 1048576"),
        "{refused:?}"
    );
    // The CLI refuses it before sending it.
    let repo = Repo::new(&spec_yaml)?;
    let cli = kiln(
        &coordinator.url(),
        &[
            "pipeline",
            "register",
            repo.path().to_str().context("utf-8")?,
        ],
    );
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(
        !cli.status.success() && stderr.contains(&size.to_string()) && stderr.contains("1048576"),
        "{cli:?}"
    );
    let listed = client
        .list_pipelines(pb::ListPipelinesRequest {})
        .await?
        .into_inner();
    assert!(listed.pipelines.is_empty(), "{listed:?}");
    Ok(())
}

/// An `AgentService.Connect` stream that said hello as `name`; the agent is
/// gone when this is dropped.
struct RawAgent {
    _outbound: mpsc::Sender<pb::AgentMessage>,
    _inbound: tonic::Streaming<pb::CoordinatorMessage>,
}

async fn connect_raw(url: &str, token: &str, name: &str) -> Result<RawAgent, tonic::Status> {
    let channel = kiln_tests::channel(url, token)
        .await
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    let (outbound, rx) = mpsc::channel(4);
    let hello = pb::Hello {
        name: name.into(),
        capacity: 1,
        version: "test".into(),
        ..Default::default()
    };
    outbound
        .send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(hello)),
        })
        .await
        .map_err(|_| tonic::Status::internal("hello not queued"))?;
    let inbound = AgentServiceClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok(RawAgent {
        _outbound: outbound,
        _inbound: inbound,
    })
}

fn agents_options() -> CoordinatorOptions {
    CoordinatorOptions {
        extra_args: vec!["--max-agents-per-token".into(), "2".into()],
        ..CoordinatorOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_agent_token_brings_up_at_most_the_configured_agents() -> Result<()> {
    let farm = Farm::start(
        &agents_options(),
        &[("a1", "", 1), ("a2", "", 1), ("a3", "", 1)],
    )?;
    let url = farm.coordinator.url();
    let mut client = farm.coordinator.client().await?;
    let names = |agents: &pb::ListAgentsResponse| {
        let mut names: Vec<String> = agents.agents.iter().map(|a| a.name.clone()).collect();
        names.sort();
        names
    };
    let first_two = eventually(Duration::from_secs(20), "two agents", || {
        let mut client = client.clone();
        async move {
            let agents = client
                .list_agents(pb::ListAgentsRequest {})
                .await?
                .into_inner();
            Ok((agents.agents.len() >= 2).then_some(agents))
        }
    })
    .await?;
    // The third keeps retrying; give it time to be let in by mistake.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agents = client
        .list_agents(pb::ListAgentsRequest {})
        .await?
        .into_inner();
    assert_eq!(names(&agents), names(&first_two), "{agents:#?}");
    assert_eq!(agents.agents.len(), 2, "{agents:#?}");

    let refused = connect_raw(&url, &farm.coordinator.agent_token, "raw-third")
        .await
        .err()
        .context("a third agent was let in")?;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("limit"), "{refused:?}");
    // Another token has its own allowance.
    let other =
        kiln_tests::create_token(&url, &farm.coordinator.admin_token, "more", pb::Role::Agent)
            .await?;
    let _fourth = connect_raw(&url, &other, "raw-fourth").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnecting_under_the_same_name_does_not_free_a_place() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &agents_options())?;
    let (url, token) = (coordinator.url(), coordinator.agent_token.clone());
    let first = connect_raw(&url, &token, "same").await?;
    let _again = connect_raw(&url, &token, "same").await?;
    // The replaced stream ends; the name is still connected through the
    // second one.
    drop(first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _second = connect_raw(&url, &token, "other").await?;
    let refused = connect_raw(&url, &token, "third").await.err();
    assert_eq!(
        refused.as_ref().map(tonic::Status::code),
        Some(Code::ResourceExhausted),
        "a third agent was let in: {refused:?}"
    );
    let mut client = ControlServiceClient::new(coordinator.channel().await?);
    let agents = client
        .list_agents(pb::ListAgentsRequest {})
        .await?
        .into_inner();
    assert!(
        !agents.agents.iter().any(|agent| agent.name == "third"),
        "{agents:#?}"
    );
    Ok(())
}
