//! The backup the README documents ("Deploying", "Backups"): stop the
//! coordinator, archive its data directory with tar, unpack the archive
//! into an empty directory elsewhere and start a coordinator there. The
//! restored coordinator has the runs, their logs and artifacts, the tokens
//! and the secrets, and carries on: a new run of the same pipeline
//! succeeds and reads the old run's secret.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kiln_proto::v1 as pb;
use kiln_tests::{
    Coordinator, CoordinatorOptions, Repo, get_run, kiln_as, logs, register_and_run, start_agent,
    wait_run,
};

const PIPELINE: &str = r#"pipeline: backed-up
stages:
  make:
    secrets: [GREETING]
    commands:
      - mkdir -p out && echo "made with ${#GREETING}-character greeting" > out/file
      - cat out/file
    artifacts: [out]
"#;

fn tar(args: &[&str]) -> Result<()> {
    let output = Command::new("tar").args(args).output()?;
    ensure!(
        output.status.success(),
        "tar {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_coordinators_data_dir_restores_elsewhere_and_carries_on() -> Result<()> {
    let options = CoordinatorOptions::default();
    let original = tempfile::tempdir()?;
    let data = original.path().join("kiln");
    let repo = Repo::new(PIPELINE)?;
    let work = tempfile::tempdir()?;

    // Before: one finished run with a secret, a log and an artifact.
    let mut coordinator = Coordinator::start(&data, &options)?;
    let url = coordinator.url();
    let set = kiln_as(
        &url,
        Some(&coordinator.admin_token),
        b"hello-there",
        &["secret", "set", "GREETING"],
    )?;
    ensure!(set.status.success(), "{set:?}");
    let agent = start_agent(&url, "a1", "", 1, work.path())?;
    let first = register_and_run(&coordinator, &repo).await?;
    let mut client = coordinator.client().await?;
    let done = wait_run(&mut client, first, Duration::from_secs(60)).await?;
    ensure!(done.state == pb::RunState::Succeeded as i32, "{done:?}");
    let admin_token = coordinator.admin_token.clone();
    drop(agent);

    // The documented backup: stop, archive, (start again).
    let status = coordinator.process.terminate(Duration::from_secs(30))?;
    ensure!(status.success(), "the coordinator stopped with {status}");
    let archive = original.path().join("kiln-backup.tar");
    tar(&[
        "-C",
        &original.path().display().to_string(),
        "-cf",
        &archive.display().to_string(),
        "kiln",
    ])?;

    // Restore into an empty directory on "another machine" and start there.
    let elsewhere = tempfile::tempdir()?;
    tar(&[
        "-C",
        &elsewhere.path().display().to_string(),
        "-xf",
        &archive.display().to_string(),
    ])?;
    drop(original);
    coordinator = Coordinator::start(&elsewhere.path().join("kiln"), &options)?;
    ensure!(
        coordinator.admin_token == admin_token,
        "the restored coordinator has another admin token"
    );
    let url = coordinator.url();
    let mut client = coordinator.client().await?;
    let restored = get_run(&mut client, first).await?;
    ensure!(
        restored.state == pb::RunState::Succeeded as i32,
        "{restored:?}"
    );
    let lines = logs(&mut client, first, "make").await?;
    ensure!(
        lines.iter().any(|entry| {
            entry
                .line
                .as_ref()
                .is_some_and(|line| line.text.contains("made with 11-character greeting"))
        }),
        "the old run's log is gone: {lines:?}"
    );
    let artifacts = kiln_tests::kiln(&url, &["artifacts", "ls", &first.to_string()]);
    ensure!(
        artifacts.status.success() && String::from_utf8_lossy(&artifacts.stdout).contains("out"),
        "{artifacts:?}"
    );

    // It carries on: a new run, whose stage opens the restored secret.
    let work = tempfile::tempdir()?;
    let _agent = start_agent(&url, "a2", "", 1, work.path())?;
    let pipeline = client
        .trigger_run(pb::TriggerRunRequest {
            pipeline: "backed-up".into(),
            triggered_by: "test".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(pipeline.id > first, "run ids restart after a restore");
    let second = wait_run(&mut client, pipeline.id, Duration::from_secs(60))
        .await
        .context("the restored coordinator did not finish a new run")?;
    ensure!(second.state == pb::RunState::Succeeded as i32, "{second:?}");
    let lines = logs(&mut client, second.id, "make").await?;
    ensure!(
        lines.iter().any(|entry| {
            entry
                .line
                .as_ref()
                .is_some_and(|line| line.text.contains("made with 11-character greeting"))
        }),
        "the new run did not get the restored secret: {lines:?}"
    );
    Ok(())
}
