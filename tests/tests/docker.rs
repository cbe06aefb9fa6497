//! The docker executor against the real engine: a real coordinator and a
//! real `kiln-agent --executor docker` running stages in the tiny test image.
//!
//! Each test checks at its end that its agent left no container behind
//! (containers labelled `kiln.agent=<its agent>`). Without a usable engine a
//! test fails saying what to install (`tests/setup.sh` does it); only
//! `KILN_ALLOW_SKIP=1` makes that a printed skip.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_proto::v1 as pb;
use kiln_tests::docker::{DockerFarm, TEST_IMAGE};
use kiln_tests::{Repo, eventually, get_run, logs, stage, start_agent, wait_run};

const RUN_LIMIT: Duration = Duration::from_secs(120);

fn state(stage: &pb::Stage) -> pb::StageState {
    pb::StageState::try_from(stage.state).unwrap()
}

/// The log texts of a stage, in sequence order.
async fn log_texts(farm: &DockerFarm, run: u64, stage: &str) -> Result<Vec<String>> {
    let mut client = farm.coordinator.client().await?;
    Ok(logs(&mut client, run, stage)
        .await?
        .into_iter()
        .filter_map(|entry| entry.line.map(|line| line.text))
        .collect())
}

/// Waits until a line of `stage`'s log satisfies `wanted`.
async fn log_line(farm: &DockerFarm, run: u64, stage: &str, wanted: &str) -> Result<()> {
    eventually(
        RUN_LIMIT,
        &format!("`{wanted}` in the log of {stage}"),
        || async {
            let texts = log_texts(farm, run, stage).await?;
            Ok(texts.iter().any(|text| text.contains(wanted)).then_some(()))
        },
    )
    .await
}

/// The one attempt directory of the running stage, once `file` exists in it.
async fn workspace_with(farm: &DockerFarm, file: &str) -> Result<PathBuf> {
    eventually(RUN_LIMIT, &format!("{file} in a workspace"), || async {
        Ok(farm
            .workspaces()?
            .into_iter()
            .find(|dir| dir.join(file).exists()))
    })
    .await
}

