//! Artifacts through real pipelines: outputs flow to the stages that need
//! them, `when: always` keeps failure reports, uploaded sources run, and
//! unsafe or oversized outputs are refused with a clear message.

use std::time::Duration;

use anyhow::Result;
use kiln_proto::v1 as pb;
use kiln_tests::{CoordinatorOptions, Farm, Repo, kiln, logs, stage, wait_run};

fn farm_with(extra: &[&str]) -> Result<Farm> {
    let options = CoordinatorOptions {
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    Farm::start(&options, &[("art-1", "", 2), ("art-2", "", 2)])
}

fn state(stage: &pb::Stage) -> pb::StageState {
    pb::StageState::try_from(stage.state).unwrap()
}

async fn run_pipeline(farm: &Farm, repo: &Repo, name: &str) -> Result<pb::Run> {
    let registered =
        farm.coordinator
            .kiln(&["pipeline", "register", repo.path().to_str().unwrap()]);
    assert_eq!(
        registered.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&registered.stderr)
    );
    let started = farm.coordinator.kiln(&["run", name]);
    let id: u64 = String::from_utf8(started.stdout)?.trim().parse()?;
    let mut client = farm.coordinator.client().await?;
    wait_run(&mut client, id, Duration::from_secs(60)).await
}

const FLOW: &str = r#"
pipeline: flow
stages:
  prepare:
    commands:
      - mkdir -p build/data
      - echo "1,2" > build/data/train.csv
      - echo v1 > build/version.txt
    artifacts: [build/data, build/version.txt]
  train:
    needs: [prepare]
    commands:
      - test -f build/data/train.csv
      - test "$(cat build/version.txt)" = v1
      - mkdir -p build/model
      - sha256sum build/data/train.csv > build/model/weights
    artifacts: [build/model]
  evaluate:
    needs: [train]
    commands:
      - test -s build/model/weights
      - test ! -e build/data
  report:
    commands:
      - echo "partial results" > report.txt
      - exit 1
    artifacts:
      paths: [report.txt]
      when: always
"#;

#[tokio::test(flavor = "multi_thread")]
async fn outputs_flow_to_the_stages_that_need_them() -> Result<()> {
    let farm = farm_with(&[])?;
    let repo = Repo::new(FLOW)?;
    let run = run_pipeline(&farm, &repo, "flow").await?;
    for name in ["prepare", "train", "evaluate"] {
        assert_eq!(
            state(stage(&run, name)),
            pb::StageState::Succeeded,
            "{name}: {run:#?}"
        );
    }
    let prepared: Vec<&str> = stage(&run, "prepare")
        .outputs
        .iter()
        .map(|a| a.path.as_str())
        .collect();
    assert_eq!(prepared, ["build/data", "build/version.txt"]);
    assert!(
        stage(&run, "prepare")
            .outputs
            .iter()
            .all(|a| a.digest.starts_with("sha256:") && a.size > 0)
    );

    // `when: always` kept the failing stage's report.
    let report = stage(&run, "report");
    assert_eq!(state(report), pb::StageState::Failed);
    assert_eq!(report.outputs.len(), 1, "{report:?}");

    // Byte for byte through the CLI.
    let out = tempfile::tempdir()?;
    let got = farm.coordinator.kiln(&[
        "artifacts",
        "get",
        &run.id.to_string(),
        "train",
        "build/model",
        "-o",
        out.path().to_str().unwrap(),
    ]);
    assert_eq!(
        got.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let weights = std::fs::read_to_string(out.path().join("build/model/weights"))?;
    assert!(weights.contains("build/data/train.csv"), "{weights}");
    let listed =
        farm.coordinator
            .kiln(&["--output", "json", "artifacts", "ls", &run.id.to_string()]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout)?;
    assert_eq!(listed.as_array().unwrap().len(), 4, "{listed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_uploaded_source_runs_without_a_commit() -> Result<()> {
    let farm = farm_with(&[])?;
    let repo = Repo::new(
        "pipeline: src\nstages:\n  check:\n    commands: [\"cat notes.txt\", \"test ! -e ignored.log\"]\n",
    )?;
    std::fs::write(repo.path().join(".gitignore"), "*.log\n")?;
    std::fs::write(repo.path().join("ignored.log"), "noise")?;
    // Uncommitted work: only the uploaded snapshot has it.
    std::fs::write(repo.path().join("notes.txt"), "uncommitted change\n")?;
    let dir = repo.path().to_str().unwrap();
    assert_eq!(
        farm.coordinator
            .kiln(&["pipeline", "register", dir])
            .status
            .code(),
        Some(0)
    );
    let run = farm
        .coordinator
        .kiln(&["--output", "json", "run", "src", "--source", dir, "--wait"]);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let run: serde_json::Value = serde_json::from_slice(&run.stdout)?;
    let mut client = farm.coordinator.client().await?;
    let lines = logs(&mut client, run["id"].as_u64().unwrap(), "check").await?;
    assert!(
        lines
            .iter()
            .any(|e| e.line.as_ref().unwrap().text == "uncommitted change"),
        "{lines:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unsafe_and_oversized_outputs_are_refused() -> Result<()> {
    // Paths that leave the workspace are refused when the file is read.
    for (path, expected) in [("/etc/passwd", "absolute"), ("../outside", "..")] {
        let yaml = format!(
            "pipeline: bad\nstages:\n  a:\n    commands: [\"true\"]\n    artifacts: [\"{path}\"]\n"
        );
        let repo = Repo::new(&yaml)?;
        let output = kiln(
            "http://127.0.0.1:1",
            &["pipeline", "register", repo.path().to_str().unwrap()],
        );
        assert_eq!(output.status.code(), Some(2));
        let message = String::from_utf8_lossy(&output.stderr);
        assert!(
            message.contains("kiln.yml:5:") && message.contains(expected),
            "{message}"
        );
    }

    let farm = farm_with(&["--max-artifact-bytes", "100000"])?;
    let repo = Repo::new(
        "pipeline: unsafe\nstages:\n  escape:\n    commands: [\"mkdir -p build\", \"ln -s /etc build/etc\"]\n    artifacts: [build/etc]\n  big:\n    commands: [\"head -c 1000000 /dev/urandom > blob.bin\"]\n    artifacts: [blob.bin]\n  missing:\n    commands: [\"true\"]\n    artifacts: [never/made]\n",
    )?;
    let run = run_pipeline(&farm, &repo, "unsafe").await?;
    let escape = stage(&run, "escape");
    assert_eq!(state(escape), pb::StageState::Failed, "{escape:?}");
    assert!(escape.message.contains("build/etc"), "{}", escape.message);
    let big = stage(&run, "big");
    assert_ne!(state(big), pb::StageState::Succeeded, "{big:?}");
    assert!(big.message.contains("limit"), "{}", big.message);
    let missing = stage(&run, "missing");
    assert_eq!(state(missing), pb::StageState::Failed);
    assert!(
        missing.message.contains("never/made"),
        "{}",
        missing.message
    );
    Ok(())
}
