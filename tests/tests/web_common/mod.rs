//! What the dashboard's HTTP and browser tests share: the farm they start,
//! the pipelines they run, and reads of its state through gRPC.
// Each test binary uses part of this.
#![allow(dead_code)]

use std::time::Duration;

use anyhow::Result;
use kiln_proto::v1 as pb;
use kiln_tests::{CoordinatorOptions, Farm, eventually, get_run, stage};

pub(crate) const GATED: &str = r#"
pipeline: careful
stages:
  evaluate:
    commands: ["mkdir -p b", "echo '{\"auc\": 0.9}' > b/m.json"]
    metrics: b/m.json
  signoff:
    needs: [evaluate]
    gate: { require: { auc: ">= 0.8" }, approval: manual }
  ship:
    needs: [signoff]
    environment: prod
    commands: ["echo shipped"]
"#;

pub(crate) const SHOP: &str = r#"
pipeline: shop
stages:
  build:
    commands: ["mkdir -p out", "echo v > out/model", "cp metrics.json out/metrics.json"]
    artifacts: [out]
    metrics: out/metrics.json
  deploy:
    needs: [build]
    environment: production
    commands: ["cat out/model"]
"#;

pub(crate) const LIVE: &str = r#"
pipeline: live
stages:
  prepare:
    commands: ["echo ready"]
  train:
    needs: [prepare]
    commands: ["for i in $(seq 1 60); do if [ $((i % 2)) -eq 0 ]; then printf '\\033[32mline %s\\033[0m\\n' $i; else echo line $i; fi; sleep 0.25; done"]
  report:
    needs: [train]
    commands: ["echo done"]
"#;

pub(crate) const QUICK: &str = r#"
pipeline: quick
stages:
  count:
    commands: ["for i in $(seq 1 30); do echo line $i; done"]
"#;

pub(crate) fn farm() -> Result<Farm> {
    Farm::start(&CoordinatorOptions::default(), &[("web-agent", "", 2)])
}

pub(crate) fn base(farm: &Farm) -> String {
    format!("http://{}", farm.coordinator.http)
}

pub(crate) async fn audit(farm: &Farm) -> Result<Vec<pb::AuditEntry>> {
    let mut client = farm.coordinator.client().await?;
    Ok(client
        .list_audit(pb::ListAuditRequest { limit: 100 })
        .await?
        .into_inner()
        .entries)
}

pub(crate) fn run_state(run: &pb::Run) -> pb::RunState {
    pb::RunState::try_from(run.state).unwrap()
}

pub(crate) fn stage_state(run: &pb::Run, name: &str) -> pb::StageState {
    pb::StageState::try_from(stage(run, name).state).unwrap()
}

pub(crate) async fn wait_stage(
    farm: &Farm,
    run: u64,
    name: &str,
    state: pb::StageState,
) -> Result<()> {
    let client = farm.coordinator.client().await?;
    eventually(
        Duration::from_secs(30),
        &format!("{name} to be {state:?}"),
        || {
            let mut client = client.clone();
            async move {
                Ok((stage_state(&get_run(&mut client, run).await?, name) == state).then_some(()))
            }
        },
    )
    .await
}