macro_rules! farm_or_skip {
    ($test:expr) => {
        match DockerFarm::start($test).await? {
            Some(farm) => farm,
            None => return Ok(()),
        }
    };
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_env_workspace_and_digest() -> Result<()> {
    let farm = farm_or_skip!("exit-codes");
    let repo = Repo::new(&format!(
        r#"
pipeline: basics
defaults:
  image: {TEST_IMAGE}
stages:
  ok:
    env: {{ GREETING: hello }}
    commands:
      - pwd
      - cat data.txt
      - echo "$GREETING $KILN_STAGE $KILN_RUN_ID $KILN_ATTEMPT $CI"
      - echo from-container > partial.txt && mv partial.txt written.txt
      - while [ ! -f from-host.txt ]; do sleep 0.1; done
      - cat from-host.txt
  failing:
    commands: ["echo about to fail", "exit 3", "echo never"]
"#
    ))?;
    repo.commit("data.txt", "data from the repository\n")?;
    let id = farm.run(&repo).await?;

    // A file the container writes shows up on the host, and one the host
    // writes shows up in the container: it is one directory.
    let workspace = workspace_with(&farm, "written.txt").await?;
    let written = workspace.join("written.txt");
    assert_eq!(std::fs::read_to_string(&written)?, "from-container\n");
    let owner = std::fs::metadata(&written)?.uid();
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        owner,
        unsafe { libc::geteuid() },
        "written as the agent's user"
    );
    std::fs::write(workspace.join("from-host.txt"), "from-host\n")?;

    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, RUN_LIMIT).await?;
    let ok = stage(&run, "ok");
    assert_eq!(state(ok), pb::StageState::Succeeded, "{ok:?}");
    assert!(
        ok.image_digest.starts_with("sha256:"),
        "the image digest is reported: {ok:?}"
    );
    let output: Vec<String> = logs(&mut client, id, "ok")
        .await?
        .into_iter()
        .filter_map(|entry| entry.line)
        .filter(|line| line.stream != pb::LogStream::System as i32)
        .map(|line| line.text)
        .collect();
    assert_eq!(
        output,
        [
            "/workspace",
            "data from the repository",
            &format!("hello ok {id} 1 true"),
            "from-host",
        ]
    );

    let failing = stage(&run, "failing");
    assert_eq!(state(failing), pb::StageState::Failed, "{failing:?}");
    assert_eq!(failing.exit_code, 3);
    assert_eq!(failing.attempt, 1, "a non-zero exit is not retried");
    assert_eq!(failing.message, "exited with code 3");
    assert!(
        !log_texts(&farm, id, "failing")
            .await?
            .contains(&"never".to_owned())
    );

    assert!(
        farm.workspaces()?.is_empty(),
        "the agent removed the workspaces"
    );
    farm.no_containers_left().await
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_stream_live_and_in_order() -> Result<()> {
    let farm = farm_or_skip!("log-order");
    let repo = Repo::new(&format!(
        r#"
pipeline: logs
defaults:
  image: {TEST_IMAGE}
stages:
  chatty:
    commands:
      - echo first
      - while [ ! -f go ]; do sleep 0.1; done
      - i=0; while [ $i -lt 500 ]; do echo "out $i"; echo "err $i" >&2; i=$((i+1)); done
      - echo last
"#
    ))?;
    let id = farm.run(&repo).await?;
    // `first` arrives while the stage still runs: output is streamed.
    log_line(&farm, id, "chatty", "first").await?;
    let mut client = farm.coordinator.client().await?;
    let running = get_run(&mut client, id).await?;
    assert_eq!(state(stage(&running, "chatty")), pb::StageState::Running);
    let workspace = workspace_with(&farm, ".git").await?;
    std::fs::write(workspace.join("go"), "")?;

    let run = wait_run(&mut client, id, RUN_LIMIT).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    let entries = logs(&mut client, id, "chatty").await?;
    let numbered = |prefix: &str, stream: pb::LogStream| -> Vec<String> {
        entries
            .iter()
            .filter_map(|entry| entry.line.as_ref())
            .filter(|line| line.stream == stream as i32 && line.text.starts_with(prefix))
            .map(|line| line.text.clone())
            .collect()
    };
    let expected =
        |prefix: &str| -> Vec<String> { (0..500).map(|i| format!("{prefix} {i}")).collect() };
    // stdout and stderr are separate pipes, so only each one's own order is
    // defined; each is complete and in order, tagged with its stream.
    assert_eq!(numbered("out", pb::LogStream::Stdout), expected("out"));
    assert_eq!(numbered("err", pb::LogStream::Stderr), expected("err"));
    let texts: Vec<&str> = entries
        .iter()
        .filter_map(|entry| Some(entry.line.as_ref()?.text.as_str()))
        .collect();
    let at = |wanted: &str| texts.iter().position(|t| *t == wanted).unwrap();
    assert!(at("first") < at("out 0") && at("first") < at("err 0"));
    assert!(at("out 499") < at("last"), "stdout keeps its order");
    farm.no_containers_left().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_stops_the_container_with_sigkill_after_the_grace() -> Result<()> {
    let farm = farm_or_skip!("timeout");
    // The shell ignores SIGTERM, so only the SIGKILL after the grace ends it.
    let repo = Repo::new(&format!(
        r#"
pipeline: slow
defaults:
  image: {TEST_IMAGE}
stages:
  hang:
    timeout: 2s
    commands: ["trap '' TERM", "echo started", "sleep 1000"]
"#
    ))?;
    let id = farm.run(&repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, RUN_LIMIT).await?;
    let hang = stage(&run, "hang");
    assert_eq!(state(hang), pb::StageState::TimedOut, "{hang:?}");
    assert_eq!(hang.message, "timed out after 2s");
    let took = hang.finished_ms - hang.started_ms;
    assert!(
        took < 20_000,
        "stopped after timeout + grace, took {took} ms"
    );
    let texts = log_texts(&farm, id, "hang").await?;
    for wanted in [
        "started",
        "timed out after 2s; stopping the container",
        "docker sent SIGKILL",
    ] {
        assert!(
            texts.iter().any(|t| t.contains(wanted)),
            "{wanted}: {texts:?}"
        );
    }
    farm.no_containers_left().await
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_and_removes_the_container() -> Result<()> {
    let farm = farm_or_skip!("cancel");
    let repo = Repo::new(&format!(
        r#"
pipeline: long
defaults:
  image: {TEST_IMAGE}
stages:
  hang: {{ commands: ["echo started", "sleep 1000"] }}
"#
    ))?;
    let id = farm.run(&repo).await?;
    log_line(&farm, id, "hang", "started").await?;
    assert_eq!(
        farm.containers().await?.len(),
        1,
        "the stage runs in a container"
    );
    let mut client = farm.coordinator.client().await?;
    let cancelled_at = std::time::Instant::now();
    let cancelled = client
        .cancel_run(pb::CancelRunRequest { run_id: id })
        .await?
        .into_inner();
    assert_eq!(cancelled.state, pb::RunState::Cancelled as i32);
    farm.no_containers_left().await?;
    // SIGTERM reaches the shell through docker's init, so the 5 s grace
    // before SIGKILL is not waited out.
    let took = cancelled_at.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "the container took {took:?} to go"
    );
    let run = get_run(&mut client, id).await?;
    assert_eq!(state(stage(&run, "hang")), pb::StageState::Cancelled);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn hitting_the_memory_limit_is_reported_as_out_of_memory() -> Result<()> {
    let farm = farm_or_skip!("oom");
    // dd allocates its 64 MiB block at once; the limit is 16 MiB.
    let repo = Repo::new(&format!(
        r#"
pipeline: hungry
defaults:
  image: {TEST_IMAGE}
stages:
  hog:
    resources: {{ memory: 16Mi }}
    commands: ["echo allocating", "dd if=/dev/zero of=/dev/null bs=64M count=1", "echo survived"]
  modest:
    resources: {{ memory: 16Mi }}
    commands: ["dd if=/dev/zero of=/dev/null bs=1M count=4"]
"#
    ))?;
    let id = farm.run(&repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, RUN_LIMIT).await?;
    let hog = stage(&run, "hog");
    assert_eq!(state(hog), pb::StageState::Failed, "{hog:?}");
    assert_eq!(hog.exit_code, 137);
    assert!(
        hog.message.starts_with("ran out of memory") && hog.message.contains("16Mi"),
        "{hog:?}"
    );
    assert_eq!(hog.attempt, 1, "running out of memory is not retried");
    let texts = log_texts(&farm, id, "hog").await?;
    assert!(
        texts.iter().any(|t| t.starts_with("ran out of memory")),
        "{texts:?}"
    );
    assert!(!texts.contains(&"survived".to_owned()), "{texts:?}");
    let modest = stage(&run, "modest");
    assert_eq!(state(modest), pb::StageState::Succeeded, "{modest:?}");
    farm.no_containers_left().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_image_fails_with_one_line_saying_how_to_provide_it() -> Result<()> {
    let farm = farm_or_skip!("missing-image");
    let repo = Repo::new(
        r#"
pipeline: imageless
stages:
  pulled:
    image: kiln/no-such-image:1
    commands: ["true"]
  local-only:
    image: kiln/no-such-image:2
    pull: never
    commands: ["true"]
  no-image:
    # Without `executor: docker` the coordinator would keep it for a
    # process agent (see tests/placement.rs); here it insists on docker.
    executor: docker
    retries: 0
    commands: ["true"]
"#,
    )?;
    let id = farm.run(&repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, RUN_LIMIT).await?;

    let pulled = stage(&run, "pulled");
    assert_eq!(state(pulled), pb::StageState::Failed, "{pulled:?}");
    assert_eq!(
        pulled.attempt, 1,
        "a missing image is the pipeline's to fix, not retried"
    );
    for wanted in [
        "image kiln/no-such-image:1 is not on",
        "pulling it failed",
        "docker load -i",
    ] {
        assert!(
            pulled.message.contains(wanted),
            "{wanted}: {}",
            pulled.message
        );
    }
    let texts = log_texts(&farm, id, "pulled").await?;
    let last = texts.last().context("no log")?;
    assert_eq!(last, &pulled.message, "the log ends with the same one line");
    assert!(!last.contains('\n'));

    let local_only = stage(&run, "local-only");
    assert_eq!(state(local_only), pb::StageState::Failed);
    assert!(
        local_only
            .message
            .contains("`pull: never` forbids pulling it")
            && local_only.message.contains("deploy/images/"),
        "{}",
        local_only.message
    );
    let texts = log_texts(&farm, id, "local-only").await?;
    assert!(!texts.iter().any(|t| t.starts_with("pulling")), "{texts:?}");

    let no_image = stage(&run, "no-image");
    assert_eq!(state(no_image), pb::StageState::Failed);
    assert!(
        no_image.message.contains("the stage names no image")
            && no_image.message.contains("infrastructure error"),
        "{}",
        no_image.message
    );
    farm.no_containers_left().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_removes_what_its_killed_predecessor_left() -> Result<()> {
    let mut farm = farm_or_skip!("orphans");
    // Attempt 1 hangs; attempt 2, after the agent's restart, finishes.
    let repo = Repo::new(&format!(
        r#"
pipeline: crash
defaults:
  image: {TEST_IMAGE}
stages:
  hang:
    retries: 1
    commands:
      - echo "attempt $KILN_ATTEMPT"
      - if [ "$KILN_ATTEMPT" = 1 ]; then sleep 1000; fi
"#
    ))?;
    let id = farm.run(&repo).await?;
    log_line(&farm, id, "hang", "attempt 1").await?;
    let before = farm.containers().await?;
    assert_eq!(before.len(), 1, "{before:?}");

    farm.agent.kill9();
    // Nobody stops a SIGKILLed agent's container...
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(farm.containers().await?, before, "the orphan still runs");
    // ...until an agent of the same name starts.
    farm.restart_agent()?;
    eventually(RUN_LIMIT, "the orphan to be removed", || async {
        let left = farm.containers().await?;
        Ok((!left.iter().any(|name| before.contains(name))).then_some(()))
    })
    .await?;

    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, RUN_LIMIT).await?;
    let hang = stage(&run, "hang");
    assert_eq!(state(hang), pb::StageState::Succeeded, "{hang:?}");
    assert_eq!(hang.attempt, 2);
    farm.no_containers_left().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_executor_key_places_stages_on_matching_agents() -> Result<()> {
    let farm = farm_or_skip!("placement");
    let process_work = tempfile::tempdir()?;
    let process_agent = format!("placement-process-{}", std::process::id());
    let _process = start_agent(
        &farm.coordinator.url(),
        &process_agent,
        "",
        1,
        process_work.path(),
    )?;
    let repo = Repo::new(&format!(
        r#"
pipeline: placement
defaults:
  image: {TEST_IMAGE}
stages:
  boxed: {{ executor: docker, commands: ["test \"$(pwd)\" = /workspace"] }}
  host: {{ executor: process, commands: ["test \"$(pwd)\" != /workspace"] }}
"#
    ))?;
    let id = farm.run(&repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, RUN_LIMIT).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    assert_eq!(stage(&run, "boxed").agent, farm.agent_name);
    assert_eq!(stage(&run, "host").agent, process_agent);
    assert!(stage(&run, "host").image_digest.is_empty());
    farm.no_containers_left().await
}

#[tokio::test(flavor = "multi_thread")]
async fn only_allowed_host_paths_are_mounted_and_the_network_is_off_by_default() -> Result<()> {
    let shared = tempfile::tempdir()?;
    std::fs::write(shared.path().join("dataset.csv"), "a,b\n")?;
    let mount = shared.path().display().to_string();
    let Some(farm) = DockerFarm::start_with("mounts", &["--allow-mount", &mount]).await? else {
        return Ok(());
    };
    let repo = Repo::new(&format!(
        r#"
pipeline: isolation
defaults:
  image: {TEST_IMAGE}
stages:
  isolated:
    commands:
      - cat {mount}/dataset.csv
      - if touch {mount}/new 2>/dev/null; then echo writable; else echo read-only; fi
      - test -e /var/run/docker.sock || echo no docker socket
      - ls /sys/class/net
  bridged:
    network: bridge
    commands: ["ls /sys/class/net"]
"#
    ))?;
    let id = farm.run(&repo).await?;
    let mut client = farm.coordinator.client().await?;
    let run = wait_run(&mut client, id, RUN_LIMIT).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    let output = |entries: Vec<pb::LogEntry>| -> Vec<String> {
        entries
            .into_iter()
            .filter_map(|entry| entry.line)
            .filter(|line| line.stream != pb::LogStream::System as i32)
            .map(|line| line.text)
            .collect()
    };
    assert_eq!(
        output(logs(&mut client, id, "isolated").await?),
        ["a,b", "read-only", "no docker socket", "lo"]
    );
    let bridged = output(logs(&mut client, id, "bridged").await?);
    assert!(bridged.contains(&"eth0".to_owned()), "{bridged:?}");
    // Before any output of the stage, the executor's first system line
    // (after the checkout's) says what the stage runs in, so a stage that
    // cannot resolve a host shows at once that it has no network.
    let first_system = |entries: Vec<pb::LogEntry>| -> String {
        let before_output: Vec<String> = entries
            .into_iter()
            .filter_map(|entry| entry.line)
            .take_while(|line| line.stream == pb::LogStream::System as i32)
            .map(|line| line.text)
            .collect();
        before_output
            .iter()
            .find(|text| text.starts_with("docker: "))
            .cloned()
            .unwrap_or_else(|| format!("no docker line before the output: {before_output:?}"))
    };
    let isolated = first_system(logs(&mut client, id, "isolated").await?);
    assert!(
        isolated.starts_with(&format!("docker: image {TEST_IMAGE} (sha256:"))
            && isolated.contains("network: none (the default")
            && isolated.contains("set `network: bridge`")
            && isolated.contains("limits: memory 2 GiB"),
        "{isolated}"
    );
    let bridged = first_system(logs(&mut client, id, "bridged").await?);
    assert!(bridged.contains("; network: bridge; limits:"), "{bridged}");
    assert!(!shared.path().join("new").exists());
    farm.no_containers_left().await
}
