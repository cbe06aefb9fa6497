//! The backups the README documents ("Deploying", "Backups"). Online:
//! `kiln-coordinator backup` of a coordinator whose stage is writing its
//! log, restored with `kiln-coordinator restore` into a new directory,
//! where the acknowledged lines are all there and the unfinished run
//! carries on. Offline: stop the coordinator, archive its data directory with tar, unpack the archive
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

/// A coordinator at `data` with one finished run of [`PIPELINE`]: a secret
/// read by its stage, a log and an artifact. Returns the coordinator, its
/// agent (named `a1`, in `work`), the run and its repository (later runs
/// need it).
async fn one_finished_run(
    data: &std::path::Path,
    options: &CoordinatorOptions,
    work: &std::path::Path,
) -> Result<(Coordinator, kiln_tests::Process, u64, Repo)> {
    let coordinator = Coordinator::start(data, options)?;
    let url = coordinator.url();
    let set = kiln_as(
        &url,
        Some(&coordinator.admin_token),
        b"hello-there",
        &["secret", "set", "GREETING"],
    )?;
    ensure!(set.status.success(), "{set:?}");
    let agent = start_agent(&url, "a1", "", 2, work)?;
    let repo = Repo::new(PIPELINE)?;
    let first = register_and_run(&coordinator, &repo).await?;
    let mut client = coordinator.client().await?;
    let done = wait_run(&mut client, first, Duration::from_secs(60)).await?;
    ensure!(done.state == pb::RunState::Succeeded as i32, "{done:?}");
    Ok((coordinator, agent, first, repo))
}

/// Whether a log of [`PIPELINE`]'s stage shows it read the secret.
fn greeted(lines: &[pb::LogEntry]) -> bool {
    lines.iter().any(|entry| {
        entry
            .line
            .as_ref()
            .is_some_and(|line| line.text.contains("made with 11-character greeting"))
    })
}

/// A restored coordinator carries on: a new run after `first`, whose stage
/// opens the restored secret (an agent must be connected).
async fn a_new_run_reads_the_restored_secret(coordinator: &Coordinator, first: u64) -> Result<()> {
    let mut client = coordinator.client().await?;
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
        greeted(&lines),
        "the new run did not get the restored secret: {lines:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_coordinators_data_dir_restores_elsewhere_and_carries_on() -> Result<()> {
    let options = CoordinatorOptions::default();
    let original = tempfile::tempdir()?;
    let data = original.path().join("kiln");
    let work = tempfile::tempdir()?;
    // Before: one finished run with a secret, a log and an artifact.
    let (mut coordinator, agent, first, _repo) =
        one_finished_run(&data, &options, work.path()).await?;
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
    ensure!(greeted(&lines), "the old run's log is gone: {lines:?}");
    let artifacts = kiln_tests::kiln(&url, &["artifacts", "ls", &first.to_string()]);
    ensure!(
        artifacts.status.success() && String::from_utf8_lossy(&artifacts.stdout).contains("out"),
        "{artifacts:?}"
    );

    // It carries on: a new run, whose stage opens the restored secret.
    let work = tempfile::tempdir()?;
    let _agent = start_agent(&url, "a2", "", 1, work.path())?;
    a_new_run_reads_the_restored_secret(&coordinator, first).await
}

/// A stage that prints for a while (so the store is written to all through
/// the backup) and then waits for `mark` to exist.
fn busy_pipeline(mark: &std::path::Path) -> String {
    format!(
        r#"pipeline: busy
stages:
  print:
    retries: {{ max: 2, when: [agent_lost] }}
    commands:
      - 'i=0; while [ $i -lt 600 ]; do i=$((i+1)); echo "busy line $i"; sleep 0.005; done'
      - 'while [ ! -f {mark} ]; do sleep 0.1; done'
      - echo done waiting
"#,
        mark = mark.display()
    )
}

fn coordinator_command(args: &[&str]) -> Result<std::process::Output> {
    Command::new(kiln_tests::binary("kiln-coordinator"))
        .args(args)
        .env_remove("KILN_TOKEN")
        .env_remove("KILN_TOKEN_FILE")
        .env_remove("KILN_DATA_DIR")
        .output()
        .context("running kiln-coordinator")
}

