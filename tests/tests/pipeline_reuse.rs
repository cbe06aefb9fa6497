//! Include and reuse, against a real coordinator, a real agent and real
//! git: `include:` of other files read at the commit being built,
//! `extends:` of a hidden template, YAML merge keys; an error in an
//! included file fails the run naming that file, line and column, and the
//! next commit runs again.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kiln_proto::v1 as pb;
use kiln_tests::{Farm, Repo, logs, stage, wait_run};

const LIMIT: Duration = Duration::from_secs(60);

const ROOT: &str = r#"include: [ci/templates.yml]
pipeline: reuse
.env: &shared
  REGION: eu
  TIER: gold
stages:
  build:
    extends: .shell
    env:
      <<: *shared
      TIER: silver
    commands: ['echo "build region=$REGION tier=$TIER from=$FROM"']
"#;

const TEMPLATES: &str = r#"include: lint.yml
stages:
  .shell:
    env: { FROM: template, TIER: bronze }
    timeout: 5m
"#;

const LINT: &str = r#"stages:
  lint:
    extends: .shell
    commands: ['echo "lint from=$FROM"']
"#;

/// `comands` on line 3, column 5 of `ci/lint.yml`.
const LINT_BROKEN: &str = "stages:\n  lint:\n    comands: [x]\n";

async fn run_head(farm: &Farm) -> Result<pb::Run> {
    let mut client = farm.coordinator.client().await?;
    let run = client
        .trigger_run(pb::TriggerRunRequest {
            pipeline: "reuse".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    wait_run(&mut client, run.id, LIMIT).await
}

async fn lines(farm: &Farm, run: u64, stage: &str) -> Result<Vec<String>> {
    let mut client = farm.coordinator.client().await?;
    Ok(logs(&mut client, run, stage)
        .await?
        .into_iter()
        .filter_map(|entry| entry.line.map(|line| line.text))
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn included_files_templates_and_merge_keys_build_the_run() -> Result<()> {
    let farm = Farm::start(&Default::default(), &[("reuse-agent", "", 2)])?;
    let repo = Repo::new(ROOT)?;
    repo.commit("ci/templates.yml", TEMPLATES)?;
    repo.commit("ci/lint.yml", LINT)?;
    farm.coordinator.add_repo(&repo, &[])?;

    let run = run_head(&farm).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    let names: Vec<&str> = run.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["lint", "build"],
        "included stages first, templates never run"
    );
    // Merge key below the stage's own key, template below both.
    let build = lines(&farm, run.id, "build").await?;
    ensure!(
        build
            .iter()
            .any(|l| l == "build region=eu tier=silver from=template"),
        "{build:#?}"
    );
    let lint = lines(&farm, run.id, "lint").await?;
    ensure!(lint.iter().any(|l| l == "lint from=template"), "{lint:#?}");
    let version = run.pipeline_version;

    // Changing only an included file makes a new version: its digest
    // covers every file.
    repo.commit("ci/lint.yml", &LINT.replace("lint from", "linted from"))?;
    let run = run_head(&farm).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    assert_eq!(run.pipeline_version, version + 1);
    let lint = lines(&farm, run.id, "lint").await?;
    ensure!(
        lint.iter().any(|l| l == "linted from=template"),
        "{lint:#?}"
    );

    // A mistake in an included file fails the run at once, naming that
    // file, line and column.
    repo.commit("ci/lint.yml", LINT_BROKEN)?;
    let run = run_head(&farm).await?;
    assert_eq!(run.state, pb::RunState::Failed as i32, "{run:#?}");
    let refused = stage(&run, "kiln.yml");
    ensure!(
        refused
            .message
            .starts_with("ci/lint.yml:3:5: unknown key `comands`"),
        "{}",
        refused.message
    );

    // An include that names no file points at the include line.
    repo.commit("ci/lint.yml", LINT)?;
    repo.commit("kiln.yml", &ROOT.replace("ci/templates.yml", "ci/nope.yml"))?;
    let run = run_head(&farm).await?;
    assert_eq!(run.state, pb::RunState::Failed as i32, "{run:#?}");
    let refused = stage(&run, "kiln.yml");
    ensure!(
        refused.message.starts_with(
            "kiln.yml:1:11: `ci/nope.yml` (included from kiln.yml) is not in the repository"
        ),
        "{}",
        refused.message
    );

    // The next good commit runs again.
    repo.commit("kiln.yml", ROOT)?;
    let run = run_head(&farm).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    let build = lines(&farm, run.id, "build")
        .await
        .context("build log after the fix")?;
    ensure!(
        build.iter().any(|l| l.starts_with("build region=eu")),
        "{build:#?}"
    );
    Ok(())
}
