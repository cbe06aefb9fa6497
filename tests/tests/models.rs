//! Models end to end on real processes: every release is a version of the
//! model its environment stage names (`churn@N`), `kiln promote` deploys
//! a version that stopped in staging to production — its exact artifacts,
//! no training, the production gate checked again and its approval
//! respected — a promote the gate refuses changes nothing, aliases follow
//! the environments (a rollback included) or are set by hand, `kiln model
//! compare` shows two versions side by side, and all of it survives a
//! coordinator restart.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kiln_proto::v1 as pb;
use kiln_tests::delivery::{history, release_state, state, webhook};
use kiln_tests::{CoordinatorOptions, Farm, Repo, eventually, get_run, stage, wait_run};

/// A pipeline whose `train` counts its runs in `serve/trained`, and whose
/// production gate waits for a person.
fn churn(serve: &Path) -> String {
    let serve = serve.display();
    format!(
        r#"
pipeline: churn
stages:
  train:
    commands: ["mkdir -p build/model", "cp model.txt build/model/weights", "echo trained >> {serve}/trained"]
    artifacts: [build/model]
  evaluate:
    needs: [train]
    commands: ["mkdir -p build", "cp metrics.json build/metrics.json"]
    metrics: build/metrics.json
  deploy-staging:
    needs: [train, evaluate]
    environment: staging
    model: churn
    commands: ["cp build/model/weights {serve}/staging"]
  acceptance:
    needs: [deploy-staging]
    gate:
      require: {{ recall: ">= 0.5" }}
      compare_to: production
      max_regression: {{ recall: 0.1 }}
      approval: manual
  deploy-production:
    needs: [train, acceptance]
    environment: production
    model: churn
    commands: ["cp build/model/weights {serve}/production"]
"#
    )
}

