//! `kiln env ls|history|unfreeze`, `kiln release show`, `kiln approve`,
//! `kiln reject`, `kiln rollback`.

use std::collections::BTreeMap;

use kiln_common::ids::EnvKey;
use kiln_proto::v1 as pb;
use serde::Serialize;

use crate::args::{DecideArgs, OutputFormat, RollbackArgs};
use crate::client::Coordinator;
use crate::commands::runs;
use crate::error::{CliError, Outcome};
use crate::view::{GateView, RunView};
use crate::{output, timefmt};

/// An environment of a pipeline. JSON: `{pipeline, name, live_release,
/// frozen}`.
#[derive(Debug, Serialize)]
struct EnvironmentView {
    pipeline: String,
    name: String,
    live_release: Option<u64>,
    frozen: Option<String>,
}

/// A release. JSON: `{id, environment, state, run_id, pipeline,
/// pipeline_version, repo, commit, source_digest, stage, image_digest,
/// endpoint, triggered_by, created_ms, reason, restored_by_rollback, metrics,
/// artifacts: [{stage, path, digest, size}], gates: [{stage, gate}],
/// datasets: [{source, path, digest, content_digest}], provenance_digest,
/// model, promotion: {by, at_ms, from_release}}`.
#[derive(Debug, Serialize)]
pub(crate) struct ReleaseView {
    pub(crate) id: u64,
    pub(crate) environment: String,
    pub(crate) state: &'static str,
    pub(crate) run_id: u64,
    pub(crate) pipeline: String,
    pipeline_version: u32,
    /// Where the pipeline's git source lives; null for a pipeline
    /// registered without one.
    repo: Option<String>,
    commit: String,
    source_digest: Option<String>,
    stage: String,
    pub(crate) image_digest: Option<String>,
    /// Where it is served (its stage's `endpoint:`); null if not said.
    endpoint: Option<String>,
    triggered_by: String,
    created_ms: u64,
    reason: Option<String>,
    restored_by_rollback: bool,
    metrics: BTreeMap<String, f64>,
    pub(crate) artifacts: Vec<ArtifactRef>,
    pub(crate) gates: Vec<NamedGate>,
    datasets: Vec<DatasetRef>,
    /// sha256 of the signed provenance envelope; null until signed.
    provenance_digest: Option<String>,
    /// The model version it is (`churn@3`); null if its stage names none.
    pub(crate) model: Option<String>,
    /// Set when `kiln promote` made it.
    pub(crate) promotion: Option<PromotionView>,
}

/// Who promoted a release, when, and from which release.
#[derive(Debug, Serialize)]
pub(crate) struct PromotionView {
    pub(crate) by: String,
    pub(crate) at_ms: u64,
    pub(crate) from_release: u64,
}

