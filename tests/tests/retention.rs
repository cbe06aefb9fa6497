//! Retention end to end: a pipeline with `retention: {keep: {runs: 2}}`
//! runs five times; its first run made a release. `kiln gc --dry-run` names
//! the runs that would go and changes nothing; `kiln gc` deletes them —
//! records, stages, logs — and the blobs only they referenced, and keeps
//! the newest two runs, the released run and the blobs the release
//! references.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use kiln_proto::v1 as pb;
use kiln_tests::{
    CoordinatorOptions, Farm, Repo, get_run, logs, register_and_run, stage, wait_run,
};

const LIMIT: Duration = Duration::from_secs(60);

/// Where the coordinator keeps blob `digest`.
fn blob_path(data_dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    data_dir.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Ages every blob past the GC's grace period (an hour), as if the runs
/// were old.
fn age_blobs(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            age_blobs(&entry.path())?;
        } else {
            let old = SystemTime::now() - Duration::from_secs(3 * 3600);
            std::fs::File::options()
                .write(true)
                .open(entry.path())?
                .set_modified(old)?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_old_runs_and_keeps_releases_and_what_they_reference() -> Result<()> {
    let farm = Farm::start(&CoordinatorOptions::default(), &[("keeper", "", 1)])?;
    let data_dir = farm.dirs[0].path().to_path_buf();
    // Only the first run ships (the others' ship stage fails, allowed).
    let repo = Repo::new(
        r#"
pipeline: kept
retention: { keep: { runs: 2 } }
stages:
  build:
    commands: ['mkdir -p out && echo "model of run $KILN_RUN_ID" > out/model']
    artifacts: [out]
  ship:
    needs: [build]
    environment: production
    allow_failure: true
    retries: 0
    commands: ['[ "$KILN_RUN_ID" = 1 ]']
"#,
    )?;
    let mut client = farm.coordinator.client().await?;
    let mut outputs = Vec::new();
    for expected in 1..=5u64 {
        let id = register_and_run(&farm.coordinator, &repo).await?;
        assert_eq!(id, expected);
        let run = wait_run(&mut client, id, LIMIT).await?;
        assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
        outputs.push(stage(&run, "build").outputs[0].digest.clone());
    }
    let release = client
        .get_release(pb::GetReleaseRequest { release_id: 1 })
        .await?
        .into_inner();
    assert_eq!(release.run_id, 1);
    assert_eq!(release.artifacts[0].digest, outputs[0]);
    age_blobs(&data_dir.join("blobs"))?;

    let dry = farm.coordinator.kiln(&["gc", "--dry-run"]);
    let said = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(dry.status.success(), "{dry:?}");
    assert!(
        said.contains(
            "would delete 2 runs past their pipeline's retention (with their stages and logs): 2, 3"
        ),
        "{said}"
    );
    assert!(said.contains("would delete 2 blobs"), "{said}");
    get_run(&mut client, 2).await?;
    assert!(
        blob_path(&data_dir, &outputs[1]).exists(),
        "a dry run deletes nothing"
    );

    let gc = farm.coordinator.kiln(&["gc", "--output", "json"]);
    assert!(gc.status.success(), "{gc:?}");
    let report: serde_json::Value = serde_json::from_slice(&gc.stdout)?;
    assert_eq!(
        report["runs_deleted"],
        serde_json::json!([2, 3]),
        "{report}"
    );
    assert_eq!(report["blobs_deleted"], 2, "{report}");

    for gone in [2, 3] {
        let status = get_run(&mut client, gone).await.unwrap_err();
        assert!(
            status.to_string().contains("not found") || status.to_string().contains("no run"),
            "run {gone}: {status}"
        );
        let lines = logs(&mut client, gone, "build").await;
        assert!(
            lines.as_ref().map_or(true, Vec::is_empty),
            "run {gone}'s logs are gone: {lines:?}"
        );
        assert!(!blob_path(&data_dir, &outputs[gone as usize - 1]).exists());
    }
    for kept in [1, 4, 5] {
        let run = get_run(&mut client, kept).await?;
        assert_eq!(run.stages.len(), 2);
        assert!(!logs(&mut client, kept, "build").await?.is_empty());
        assert!(blob_path(&data_dir, &outputs[kept as usize - 1]).exists());
    }
    let release = client
        .get_release(pb::GetReleaseRequest { release_id: 1 })
        .await?
        .into_inner();
    assert_eq!(release.run_id, 1, "the release and its run stay");

    // Nothing more to do: a second collection deletes nothing.
    let again = farm.coordinator.kiln(&["gc", "--output", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&again.stdout)?;
    assert_eq!(report["runs_deleted"], serde_json::json!([]), "{report}");
    Ok(())
}

/// With `--gc-every`, the coordinator applies retention by itself: nobody
/// calls `kiln gc`, yet the runs past `keep: {runs: 1}` go.
#[tokio::test(flavor = "multi_thread")]
async fn the_coordinator_applies_retention_on_its_own() -> Result<()> {
    let options = CoordinatorOptions {
        extra_args: vec!["--gc-every".into(), "1s".into()],
        ..CoordinatorOptions::default()
    };
    let farm = Farm::start(&options, &[("keeper", "", 1)])?;
    let repo = Repo::new(
        r#"
pipeline: pruned
retention: { keep: { runs: 1 } }
stages:
  build: { commands: ["true"] }
"#,
    )?;
    let mut client = farm.coordinator.client().await?;
    for _ in 0..3 {
        let id = register_and_run(&farm.coordinator, &repo).await?;
        let run = wait_run(&mut client, id, LIMIT).await?;
        assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<u64> = client
            .list_runs(pb::ListRunsRequest::default())
            .await?
            .into_inner()
            .runs
            .iter()
            .map(|run| run.id)
            .collect();
        if left == [3] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "runs still stored 30 s after the last one finished: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
