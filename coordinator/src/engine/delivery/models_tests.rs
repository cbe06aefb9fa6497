//! Models in the delivery controller on its own: versions, aliases and
//! promote planning, with runs lent as plain records (see `tests.rs`).

use std::collections::BTreeMap;

use kiln_common::ids::EnvKey;
use kiln_common::spec;

use super::models::aliases_of;
use super::tests::{Run, controller};
use super::*;
use crate::store::ArtifactRecord;

const CHURN: &str = "
pipeline: churn
stages:
  evaluate: { commands: [x], metrics: m.json }
  deploy-staging:
    needs: [evaluate]
    environment: staging
    model: churn
    commands: [x]
  acceptance:
    needs: [deploy-staging]
    gate:
      require: { recall: \">= 0.5\" }
      compare_to: production
      max_regression: { recall: 10% }
  deploy-production:
    needs: [acceptance]
    environment: production
    model: churn
    commands: [x]
";

fn env(name: &str) -> EnvKey {
    EnvKey::of_pipeline("churn", name)
}

/// `run` trains a model with `recall` and deploys it to staging only.
fn to_staging(delivery: &mut DeliveryController, id: u64, recall: f64) -> Run {
    let mut run = Run::new(CHURN, id, recall);
    run.stages[0].outputs = vec![ArtifactRecord {
        path: "model".into(),
        digest: format!("sha256:{}", format!("{id}").repeat(64)),
        size: 1,
    }];
    let idx = run.idx("deploy-staging");
    run.stages[idx].image_digest = Some(format!("kiln/python-ml@sha256:{}", "a".repeat(64)));
    delivery.deployed(&run.view(), idx, id * 10);
    run
}

fn promote(
    delivery: &mut DeliveryController,
    reference: &str,
    to: &str,
) -> Result<PromoteStart, crate::error::ApiError> {
    let spec = spec::parse("kiln.yml", CHURN).unwrap();
    delivery.plan_promote(
        &PromoteRequest {
            reference,
            environment: to,
            user: "ada",
            run_stages: None,
        },
        &spec,
        None,
        1_000,
    )
}

/// The promote run's environment stage succeeded, as the run book reports.
fn promoted(delivery: &mut DeliveryController, start: PromoteStart, run: u64) {
    let mut promote_run = Run::new(CHURN, run, 0.0);
    promote_run.record.promote = Some(start.plan);
    let idx = promote_run.idx("deploy-production");
    promote_run.stages[idx].image_digest = start.source.image_digest.clone();
    delivery.deployed(&promote_run.view(), idx, run * 10);
}

#[test]
fn every_run_is_a_version_and_its_releases_share_it() {
    let mut delivery = controller();
    to_staging(&mut delivery, 1, 0.9);
    let run = to_staging(&mut delivery, 2, 0.8);
    // Run 2 also reaches production: the same version.
    delivery.deployed(&run.view(), run.idx("deploy-production"), 25);
    let versions: Vec<(u64, String)> = delivery
        .history(&env("staging"))
        .into_iter()
        .chain(delivery.history(&env("production")))
        .map(|r| (r.id, r.model.as_ref().unwrap().to_string()))
        .collect();
    assert_eq!(
        versions,
        [
            (1, "churn@1".into()),
            (2, "churn@2".into()),
            (3, "churn@2".into())
        ]
    );
    assert_eq!(
        aliases_of(&delivery, "churn"),
        BTreeMap::from([("production".into(), 2), ("staging".into(), 2)])
    );
    // A restart numbers on from the stored releases.
    let releases: Vec<ReleaseRecord> = [1, 2, 3]
        .iter()
        .map(|&id| delivery.release(id).unwrap().clone())
        .collect();
    let mut reloaded = DeliveryController::load(Vec::new(), releases, Default::default());
    to_staging(&mut reloaded, 4, 0.7);
    assert_eq!(
        reloaded.release(4).unwrap().model.as_ref().unwrap().version,
        3
    );
}

#[test]
fn a_promote_deploys_the_versions_exact_artifacts_after_its_gates_pass_again() {
    let mut delivery = controller();
    to_staging(&mut delivery, 1, 0.9);
    let start = promote(&mut delivery, "churn@1", "production").unwrap();
    assert_eq!(start.plan.stage, "deploy-production");
    assert_eq!(start.plan.from_release, 1);
    assert_eq!(start.plan.gates, ["acceptance"]);
    assert_eq!(
        start.plan.inputs,
        delivery.release(1).unwrap().artifacts,
        "the staging release's artifacts (its own outputs aside)"
    );
    let (_, decision, manual) = &start.gates[0];
    assert!(decision.passed && !manual);
    assert_eq!(decision.checks[0].value, Some(0.9));
    promoted(&mut delivery, start, 7);

    let live = delivery.live(&env("production")).unwrap();
    let release = delivery.release(live).unwrap();
    let source = delivery.release(1).unwrap();
    assert_eq!(release.model, source.model);
    assert_eq!(release.artifacts, source.artifacts);
    assert_eq!(release.image_digest, source.image_digest);
    assert_eq!(release.metrics, source.metrics);
    let promotion = release.promotion.as_ref().unwrap();
    assert_eq!((promotion.by.as_str(), promotion.from_release), ("ada", 1));
    assert_eq!(aliases_of(&delivery, "churn")["production"], 1);

    let again = promote(&mut delivery, "churn@production", "production");
    assert!(
        again.err().unwrap().to_string().contains("already live"),
        "the same version twice"
    );
}

#[test]
fn a_promote_refused_by_a_gate_says_why_and_changes_nothing() {
    let mut delivery = controller();
    to_staging(&mut delivery, 1, 0.9);
    let start = promote(&mut delivery, "churn@1", "production").unwrap();
    promoted(&mut delivery, start, 2);
    to_staging(&mut delivery, 3, 0.6);
    let before: Vec<ReleaseRecord> = (1..=4)
        .filter_map(|id| delivery.release(id).cloned())
        .collect();
    let refused = promote(&mut delivery, "churn@2", "production")
        .err()
        .unwrap()
        .to_string();
    assert!(refused.contains("refused; nothing changed"), "{refused}");
    assert!(refused.contains("gate `acceptance`"), "{refused}");
    assert!(refused.contains("vs champion 0.9000"), "{refused}");
    let after: Vec<ReleaseRecord> = (1..=4)
        .filter_map(|id| delivery.release(id).cloned())
        .collect();
    assert_eq!(before, after);
    assert_eq!(aliases_of(&delivery, "churn")["production"], 1);

    let unknown = promote(&mut delivery, "churn@1", "canary").err().unwrap();
    assert!(
        unknown
            .to_string()
            .contains("no stage with `environment: canary`"),
        "{unknown}"
    );
}

#[test]
fn user_aliases_point_at_versions_and_environment_aliases_cannot_be_set() {
    let mut delivery = controller();
    to_staging(&mut delivery, 1, 0.9);
    to_staging(&mut delivery, 2, 0.8);
    let op = delivery.set_alias("churn@1", "champion", "ada", 5).unwrap();
    let Op::ModelAlias(record) = op else {
        panic!("{op:?}");
    };
    assert_eq!((record.version, record.set_by.as_str()), (1, "ada"));
    delivery
        .set_alias("churn@staging", "challenger", "ada", 6)
        .unwrap();
    assert_eq!(
        aliases_of(&delivery, "churn"),
        BTreeMap::from([
            ("challenger".into(), 2),
            ("champion".into(), 1),
            ("staging".into(), 2)
        ])
    );
    assert!(delivery.set_alias("churn@1", "staging", "ada", 7).is_err());
    assert!(delivery.set_alias("churn@9", "x", "ada", 7).is_err());
    assert!(matches!(
        delivery.remove_alias("churn", "champion"),
        Ok(Op::RemoveModelAlias(..))
    ));
    assert!(delivery.remove_alias("churn", "champion").is_err());
    assert!(!aliases_of(&delivery, "churn").contains_key("champion"));
}