#[derive(Debug, Serialize)]
struct DatasetRef {
    source: String,
    path: String,
    digest: String,
    content_digest: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct ArtifactRef {
    pub(crate) stage: String,
    pub(crate) path: String,
    pub(crate) digest: String,
    size: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct NamedGate {
    pub(crate) stage: String,
    pub(crate) gate: Option<GateView>,
}

impl From<pb::Environment> for EnvironmentView {
    fn from(env: pb::Environment) -> Self {
        EnvironmentView {
            pipeline: env.pipeline,
            name: env.name,
            live_release: (env.live_release != 0).then_some(env.live_release),
            frozen: some(env.frozen),
        }
    }
}

fn some(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

impl From<pb::Release> for ReleaseView {
    fn from(release: pb::Release) -> Self {
        let state = match release.state() {
            pb::ReleaseState::Live => "live",
            pb::ReleaseState::Superseded => "superseded",
            pb::ReleaseState::RolledBack => "rolled_back",
            pb::ReleaseState::RollingOut => "rolling_out",
            pb::ReleaseState::Aborted => "aborted",
            pb::ReleaseState::Unspecified => "unknown",
        };
        ReleaseView {
            id: release.id,
            environment: release.environment,
            state,
            run_id: release.run_id,
            pipeline: release.pipeline,
            pipeline_version: release.pipeline_version,
            repo: some(release.repo),
            commit: release.commit,
            source_digest: some(release.source_digest),
            stage: release.stage,
            image_digest: some(release.image_digest),
            endpoint: some(release.endpoint),
            triggered_by: release.triggered_by,
            created_ms: release.created_ms,
            reason: some(release.reason),
            restored_by_rollback: release.restored_by_rollback,
            metrics: release.metrics.into_iter().collect(),
            artifacts: release
                .artifacts
                .into_iter()
                .map(|a| ArtifactRef {
                    stage: a.stage,
                    path: a.path,
                    digest: a.digest,
                    size: a.size,
                })
                .collect(),
            gates: release
                .gates
                .into_iter()
                .map(|g| NamedGate {
                    stage: g.stage,
                    gate: g.decision.map(GateView::from),
                })
                .collect(),
            datasets: release
                .datasets
                .into_iter()
                .map(|d| DatasetRef {
                    source: d.source,
                    path: d.path,
                    digest: d.digest,
                    content_digest: d.content_digest,
                })
                .collect(),
            provenance_digest: some(release.provenance_digest),
            model: (!release.model.is_empty())
                .then(|| format!("{}@{}", release.model, release.model_version)),
            promotion: release.promotion.map(|p| PromotionView {
                by: p.by,
                at_ms: p.at_ms,
                from_release: p.from_release,
            }),
        }
    }
}

/// `kiln env ls`.
pub(crate) async fn environments(
    c: &Coordinator,
    format: OutputFormat,
) -> Result<Outcome, CliError> {
    let reply = c
        .control()
        .list_environments(pb::ListEnvironmentsRequest {})
        .await
        .map_err(|s| c.failed(s))?;
    let environments: Vec<EnvironmentView> = reply
        .into_inner()
        .environments
        .into_iter()
        .map(EnvironmentView::from)
        .collect();
    match format {
        OutputFormat::Json => output::json(&environments)?,
        OutputFormat::Table => {
            let rows: Vec<[String; 3]> = environments
                .iter()
                .map(|e| {
                    [
                        format!("{}/{}", e.pipeline, e.name),
                        e.live_release.map_or("-".into(), |id| id.to_string()),
                        e.frozen
                            .clone()
                            .map_or("no".into(), |why| format!("yes: {why}")),
                    ]
                })
                .collect();
            output::line(
                output::table(["ENVIRONMENT", "LIVE_RELEASE", "FROZEN"], &rows).trim_end(),
            )?;
        }
    }
    Ok(Outcome::Ok)
}

/// `kiln env history ENV`.
pub(crate) async fn history(
    c: &Coordinator,
    format: OutputFormat,
    environment: &str,
) -> Result<Outcome, CliError> {
    let (pipeline, environment) = EnvKey::parse_reference(environment);
    let request = pb::EnvironmentHistoryRequest {
        environment: environment.to_owned(),
        pipeline: pipeline.unwrap_or_default().to_owned(),
    };
    let reply = c
        .control()
        .environment_history(request)
        .await
        .map_err(|s| c.failed(s))?;
    let releases: Vec<ReleaseView> = reply
        .into_inner()
        .releases
        .into_iter()
        .map(ReleaseView::from)
        .collect();
    match format {
        OutputFormat::Json => output::json(&releases)?,
        OutputFormat::Table => output::line(history_table(&releases).trim_end())?,
    }
    Ok(Outcome::Ok)
}

fn history_table(releases: &[ReleaseView]) -> String {
    let now = timefmt::now_ms();
    let rows: Vec<[String; 7]> = releases
        .iter()
        .map(|r| {
            let promoted = r
                .promotion
                .as_ref()
                .map(|p| format!("promoted from release {} by {}", p.from_release, p.by));
            [
                r.id.to_string(),
                r.state.to_owned(),
                r.model.clone().unwrap_or_else(|| "-".into()),
                r.run_id.to_string(),
                timefmt::age(r.created_ms, now),
                key_metrics(&r.metrics),
                r.reason.clone().or(promoted).unwrap_or_default(),
            ]
        })
        .collect();
    output::table(
        [
            "RELEASE", "STATE", "MODEL", "RUN", "AGE", "METRICS", "REASON",
        ],
        &rows,
    )
}

pub(crate) fn key_metrics(metrics: &BTreeMap<String, f64>) -> String {
    metrics
        .iter()
        .map(|(k, v)| format!("{k}={}", output::number(*v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `kiln release show ID`.
pub(crate) async fn show_release(
    c: &Coordinator,
    format: OutputFormat,
    release: u64,
) -> Result<Outcome, CliError> {
    let reply = c
        .control()
        .get_release(pb::GetReleaseRequest {
            release_id: release,
        })
        .await
        .map_err(|s| c.failed(s))?;
    let release = ReleaseView::from(reply.into_inner());
    match format {
        OutputFormat::Json => output::json(&release)?,
        OutputFormat::Table => {
            let mut text = format!(
                "release {}  {}/{}  {}\nrun        {} of {} (version {}), stage {}",
                release.id,
                release.pipeline,
                release.environment,
                release.state,
                release.run_id,
                release.pipeline,
                release.pipeline_version,
                release.stage,
            );
            text.push_str(&lineage_lines(&release));
            text.push_str(&format!(
                "\ntriggered  by {}\nmetrics    {}",
                release.triggered_by,
                key_metrics(&release.metrics),
            ));
            if let Some(reason) = &release.reason {
                text.push_str(&format!("\nreason     {reason}"));
            }
            for artifact in &release.artifacts {
                text.push_str(&format!(
                    "\nartifact   {} from {} ({}, {} bytes)",
                    artifact.path, artifact.stage, artifact.digest, artifact.size
                ));
            }
            for gate in &release.gates {
                if let Some(decision) = &gate.gate {
                    text.push_str(&format!(
                        "\ngate       {}: {}",
                        gate.stage, decision.summary
                    ));
                    for check in &decision.checks {
                        let value = check.value.map_or("missing".into(), output::number);
                        let champion = check
                            .champion
                            .map(|v| format!(" (champion {})", output::number(v)))
                            .unwrap_or_default();
                        let verdict = if check.passed { "pass" } else { "FAIL" };
                        text.push_str(&format!(
                            "\n             {verdict} {} {} {value}{champion}",
                            check.metric, check.rule
                        ));
                    }
                }
            }
            output::line(text)?;
        }
    }
    Ok(Outcome::Ok)
}

/// What the release was built from: code, data, image, and the signed
/// provenance that vouches for it.
fn lineage_lines(release: &ReleaseView) -> String {
    let mut text = String::new();
    let repo = release.repo.as_deref().unwrap_or("-");
    if !release.commit.is_empty() {
        text.push_str(&format!("\nsource     {repo} @ {}", release.commit));
    }
    if let Some(snapshot) = &release.source_digest {
        text.push_str(&format!(
            "\nsource     snapshot {snapshot} (uploaded working tree of {repo})"
        ));
    }
    for dataset in &release.datasets {
        text.push_str(&format!(
            "\ndataset    {} from {} ({})",
            dataset.path, dataset.source, dataset.digest
        ));
    }
    text.push_str(&format!(
        "\nimage      {}",
        release.image_digest.as_deref().unwrap_or("-")
    ));
    if let Some(endpoint) = &release.endpoint {
        text.push_str(&format!("\nendpoint   {endpoint}"));
    }
    match &release.provenance_digest {
        Some(digest) => text.push_str(&format!(
            "\nprovenance {digest} (kiln release provenance {})",
            release.id
        )),
        None => text.push_str("\nprovenance not signed yet"),
    }
    text
}

pub(crate) fn user() -> String {
    format!(
        "cli:{}",
        std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "unknown".into())
    )
}

/// `kiln approve RUN STAGE` and `kiln reject RUN STAGE`.
pub(crate) async fn decide(
    c: &Coordinator,
    format: OutputFormat,
    args: &DecideArgs,
    approve: bool,
) -> Result<Outcome, CliError> {
    let request = pb::DecideStageRequest {
        run_id: args.run,
        stage: args.stage.clone(),
        user: user(),
        comment: args.reason.clone(),
    };
    let mut control = c.control();
    let reply = if approve {
        control.approve_stage(request).await
    } else {
        control.reject_stage(request).await
    };
    let run = RunView::from(reply.map_err(|s| c.failed(s))?.into_inner());
    runs::print_status(&run, format)?;
    Ok(Outcome::Ok)
}

/// `kiln rollback ENV [--to RELEASE]`.
pub(crate) async fn rollback(
    c: &Coordinator,
    format: OutputFormat,
    args: &RollbackArgs,
) -> Result<Outcome, CliError> {
    let (pipeline, environment) = EnvKey::parse_reference(&args.environment);
    let request = pb::RollbackRequest {
        environment: environment.to_owned(),
        to_release: args.to.unwrap_or(0),
        user: user(),
        pipeline: pipeline.unwrap_or_default().to_owned(),
    };
    let reply = c
        .control()
        .rollback(request)
        .await
        .map_err(|s| c.failed(s))?
        .into_inner();
    // The coordinator chose the release; say which before anything else.
    let restoring = reply.rollback.as_ref().map(|plan| {
        format!(
            "rolling {}/{} back from release {} to release {}",
            plan.pipeline, plan.environment, plan.from_release, plan.to_release
        )
    });
    let run = RunView::from(reply);
    match format {
        OutputFormat::Json => output::json(&run)?,
        OutputFormat::Table => output::line(format!(
            "{} (run {})",
            restoring.unwrap_or_else(|| format!("rolling {} back", args.environment)),
            run.id
        ))?,
    }
    Ok(Outcome::Ok)
}

/// `kiln env unfreeze ENV`.
pub(crate) async fn unfreeze(
    c: &Coordinator,
    format: OutputFormat,
    environment: &str,
) -> Result<Outcome, CliError> {
    let (pipeline, name) = EnvKey::parse_reference(environment);
    let request = pb::EnvironmentHistoryRequest {
        environment: name.to_owned(),
        pipeline: pipeline.unwrap_or_default().to_owned(),
    };
    let env = c
        .control()
        .unfreeze_environment(request)
        .await
        .map_err(|s| c.failed(s))?
        .into_inner();
    match format {
        OutputFormat::Json => output::json(&EnvironmentView::from(env))?,
        OutputFormat::Table => output::line(format!(
            "{}/{} accepts promotions again",
            env.pipeline, env.name
        ))?,
    }
    Ok(Outcome::Ok)
}