/// `kiln ARGS`, which must succeed; its standard output.
fn kiln_ok(farm: &Farm, args: &[&str]) -> Result<String> {
    let out = farm.coordinator.kiln(args);
    ensure!(
        out.status.success(),
        "kiln {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn kiln_json(farm: &Farm, args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["--output", "json"];
    all.extend(args);
    Ok(serde_json::from_str(&kiln_ok(farm, &all)?)?)
}

/// Waits until stage `gate` of `run` waits for approval.
async fn awaiting(farm: &Farm, run: u64, gate: &str) -> Result<()> {
    let client = farm.coordinator.client().await?;
    eventually(
        Duration::from_secs(60),
        "the gate to wait for approval",
        || {
            let mut client = client.clone();
            async move {
                let run = get_run(&mut client, run).await?;
                Ok((state(stage(&run, gate)) == pb::StageState::AwaitingApproval).then_some(()))
            }
        },
    )
    .await
}

/// Commits a model and its metrics and runs the pipeline; the run stops at
/// the manual gate (approved or rejected with `verdict`) or fails it.
async fn train(
    farm: &Farm,
    repo: &Repo,
    model: &str,
    recall: f64,
    verdict: Option<&str>,
) -> Result<pb::Run> {
    repo.commit("model.txt", model)?;
    repo.commit("metrics.json", &format!(r#"{{"recall": {recall}}}"#))?;
    let id: u64 = kiln_ok(farm, &["run", "churn"])?.trim().parse()?;
    if let Some(verdict) = verdict {
        awaiting(farm, id, "acceptance").await?;
        kiln_ok(farm, &[verdict, &id.to_string(), "acceptance"])?;
    }
    let mut client = farm.coordinator.client().await?;
    wait_run(&mut client, id, Duration::from_secs(60)).await
}

fn trained(serve: &Path) -> usize {
    std::fs::read_to_string(serve.join("trained"))
        .unwrap_or_default()
        .lines()
        .count()
}

fn version_of(release: &pb::Release) -> String {
    format!("{}@{}", release.model, release.model_version)
}

#[tokio::test(flavor = "multi_thread")]
async fn versions_promote_aliases_compare_and_a_restart() -> Result<()> {
    let serve = tempfile::tempdir()?;
    let (hook, _alerts) = webhook().await?;
    let options = CoordinatorOptions {
        extra_args: vec!["--alert-webhook-url".into(), hook],
        ..Default::default()
    };
    let mut farm = Farm::start(&options, &[("deliver", "", 2)])?;
    let repo = Repo::new(&churn(serve.path()))?;
    kiln_ok(
        &farm,
        &["pipeline", "register", repo.path().to_str().unwrap()],
    )?;

    // churn@1 goes through staging and, approved, to production.
    let first = train(&farm, &repo, "good-1\n", 0.8, Some("approve")).await?;
    assert_eq!(first.state, pb::RunState::Succeeded as i32, "{first:#?}");
    let production = history(&farm, "churn/production").await?;
    assert_eq!(version_of(&production[0]), "churn@1");
    assert_eq!(
        version_of(&history(&farm, "churn/staging").await?[0]),
        "churn@1"
    );

    // churn@2 reaches staging; the person rejects it for production.
    let second = train(&farm, &repo, "good-2\n", 0.85, Some("reject")).await?;
    assert_eq!(second.state, pb::RunState::Failed as i32);
    let staging_2 = history(&farm, "churn/staging").await?[0].clone();
    assert_eq!(version_of(&staging_2), "churn@2");
    assert_eq!(history(&farm, "churn/production").await?.len(), 1);

    // Promote it after all: the gate is checked again on churn@2's
    // recorded metrics against production's champion, and waits for the
    // approval production requires; nothing is trained.
    let trained_before = trained(serve.path());
    let runs_before = kiln_json(&farm, &["runs"])?.as_array().unwrap().len();
    let out = kiln_ok(&farm, &["promote", "churn@2", "--to", "production"])?;
    assert!(
        out.contains("promoting churn@2 to production") && out.contains("kiln approve"),
        "{out}"
    );
    let promote_run: u64 = out
        .split("(run ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .context("the run id")?
        .parse()?;
    let mut client = farm.coordinator.client().await?;
    let waiting = get_run(&mut client, promote_run).await?;
    let gate = stage(&waiting, "acceptance").gate.clone().unwrap();
    let check = gate
        .checks
        .iter()
        .find(|c| c.rule.contains("vs production"))
        .unwrap();
    assert_eq!((check.value, check.champion), (Some(0.85), Some(0.8)));
    assert_eq!(state(stage(&waiting, "train")), pb::StageState::Skipped);
    kiln_ok(&farm, &["approve", &promote_run.to_string(), "acceptance"])?;
    let done = wait_run(&mut client, promote_run, Duration::from_secs(60)).await?;
    assert_eq!(done.state, pb::RunState::Succeeded as i32, "{done:#?}");
    assert_eq!(trained(serve.path()), trained_before, "no training run");
    assert_eq!(
        std::fs::read_to_string(serve.path().join("production"))?.trim(),
        "good-2",
        "production serves churn@2's exact model"
    );
    let promoted = history(&farm, "churn/production").await?[0].clone();
    assert_eq!(version_of(&promoted), "churn@2");
    assert_eq!(release_state(&promoted), pb::ReleaseState::Live);
    assert_eq!(promoted.artifacts, staging_2.artifacts, "the same digests");
    assert_eq!(promoted.image_digest, staging_2.image_digest);
    let promotion = promoted.promotion.clone().context("a promotion record")?;
    assert_eq!(
        (promotion.by.as_str(), promotion.from_release),
        ("admin", staging_2.id)
    );
    let recorded = &promoted.gates[0].decision.as_ref().unwrap();
    assert!(recorded.passed && recorded.summary.contains("promote of churn@2"));
    let env_history = kiln_ok(&farm, &["env", "history", "churn/production"])?;
    assert!(
        env_history.contains(&format!("promoted from release {} by admin", staging_2.id)),
        "{env_history}"
    );

    // The dashboard's models pages show the version and how it got there.
    let page = |path: String| {
        let farm = &farm;
        async move {
            anyhow::Ok(
                reqwest::Client::new()
                    .get(format!("http://{}{path}", farm.coordinator.http))
                    .bearer_auth(&farm.coordinator.admin_token)
                    .send()
                    .await?
                    .text()
                    .await?,
            )
        }
    };
    let list = page("/models".into()).await?;
    assert!(list.contains(r#"href="/models/churn@2""#), "{list}");
    let version = page("/models/churn@production".into()).await?;
    assert!(version.contains("<h1>churn@2</h1>"), "{version}");
    assert!(
        version.contains(&format!("promoted from release {} by admin", staging_2.id)),
        "{version}"
    );

    // churn@3 fails the gate in its own run; promoting it is refused with
    // the gate's values, and nothing changes.
    let third = train(&farm, &repo, "weak\n", 0.6, None).await?;
    assert_eq!(third.state, pb::RunState::Failed as i32);
    let production_before = history(&farm, "churn/production").await?;
    let runs_before_refusal = kiln_json(&farm, &["runs"])?.as_array().unwrap().len();
    let refused = farm
        .coordinator
        .kiln(&["promote", "churn@3", "--to", "production"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("refused; nothing changed"), "{stderr}");
    assert!(stderr.contains("gate `acceptance`"), "{stderr}");
    assert!(stderr.contains("0.6"), "the value that decided: {stderr}");
    assert_eq!(history(&farm, "churn/production").await?, production_before);
    assert_eq!(
        kiln_json(&farm, &["runs"])?.as_array().unwrap().len(),
        runs_before_refusal,
        "no run was started"
    );
    assert_eq!(
        runs_before_refusal,
        runs_before + 2,
        "the promote and churn@3's"
    );

    // Aliases: the environments', and one set by hand.
    kiln_ok(&farm, &["model", "alias", "churn@1", "champion"])?;
    let models = kiln_json(&farm, &["model", "ls"])?;
    let aliases = &models[0]["aliases"];
    assert_eq!(models[0]["name"], "churn");
    assert_eq!(
        (
            aliases["production"].as_u64(),
            aliases["staging"].as_u64(),
            aliases["champion"].as_u64()
        ),
        (Some(2), Some(3), Some(1)),
        "{models}"
    );
    let refused = farm
        .coordinator
        .kiln(&["model", "alias", "churn@1", "production"]);
    assert!(
        !refused.status.success(),
        "production follows the environment"
    );

    // A rollback moves the production alias back to churn@1.
    kiln_ok(&farm, &["rollback", "churn/production"])?;
    eventually(Duration::from_secs(60), "the rollback", || {
        let farm = &farm;
        async move {
            let shown = kiln_json(farm, &["model", "show", "churn@production"])?;
            Ok((shown["version"] == 1).then_some(()))
        }
    })
    .await?;
    let shown = kiln_json(&farm, &["model", "show", "churn@production"])?;
    let aliases: Vec<&str> = shown["aliases"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(aliases, ["champion", "production"], "{shown}");
    assert_eq!(shown["metrics"]["recall"], 0.8);
    assert_eq!(shown["run_id"], first.id);
    assert_eq!(shown["commit"], first.commit);

    // Two versions side by side.
    let compared = kiln_json(&farm, &["model", "compare", "churn@1", "churn@2"])?;
    let recall = compared["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["metric"] == "recall")
        .cloned()
        .unwrap();
    assert_eq!(
        (recall["a"].as_f64(), recall["b"].as_f64()),
        (Some(0.8), Some(0.85))
    );
    let diff = recall["diff"].as_f64().unwrap();
    assert!((diff - 0.05).abs() < 1e-9, "{diff}");
    let runs: Vec<&serde_json::Value> = compared["lineage"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["field"] == "run" || row["field"] == "commit")
        .collect();
    assert_eq!(runs[0]["a"], first.id.to_string());
    assert_eq!(runs[0]["b"], second.id.to_string());
    assert_eq!(runs[1]["b"], second.commit);
    let table = kiln_ok(&farm, &["model", "compare", "churn@1", "churn@2"])?;
    assert!(table.contains("+0.0500"), "{table}");

    // Killed and started again: versions and aliases are all there, and
    // the next run is the next version.
    farm.coordinator
        .crash_and_restart(&options, Duration::from_millis(300))?;
    let shown = kiln_json(&farm, &["model", "show", "churn@champion"])?;
    assert_eq!(shown["version"], 1);
    let models = kiln_json(&farm, &["model", "ls"])?;
    let versions: Vec<u64> = models[0]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["version"].as_u64())
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    assert_eq!(models[0]["aliases"]["production"], 1);
    let fourth = train(&farm, &repo, "good-4\n", 0.9, Some("approve")).await?;
    assert_eq!(fourth.state, pb::RunState::Succeeded as i32, "{fourth:#?}");
    let live = history(&farm, "churn/production").await?[0].clone();
    assert_eq!(version_of(&live), "churn@4");
    kiln_ok(&farm, &["model", "alias", "--rm", "churn", "champion"])?;
    let models = kiln_json(&farm, &["model", "ls"])?;
    assert!(models[0]["aliases"].get("champion").is_none(), "{models}");
    Ok(())
}
