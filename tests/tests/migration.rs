//! Data directories written before environments belonged to their pipeline
//! (`tests/fixtures/envs-v1.tar.gz`, made by the previous release's
//! binaries; see `tests/fixtures/README.md`) are migrated on start, and a
//! store from a newer coordinator is refused without being touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use kiln_proto::v1 as pb;
use kiln_tests::{Coordinator, CoordinatorOptions, binary};

/// Unpacks the fixture into a fresh directory; returns it and the data
/// directory inside.
fn unpack_fixture() -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/envs-v1.tar.gz");
    let status = Command::new("tar")
        .arg("-C")
        .arg(dir.path())
        .arg("-xzf")
        .arg(&fixture)
        .status()
        .context("running tar")?;
    ensure!(status.success(), "cannot unpack {}", fixture.display());
    let data = dir.path().join("data");
    Ok((dir, data))
}

/// `(release id, state, run)` of each release of `pipeline/environment`,
/// newest first.
async fn history(
    coordinator: &Coordinator,
    pipeline: &str,
    environment: &str,
) -> Result<Vec<(u64, pb::ReleaseState, u64)>> {
    let request = pb::EnvironmentHistoryRequest {
        environment: environment.into(),
        pipeline: pipeline.into(),
    };
    let releases = coordinator
        .client()
        .await?
        .environment_history(request)
        .await?
        .into_inner()
        .releases;
    for release in &releases {
        assert_eq!(
            (release.pipeline.as_str(), release.environment.as_str()),
            (pipeline, environment)
        );
    }
    Ok(releases
        .iter()
        .map(|r| (r.id, r.state(), r.run_id))
        .collect())
}

async fn check_migrated(coordinator: &Coordinator) -> Result<()> {
    use pb::ReleaseState::{Live, RolledBack, Superseded};
    // What each pipeline served before: credit its run 2 (releases 3 and
    // 4, superseded farm-wide by churn's), churn releases 7 and 6.
    assert_eq!(
        history(coordinator, "credit", "production").await?,
        [(4, Live, 2), (2, Superseded, 1)]
    );
    assert_eq!(
        history(coordinator, "churn", "production").await?,
        [(8, RolledBack, 4), (6, Live, 3)]
    );
    assert_eq!(
        history(coordinator, "credit", "staging").await?,
        [(3, Live, 2), (1, Superseded, 1)]
    );
    assert_eq!(
        history(coordinator, "churn", "staging").await?,
        [(7, Live, 4), (5, Superseded, 3)]
    );
    let environments: BTreeMap<String, u64> = coordinator
        .client()
        .await?
        .list_environments(pb::ListEnvironmentsRequest {})
        .await?
        .into_inner()
        .environments
        .into_iter()
        .map(|env| (format!("{}/{}", env.pipeline, env.name), env.live_release))
        .collect();
    let expected: BTreeMap<String, u64> = [
        ("churn/production", 6),
        ("churn/staging", 7),
        ("credit/production", 4),
        ("credit/staging", 3),
    ]
    .into_iter()
    .map(|(name, live)| (name.to_owned(), live))
    .collect();
    assert_eq!(environments, expected);
    // The rollback run that restored release 6 names churn's production.
    let run = coordinator
        .client()
        .await?
        .get_run(pb::GetRunRequest { run_id: 5 })
        .await?
        .into_inner();
    let plan = run.rollback.context("run 5 is a rollback run")?;
    assert_eq!(
        (plan.pipeline.as_str(), plan.environment.as_str()),
        ("churn", "production")
    );
    assert_eq!((plan.from_release, plan.to_release), (8, 6));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn environments_shared_by_two_pipelines_are_split_by_pipeline() -> Result<()> {
    let (_dir, data) = unpack_fixture()?;
    let options = CoordinatorOptions::default();
    let mut coordinator = Coordinator::start(&data, &options)?;
    check_migrated(&coordinator).await?;
    let bare = coordinator.kiln(&["env", "history", "production"]);
    assert_eq!(bare.status.code(), Some(2));
    let message = String::from_utf8_lossy(&bare.stderr);
    assert!(
        message.contains("(churn/production, credit/production)"),
        "{message}"
    );

    // A second start finds schema 2 and changes nothing.
    coordinator
        .process
        .terminate(std::time::Duration::from_secs(10))?;
    let coordinator = Coordinator::start(&data, &options)?;
    check_migrated(&coordinator).await?;
    Ok(())
}

/// Every file under `dir` with its contents, except sled's `snap.*` files:
/// sled rewrites that index of its log on every open, records or not.
fn snapshot(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next)? {
            let path = entry?.path();
            let is_sled_snapshot = path
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("snap."));
            if path.is_dir() {
                pending.push(path);
            } else if !is_sled_snapshot {
                files.insert(path.clone(), std::fs::read(&path)?);
            }
        }
    }
    Ok(files)
}

/// Every key and value of a sled database.
fn records(db: &sled::Db) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    db.iter()
        .map(|entry| {
            let (key, value) = entry?;
            Ok((key.to_vec(), value.to_vec()))
        })
        .collect()
}

#[test]
fn a_store_from_a_newer_coordinator_is_refused_and_left_unchanged() -> Result<()> {
    let (_dir, data) = unpack_fixture()?;
    let records_before = {
        let db = sled::open(data.join("state.sled"))?;
        db.insert(b"Mschema", &b"99"[..])?;
        db.flush()?;
        records(&db)?
    };
    let before = snapshot(&data)?;
    let output = Command::new(binary("kiln-coordinator"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--grpc", "127.0.0.1:0", "--http", ""])
        .env("RUST_LOG", "warn")
        .output()?;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(
        errors,
        [format!(
            "error: the store in {} has schema version 99, newer than this coordinator knows \
             (up to 2); nothing was changed: run the coordinator release that wrote it, or a \
             newer one",
            data.display()
        )],
        "{stderr}"
    );
    let after = snapshot(&data)?;
    let changed: Vec<&PathBuf> = before
        .keys()
        .chain(after.keys())
        .filter(|path| before.get(*path) != after.get(*path))
        .collect();
    assert!(changed.is_empty(), "the refused store changed: {changed:?}");
    let db = sled::open(data.join("state.sled"))?;
    assert!(records(&db)? == records_before, "a record changed");
    Ok(())
}
