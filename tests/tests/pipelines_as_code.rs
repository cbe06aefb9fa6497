//! Pipelines as code, against a real coordinator, real agents and real
//! git: a repository registered once; every run reads its pipeline file at
//! the commit it builds, records that file's digest as its version, and a
//! file that does not parse fails its run at once with file, line and
//! column.

use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kiln_proto::v1 as pb;
use kiln_tests::{Farm, Repo, logs, stage, wait_run};
use sha2::{Digest, Sha256};

const LIMIT: Duration = Duration::from_secs(60);

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn digest(text: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(text.as_bytes())))
}

fn names(run: &pb::Run) -> Vec<&str> {
    run.stages.iter().map(|stage| stage.name.as_str()).collect()
}

/// Triggers `pipeline` at `rev` ("" = branch head) and waits for the end.
async fn run_at(farm: &Farm, pipeline: &str, rev: &str) -> Result<pb::Run> {
    let mut client = farm.coordinator.client().await?;
    let run = client
        .trigger_run(pb::TriggerRunRequest {
            pipeline: pipeline.into(),
            rev: rev.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    wait_run(&mut client, run.id, LIMIT).await
}

async fn latest_version(farm: &Farm, pipeline: &str) -> Result<pb::Pipeline> {
    Ok(farm
        .coordinator
        .client()
        .await?
        .get_pipeline(pb::GetPipelineRequest {
            name: pipeline.into(),
            version: 0,
        })
        .await?
        .into_inner())
}

const V1: &str = "pipeline: pac\nstages:\n  one: { commands: [\"echo one\"] }\n";
const V2: &str = "pipeline: pac\nstages:\n  one: { commands: [\"echo one\"] }\n  two:\n    needs: [one]\n    commands: [\"echo two at $KILN_COMMIT\"]\n";
/// `comands` on line 5, column 5: a key the parser does not know.
const BROKEN: &str = "pipeline: pac\nstages:\n  one: { commands: [\"echo one\"] }\n  two:\n    comands: [\"echo two\"]\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_repository_registered_once_runs_the_pipeline_file_of_each_commit() -> Result<()> {
    let farm = Farm::start(&Default::default(), &[("pac-agent", "", 2)])?;
    let repo = Repo::new(V1)?;
    let first = repo.commit("README", "hello\n")?;
    let added = farm.coordinator.kiln(&[
        "repo",
        "add",
        repo.path().to_str().unwrap(),
        "--name",
        "models",
    ]);
    ensure!(added.status.success(), "{}", stderr(&added));
    ensure!(
        stdout(&added).contains("registered pac version 1 (kiln.yml)"),
        "{}",
        stdout(&added)
    );

    let run = run_at(&farm, "pac", "").await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    assert_eq!(names(&run), ["one"]);
    assert_eq!(
        (run.pipeline_version, run.pipeline_digest.as_str()),
        (1, digest(V1).as_str())
    );

    // A commit adds a stage: the next run runs it, as a new version, with
    // nobody registering anything.
    let second = repo.commit("kiln.yml", V2)?;
    let run = run_at(&farm, "pac", "").await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    assert_eq!(names(&run), ["one", "two"]);
    assert_eq!(run.commit, second);
    assert_eq!(
        (run.pipeline_version, run.pipeline_digest.as_str()),
        (2, digest(V2).as_str())
    );
    let mut client = farm.coordinator.client().await?;
    let lines = logs(&mut client, run.id, "two").await?;
    ensure!(
        lines.iter().any(|entry| entry
            .line
            .as_ref()
            .is_some_and(|line| line.text == format!("two at {second}"))),
        "{lines:#?}"
    );
    let status = farm.coordinator.kiln(&["status", &run.id.to_string()]);
    ensure!(
        stdout(&status).contains("(version 2)") && stdout(&status).contains(&digest(V2)),
        "{}",
        stdout(&status)
    );
    let stored = latest_version(&farm, "pac").await?;
    assert_eq!((stored.version, stored.path.as_str()), (2, "kiln.yml"));
    assert_eq!(stored.spec_yaml, V2);
    assert_eq!(stored.repository, "models");

    // A broken file fails its run at once, saying where and what.
    let broken = repo.commit("kiln.yml", BROKEN)?;
    let run = run_at(&farm, "pac", "").await?;
    assert_eq!(run.state, pb::RunState::Failed as i32, "{run:#?}");
    assert_eq!(run.commit, broken);
    assert_eq!(
        run.pipeline_version, 0,
        "a file that does not parse is no version"
    );
    assert_eq!(run.pipeline_digest, digest(BROKEN));
    let refused = stage(&run, "kiln.yml");
    assert_eq!(refused.state, pb::StageState::Failed as i32);
    ensure!(
        refused.message.starts_with("kiln.yml:5:5: ") && refused.message.contains("comands"),
        "the reason names file, line, column and the key: {}",
        refused.message
    );
    let lines = logs(&mut client, run.id, "kiln.yml").await?;
    ensure!(
        lines.iter().any(|entry| entry
            .line
            .as_ref()
            .is_some_and(|line| line.text.starts_with("kiln.yml:5:5: "))),
        "the reason is in the run's log: {lines:#?}"
    );
    let status = farm.coordinator.kiln(&["status", &run.id.to_string()]);
    ensure!(
        stdout(&status).contains("kiln.yml:5:5"),
        "kiln status shows the reason: {}",
        stdout(&status)
    );
    assert_eq!(
        latest_version(&farm, "pac").await?.version,
        2,
        "nothing stored for it"
    );

    // The commit after it runs again; the same file is the same version.
    let fixed = repo.commit("kiln.yml", V2)?;
    let run = run_at(&farm, "pac", "").await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    assert_eq!(
        (run.commit.as_str(), run.pipeline_version),
        (fixed.as_str(), 2)
    );
    // An old commit builds with its own file: version 1 again.
    let run = run_at(&farm, "pac", &first).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    assert_eq!((names(&run), run.pipeline_version), (vec!["one"], 1));
    assert_eq!(
        latest_version(&farm, "pac").await?.version,
        2,
        "no version added"
    );

    // A file that names another pipeline is refused for this one.
    let renamed = V1.replace("pipeline: pac", "pipeline: other");
    repo.commit("kiln.yml", &renamed)?;
    let run = run_at(&farm, "pac", "").await?;
    assert_eq!(run.state, pb::RunState::Failed as i32, "{run:#?}");
    let refused = stage(&run, "kiln.yml");
    ensure!(
        refused
            .message
            .contains("names pipeline `other`, not `pac`"),
        "{}",
        refused.message
    );

    // A commit that is not in the repository starts nothing.
    let missing = "1234567".repeat(6)[..40].to_owned();
    let error = client
        .trigger_run(pb::TriggerRunRequest {
            pipeline: "pac".into(),
            rev: missing.clone(),
            ..Default::default()
        })
        .await
        .expect_err("an unknown commit is refused");
    assert_eq!(error.code(), tonic::Code::FailedPrecondition);
    ensure!(error.message().contains(&missing), "{}", error.message());
    Ok(())
}

/// Another branch's file runs as its own (side) version, but the
/// pipeline's current version — what its triggers, settings and page come
/// from — stays the registered branch's file until that branch has the
/// file too; through a restart.
#[tokio::test(flavor = "multi_thread")]
async fn another_branchs_file_runs_but_never_becomes_the_current_version() -> Result<()> {
    let options = Default::default();
    let mut farm = Farm::start(&options, &[("side-agent", "", 2)])?;
    let (v1, v2) = (V1.replace("pac", "side"), V2.replace("pac", "side"));
    let repo = Repo::new(&v1)?;
    farm.coordinator.add_repo(&repo, &[])?;

    repo.git(&["checkout", "-q", "-b", "feature"])?;
    repo.commit("kiln.yml", &v2)?;
    let run = run_at(&farm, "side", "feature").await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    assert_eq!(
        (names(&run), run.pipeline_version),
        (vec!["one", "two"], 2),
        "the branch's run builds the branch's file"
    );
    let current = latest_version(&farm, "side").await?;
    assert_eq!(
        (current.version, current.spec_yaml.as_str()),
        (1, v1.as_str()),
        "the feature branch's file is not the pipeline's"
    );
    farm.coordinator
        .crash_and_restart(&options, Duration::from_millis(100))?;
    assert_eq!(latest_version(&farm, "side").await?.version, 1);

    // The file reaches main: main's run makes it current, as a new version
    // (version 2 stays the side version its run built).
    repo.git(&["checkout", "-q", "main"])?;
    repo.git(&["merge", "-q", "--ff-only", "feature"])?;
    let run = run_at(&farm, "side", "").await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    assert_eq!(
        (run.pipeline_version, run.pipeline_digest.as_str()),
        (3, digest(&v2).as_str())
    );
    let current = latest_version(&farm, "side").await?;
    assert_eq!(
        (current.version, current.spec_yaml.as_str()),
        (3, v2.as_str())
    );
    // Main again with the same file: the same version.
    repo.commit("README", "again\n")?;
    let run = run_at(&farm, "side", "").await?;
    assert_eq!(run.pipeline_version, 3);
    Ok(())
}

/// A remote repository (a `file://` URL: the coordinator reads it through
/// its own mirror) holding several pipelines: `kiln.yml` and `.kiln/*.yml`,
/// each registered by one `kiln repo add` and run on its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_remote_repository_with_several_pipelines() -> Result<()> {
    let farm = Farm::start(&Default::default(), &[("pac-remote-agent", "", 2)])?;
    let repo =
        Repo::new("pipeline: build\nstages:\n  compile: { commands: [\"echo compile\"] }\n")?;
    let lint_v1 = "pipeline: lint\nstages:\n  style: { commands: [\"test -f .kiln/lint.yml\"] }\n";
    repo.commit(".kiln/lint.yml", lint_v1)?;
    repo.commit(".kiln/notes.txt", "not a pipeline\n")?;
    let url = format!("file://{}", repo.path().display());

    let added = farm
        .coordinator
        .kiln(&["--output", "json", "repo", "add", &url]);
    ensure!(added.status.success(), "{}", stderr(&added));
    let answer: serde_json::Value = serde_json::from_slice(&added.stdout)?;
    let registered: Vec<(&str, &str)> = answer["pipelines"]
        .as_array()
        .context("a list of pipelines")?
        .iter()
        .map(|p| {
            (
                p["pipeline"]["name"].as_str().unwrap_or_default(),
                p["pipeline"]["path"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        registered,
        [("build", "kiln.yml"), ("lint", ".kiln/lint.yml")]
    );
    let listed = farm.coordinator.kiln(&["repo", "list"]);
    ensure!(
        stdout(&listed).contains(".kiln/lint.yml") && stdout(&listed).contains("lint v1"),
        "{}",
        stdout(&listed)
    );

    // Each pipeline runs on its own; stages of `.kiln/` files run at the
    // repository root.
    let lint = run_at(&farm, "lint", "").await?;
    assert_eq!(lint.state, pb::RunState::Succeeded as i32, "{lint:#?}");
    let build = run_at(&farm, "build", "").await?;
    assert_eq!(build.state, pb::RunState::Succeeded as i32, "{build:#?}");
    assert_eq!(names(&build), ["compile"]);

    // A new commit on the remote: fetched into the mirror, its file read.
    let lint_v2 = format!("{lint_v1}  types: {{ commands: [\"echo types\"] }}\n");
    let pushed = repo.commit(".kiln/lint.yml", &lint_v2)?;
    let lint = run_at(&farm, "lint", "").await?;
    assert_eq!(lint.state, pb::RunState::Succeeded as i32, "{lint:#?}");
    assert_eq!(lint.commit, pushed);
    assert_eq!(
        (names(&lint), lint.pipeline_version),
        (vec!["style", "types"], 2)
    );
    let build = run_at(&farm, "build", "").await?;
    assert_eq!(build.pipeline_version, 1, "its file did not change");
    Ok(())
}

/// `kiln pipeline register DIR` is the shortcut: a committed kiln.yml is
/// then read at each run's commit too.
#[tokio::test(flavor = "multi_thread")]
async fn pipeline_register_is_a_shortcut_for_one_file() -> Result<()> {
    let farm = Farm::start(&Default::default(), &[("pac-register-agent", "", 1)])?;
    let repo = Repo::new("pipeline: sub\nstages:\n  a: { commands: [\"true\"] }\n")?;
    repo.commit(
        "ml/kiln.yml",
        "pipeline: ml\nstages:\n  here: { commands: [\"test -f kiln.yml\"] }\n",
    )?;
    let dir = repo.path().join("ml");
    let registered = farm
        .coordinator
        .kiln(&["pipeline", "register", dir.to_str().unwrap()]);
    ensure!(registered.status.success(), "{}", stderr(&registered));
    assert_eq!(latest_version(&farm, "ml").await?.path, "ml/kiln.yml");
    repo.commit(
        "ml/kiln.yml",
        "pipeline: ml\nstages:\n  here: { commands: [\"test -f kiln.yml\"] }\n  more: { commands: [\"true\"] }\n",
    )?;
    let run = run_at(&farm, "ml", "").await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    assert_eq!(
        (names(&run), run.pipeline_version),
        (vec!["here", "more"], 2)
    );
    Ok(())
}

/// The line of `stage`'s log that starts with `prefix`.
async fn line_starting(farm: &Farm, run: u64, stage: &str, prefix: &str) -> Result<String> {
    let mut client = farm.coordinator.client().await?;
    let lines = logs(&mut client, run, stage).await?;
    lines
        .iter()
        .filter_map(|entry| entry.line.as_ref())
        .map(|line| line.text.clone())
        .find(|text| text.starts_with(prefix))
        .with_context(|| format!("no line starting with {prefix:?} in {lines:#?}"))
}

const VARS: &str = r#"
pipeline: vars
env: { REGION: eu }
params:
  EPOCHS: { type: int, default: 10 }
  MODE: { type: choice, choices: [fast, full], default: fast }
stages:
  show:
    commands:
      - echo "params epochs=$EPOCHS mode=$MODE region=$REGION"
      - echo "ids run=$KILN_RUN_ID pipeline=$KILN_PIPELINE stage=$KILN_STAGE attempt=$KILN_ATTEMPT"
      - echo "source commit=$KILN_COMMIT branch=${KILN_BRANCH:-} tag=${KILN_TAG:-} event=$KILN_EVENT"
  deploy:
    needs: [show]
    environment: staging
    commands: ["echo deploy with $EPOCHS epochs"]
"#;

/// Declared parameters checked against their types, given to every stage
/// with the pipeline's `env:` and Kiln's own variables, shown by `kiln
/// status` and signed into the release's provenance.
#[tokio::test(flavor = "multi_thread")]
async fn params_env_and_kiln_variables_reach_every_stage() -> Result<()> {
    let farm = Farm::start(&Default::default(), &[("vars-agent", "", 2)])?;
    let repo = Repo::new(VARS)?;
    let commit = repo.commit("README", "vars\n")?;
    let dir = repo.path().to_str().unwrap();
    let added = farm.coordinator.kiln(&["repo", "add", dir]);
    ensure!(added.status.success(), "{}", stderr(&added));

    let ran = farm.coordinator.kiln(&[
        "--output",
        "json",
        "run",
        "vars",
        "-p",
        "EPOCHS=20",
        "--wait",
    ]);
    ensure!(ran.status.success(), "{} {}", stdout(&ran), stderr(&ran));
    let run: serde_json::Value = serde_json::from_slice(&ran.stdout)?;
    let id = run["id"].as_u64().context("a run id")?;
    assert_eq!(
        run["params"],
        serde_json::json!({"EPOCHS": "20", "MODE": "fast"})
    );
    assert_eq!(
        line_starting(&farm, id, "show", "params ").await?,
        "params epochs=20 mode=fast region=eu"
    );
    assert_eq!(
        line_starting(&farm, id, "show", "ids ").await?,
        format!("ids run={id} pipeline=vars stage=show attempt=1")
    );
    assert_eq!(
        line_starting(&farm, id, "show", "source ").await?,
        format!("source commit={commit} branch=main tag= event=manual")
    );
    assert_eq!(
        line_starting(&farm, id, "deploy", "deploy ").await?,
        "deploy with 20 epochs"
    );
    let status = farm.coordinator.kiln(&["status", &id.to_string()]);
    ensure!(
        stdout(&status).contains("params     EPOCHS=20 MODE=fast")
            && stdout(&status).contains("KILN_BRANCH=main KILN_EVENT=manual"),
        "{}",
        stdout(&status)
    );

    // The release's signed lineage records the parameters.
    let mut client = farm.coordinator.client().await?;
    let releases = client
        .environment_history(pb::EnvironmentHistoryRequest {
            environment: "staging".into(),
            pipeline: "vars".into(),
        })
        .await?
        .into_inner()
        .releases;
    let release = releases.first().context("a release")?.id.to_string();
    let statement = kiln_tests::eventually(LIMIT, "the release to be signed", || {
        let output = farm
            .coordinator
            .kiln(&["release", "provenance", &release, "--statement"]);
        async move { Ok(output.status.success().then(|| stdout(&output))) }
    })
    .await?;
    let statement: serde_json::Value = serde_json::from_str(&statement)?;
    assert_eq!(
        statement["predicate"]["buildDefinition"]["externalParameters"]["parameters"],
        serde_json::json!({"EPOCHS": "20", "MODE": "fast"})
    );

    // Wrong values start nothing and say what is expected.
    for (flag, expected) in [
        (
            "EPOCHS=ten",
            "parameter `EPOCHS` is an int (like `10` or `-3`); `ten` is not",
        ),
        (
            "MODE=slow",
            "parameter `MODE` is one of: fast, full; `slow` is not",
        ),
        (
            "NOPE=1",
            "the pipeline has no parameter `NOPE`; it has: EPOCHS, MODE",
        ),
    ] {
        let refused = farm.coordinator.kiln(&["run", "vars", "-p", flag]);
        assert_eq!(refused.status.code(), Some(2), "{flag}");
        ensure!(
            stderr(&refused).contains(expected),
            "{flag}: {}",
            stderr(&refused)
        );
    }
    let runs = client
        .list_runs(pb::ListRunsRequest {
            pipeline: "vars".into(),
            limit: 10,
        })
        .await?
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 1, "refused values started no run");

    // A tag: KILN_TAG, no branch; defaults fill in.
    let tagged = std::process::Command::new("git")
        .args(["-C", dir, "tag", "v1"])
        .status()?;
    ensure!(tagged.success());
    let run = run_at(&farm, "vars", "v1").await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    assert_eq!(
        line_starting(&farm, run.id, "show", "source ").await?,
        format!("source commit={commit} branch= tag=v1 event=manual")
    );
    assert_eq!(
        line_starting(&farm, run.id, "show", "params ").await?,
        "params epochs=10 mode=fast region=eu"
    );
    Ok(())
}