/// The lines of a stage's first attempt, checked to be numbered 1..=n with
/// no gap.
async fn busy_lines(
    client: &mut kiln_proto::v1::control_service_client::ControlServiceClient<
        kiln_common::channel::KilnChannel,
    >,
    run: u64,
) -> Result<u64> {
    let entries = logs(client, run, "print").await?;
    let mut numbers = entries.iter().filter_map(|entry| {
        let line = entry.line.as_ref()?;
        (entry.attempt == 1)
            .then(|| line.text.strip_prefix("busy line ")?.parse::<u64>().ok())
            .flatten()
    });
    let mut count = 0;
    for (expected, number) in (1..).zip(&mut numbers) {
        ensure!(
            number == expected,
            "line {number} where {expected} was due: the log has a gap"
        );
        count = number;
    }
    Ok(count)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_online_backup_of_a_busy_coordinator_restores_and_carries_on_its_runs() -> Result<()> {
    let options = CoordinatorOptions::default();
    let original = tempfile::tempdir()?;
    let data = original.path().join("kiln");
    let work = tempfile::tempdir()?;
    let (mut coordinator, mut agent, first, _repo) =
        one_finished_run(&data, &options, work.path()).await?;
    let url = coordinator.url();
    let mut client = coordinator.client().await?;

    // A run that is writing its log while the backup is taken.
    let marks = tempfile::tempdir()?;
    let mark = marks.path().join("MARK");
    let busy_repo = Repo::new(&busy_pipeline(&mark))?;
    let busy = register_and_run(&coordinator, &busy_repo).await?;
    let before = kiln_tests::eventually(Duration::from_secs(30), "busy lines", || {
        let mut client = client.clone();
        async move {
            let n = busy_lines(&mut client, busy).await?;
            Ok((n >= 20).then_some(n))
        }
    })
    .await?;

    // Only an admin may take one; the refusal is clear.
    let operator =
        kiln_tests::create_token(&url, &coordinator.admin_token, "op", pb::Role::Operator).await?;
    let backups = tempfile::tempdir()?;
    let file = backups.path().join("kiln.backup");
    let refused = coordinator_command(&[
        "backup",
        "--to",
        &file.display().to_string(),
        "--coordinator",
        &url,
        "--token",
        &operator,
    ])?;
    ensure!(!refused.status.success(), "an operator took a backup");
    let said = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        said.contains("refused") && !file.exists(),
        "unclear refusal: {said}"
    );

    let backup = coordinator_command(&[
        "backup",
        "--to",
        &file.display().to_string(),
        "--coordinator",
        &url,
        "--token-file",
        &data.join("admin.token").display().to_string(),
    ])?;
    ensure!(backup.status.success(), "backup failed: {backup:?}");
    let said = String::from_utf8_lossy(&backup.stdout);
    ensure!(said.starts_with("backed up "), "{said}");
    let still_busy = get_run(&mut client, busy).await?;
    ensure!(
        still_busy.state == pb::RunState::Running as i32,
        "the busy run should still run after the backup: {still_busy:?}"
    );

    // The original goes away for good.
    agent.kill9();
    coordinator.process.kill9();
    let admin_token = coordinator.admin_token.clone();

    // A cut-short copy is refused and leaves nothing behind.
    let bytes = std::fs::read(&file)?;
    let cut = backups.path().join("cut.backup");
    std::fs::write(&cut, &bytes[..bytes.len() / 2])?;
    let elsewhere = tempfile::tempdir()?;
    let target = elsewhere.path().join("kiln");
    let refused = coordinator_command(&[
        "restore",
        "--from",
        &cut.display().to_string(),
        "--data-dir",
        &target.display().to_string(),
    ])?;
    ensure!(!refused.status.success(), "a cut backup was restored");
    let said = String::from_utf8_lossy(&refused.stderr);
    ensure!(said.contains("cut short"), "unclear refusal: {said}");
    ensure!(!target.exists(), "a failed restore left {target:?} behind");
    ensure!(
        std::fs::read_dir(elsewhere.path())?.next().is_none(),
        "a failed restore left files behind"
    );

    let restored = coordinator_command(&[
        "restore",
        "--from",
        &file.display().to_string(),
        "--data-dir",
        &target.display().to_string(),
    ])?;
    ensure!(restored.status.success(), "restore failed: {restored:?}");
    // Restoring over data is refused.
    let again = coordinator_command(&[
        "restore",
        "--from",
        &file.display().to_string(),
        "--data-dir",
        &target.display().to_string(),
    ])?;
    ensure!(
        !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already holds"),
        "{again:?}"
    );
    drop(original);

    let coordinator = Coordinator::start(&target, &options)?;
    ensure!(coordinator.admin_token == admin_token);
    let url = coordinator.url();
    let mut client = coordinator.client().await?;
    let old = get_run(&mut client, first).await?;
    ensure!(old.state == pb::RunState::Succeeded as i32, "{old:?}");
    let got = tempfile::tempdir()?;
    let artifacts = kiln_tests::kiln(
        &url,
        &[
            "artifacts",
            "get",
            &first.to_string(),
            "make",
            "out",
            "--out",
            &got.path().display().to_string(),
        ],
    );
    ensure!(artifacts.status.success(), "{artifacts:?}");
    let made = std::fs::read_to_string(got.path().join("out/file"))?;
    ensure!(made.contains("made with 11-character greeting"), "{made}");
    // Everything acknowledged before the backup began is there, with no gap.
    let kept = busy_lines(&mut client, busy).await?;
    ensure!(
        kept >= before,
        "the backup lost acknowledged lines: {kept} < {before}"
    );

    // The busy run carries on: its lost agent's stage goes to a new agent.
    std::fs::write(&mark, b"")?;
    let work = tempfile::tempdir()?;
    let _agent = start_agent(&url, "a2", "", 2, work.path())?;
    let finished = match wait_run(&mut client, busy, Duration::from_secs(120)).await {
        Ok(run) => run,
        Err(error) => {
            let run = get_run(&mut client, busy).await?;
            anyhow::bail!("{error:#}: {run:?}");
        }
    };
    ensure!(
        finished.state == pb::RunState::Succeeded as i32,
        "{finished:?}"
    );
    a_new_run_reads_the_restored_secret(&coordinator, first).await
}
