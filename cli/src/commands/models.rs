//! `kiln model ls|show|compare|alias` and `kiln promote NAME@N --to ENV`.

use std::collections::{BTreeMap, BTreeSet};

use clap::{Args, Subcommand};
use kiln_proto::v1 as pb;
use serde::Serialize;

use crate::args::OutputFormat;
use crate::client::Coordinator;
use crate::commands::delivery::{ReleaseView, key_metrics};
use crate::error::{CliError, Outcome};
use crate::view::{RunView, StageState};
use crate::{output, timefmt};

#[derive(Debug, Subcommand)]
pub(crate) enum ModelCommand {
    /// Every model, its versions and aliases.
    Ls,
    /// One version: metrics, gates, environments, artifacts, image, lineage.
    Show {
        /// NAME (the newest version), NAME@N or NAME@ALIAS (e.g. churn@production).
        model: String,
    },
    /// Two versions side by side: metrics with the difference, lineage.
    Compare {
        /// NAME@N or NAME@ALIAS.
        a: String,
        /// NAME@N or NAME@ALIAS.
        b: String,
    },
    /// Point an alias (`champion`, `challenger`) at a version, or remove it.
    Alias {
        /// NAME@N to point the alias at (NAME alone with --rm).
        model: String,
        alias: String,
        /// Remove the alias instead.
        #[arg(long)]
        rm: bool,
    },
}

#[derive(Debug, Args)]
pub(crate) struct PromoteArgs {
    /// NAME@N or NAME@ALIAS (e.g. churn@3, churn@staging).
    pub(crate) model: String,
    /// The environment of the version's pipeline to deploy it to.
    #[arg(long)]
    pub(crate) to: String,
}

/// A model. JSON: `{name, pipeline, versions: [{version, run_id,
/// created_ms, live_in}], aliases: {alias: version}}`.
#[derive(Debug, Serialize)]
struct ModelView {
    name: String,
    pipeline: String,
    versions: Vec<VersionSummary>,
    aliases: BTreeMap<String, u32>,
}

#[derive(Debug, Serialize)]
struct VersionSummary {
    version: u32,
    run_id: u64,
    created_ms: u64,
    live_in: Vec<String>,
}

impl From<pb::Model> for ModelView {
    fn from(model: pb::Model) -> Self {
        Self {
            name: model.name,
            pipeline: model.pipeline,
            versions: model
                .versions
                .into_iter()
                .map(|v| VersionSummary {
                    version: v.version,
                    run_id: v.run_id,
                    created_ms: v.created_ms,
                    live_in: v.live_in,
                })
                .collect(),
            aliases: model.aliases.into_iter().collect(),
        }
    }
}

/// A model version. JSON: `{model, name, version, aliases, metrics,
/// run_id, pipeline, pipeline_version, commit, params, triggered_by,
/// created_ms, releases: [release as in `kiln release show`]}`.
#[derive(Debug, Serialize)]
struct VersionView {
    /// `NAME@N`.
    model: String,
    name: String,
    version: u32,
    aliases: Vec<String>,
    metrics: BTreeMap<String, f64>,
    run_id: u64,
    pipeline: String,
    pipeline_version: u32,
    commit: String,
    params: BTreeMap<String, String>,
    triggered_by: String,
    created_ms: u64,
    releases: Vec<ReleaseView>,
}

impl From<pb::ModelVersion> for VersionView {
    fn from(v: pb::ModelVersion) -> Self {
        Self {
            model: format!("{}@{}", v.name, v.version),
            name: v.name,
            version: v.version,
            aliases: v.aliases,
            metrics: v.metrics.into_iter().collect(),
            run_id: v.run_id,
            pipeline: v.pipeline,
            pipeline_version: v.pipeline_version,
            commit: v.commit,
            params: v.params.into_iter().collect(),
            triggered_by: v.triggered_by,
            created_ms: v.created_ms,
            releases: v.releases.into_iter().map(ReleaseView::from).collect(),
        }
    }
}

/// `kiln model compare`. JSON: `{a, b, metrics: [{metric, a, b, diff}],
/// lineage: [{field, a, b}]}`; `diff` is b − a.
#[derive(Debug, Serialize)]
struct Comparison {
    a: String,
    b: String,
    metrics: Vec<MetricRow>,
    lineage: Vec<LineageRow>,
}

#[derive(Debug, Serialize)]
struct MetricRow {
    metric: String,
    a: Option<f64>,
    b: Option<f64>,
    diff: Option<f64>,
}

#[derive(Debug, Serialize)]
struct LineageRow {
    field: &'static str,
    a: String,
    b: String,
}

pub(crate) async fn model(
    c: &Coordinator,
    format: OutputFormat,
    command: ModelCommand,
) -> Result<Outcome, CliError> {
    match command {
        ModelCommand::Ls => list(c, format).await,
        ModelCommand::Show { model } => show(c, format, &model).await,
        ModelCommand::Compare { a, b } => compare(c, format, &a, &b).await,
        ModelCommand::Alias { model, alias, rm } => set_alias(c, format, &model, &alias, rm).await,
    }
}

async fn list(c: &Coordinator, format: OutputFormat) -> Result<Outcome, CliError> {
    let models: Vec<ModelView> = c
        .control()
        .list_models(pb::ListModelsRequest {})
        .await
        .map_err(|s| c.failed(s))?
        .into_inner()
        .models
        .into_iter()
        .map(ModelView::from)
        .collect();
    match format {
        OutputFormat::Json => output::json(&models)?,
        OutputFormat::Table => {
            let rows: Vec<[String; 4]> = models
                .iter()
                .map(|m| {
                    [
                        m.name.clone(),
                        m.pipeline.clone(),
                        m.versions
                            .last()
                            .map_or("-".into(), |v| v.version.to_string()),
                        aliases_text(&m.aliases),
                    ]
                })
                .collect();
            output::line(
                output::table(["MODEL", "PIPELINE", "LATEST", "ALIASES"], &rows).trim_end(),
            )?;
        }
    }
    Ok(Outcome::Ok)
}

fn aliases_text(aliases: &BTreeMap<String, u32>) -> String {
    aliases
        .iter()
        .map(|(alias, version)| format!("{alias}=@{version}"))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn get(c: &Coordinator, reference: &str) -> Result<VersionView, CliError> {
    let version = c
        .control()
        .get_model_version(pb::GetModelVersionRequest {
            model: reference.to_owned(),
        })
        .await
        .map_err(|s| c.failed(s))?
        .into_inner();
    Ok(VersionView::from(version))
}

async fn show(c: &Coordinator, format: OutputFormat, reference: &str) -> Result<Outcome, CliError> {
    let version = get(c, reference).await?;
    match format {
        OutputFormat::Json => output::json(&version)?,
        OutputFormat::Table => output::line(show_text(&version).trim_end())?,
    }
    Ok(Outcome::Ok)
}

fn show_text(v: &VersionView) -> String {
    let mut out = String::new();
    let aliases = if v.aliases.is_empty() {
        "-".to_owned()
    } else {
        v.aliases.join(", ")
    };
    let origin = v.releases.first();
    let fields: Vec<[String; 2]> = vec![
        ["model".into(), v.model.clone()],
        ["aliases".into(), aliases],
        [
            "trained by".into(),
            format!(
                "run {} of {} (version {}) at {}",
                v.run_id, v.pipeline, v.pipeline_version, v.commit
            ),
        ],
        ["started by".into(), v.triggered_by.clone()],
        ["created".into(), timefmt::datetime(v.created_ms)],
        [
            "params".into(),
            v.params
                .iter()
                .map(|(k, val)| format!("{k}={val}"))
                .collect::<Vec<_>>()
                .join(" "),
        ],
        ["metrics".into(), key_metrics(&v.metrics)],
        [
            "image".into(),
            origin
                .and_then(|r| r.image_digest.clone())
                .unwrap_or_else(|| "-".into()),
        ],
    ];
    out.push_str(&output::table(["FIELD", "VALUE"], &fields));
    out.push('\n');
    let releases: Vec<[String; 5]> = v
        .releases
        .iter()
        .map(|r| {
            let how = match &r.promotion {
                Some(p) => format!(
                    "promoted from release {} by {} at {}",
                    p.from_release,
                    p.by,
                    timefmt::datetime(p.at_ms)
                ),
                None => format!("run {}", r.run_id),
            };
            [
                r.id.to_string(),
                format!("{}/{}", r.pipeline, r.environment),
                r.state.to_owned(),
                how,
                r.gates
                    .iter()
                    .map(|g| {
                        let passed = g.gate.as_ref().is_some_and(|gate| gate.passed);
                        format!("{}={}", g.stage, if passed { "passed" } else { "failed" })
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        })
        .collect();
    out.push_str(&output::table(
        ["RELEASE", "ENVIRONMENT", "STATE", "HOW", "GATES"],
        &releases,
    ));
    out.push('\n');
    if let Some(origin) = origin {
        let artifacts: Vec<[String; 3]> = origin
            .artifacts
            .iter()
            .map(|a| [a.stage.clone(), a.path.clone(), a.digest.clone()])
            .collect();
        out.push_str(&output::table(["STAGE", "ARTIFACT", "DIGEST"], &artifacts));
    }
    out
}

async fn compare(
    c: &Coordinator,
    format: OutputFormat,
    a: &str,
    b: &str,
) -> Result<Outcome, CliError> {
    let (a, b) = (get(c, a).await?, get(c, b).await?);
    let comparison = comparison(&a, &b);
    match format {
        OutputFormat::Json => output::json(&comparison)?,
        OutputFormat::Table => output::line(compare_text(&comparison).trim_end())?,
    }
    Ok(Outcome::Ok)
}

fn comparison(a: &VersionView, b: &VersionView) -> Comparison {
    let names: BTreeSet<&String> = a.metrics.keys().chain(b.metrics.keys()).collect();
    let metrics = names
        .into_iter()
        .map(|metric| {
            let (va, vb) = (
                a.metrics.get(metric).copied().filter(|v| !v.is_nan()),
                b.metrics.get(metric).copied().filter(|v| !v.is_nan()),
            );
            MetricRow {
                metric: metric.clone(),
                a: va,
                b: vb,
                diff: va.zip(vb).map(|(va, vb)| vb - va),
            }
        })
        .collect();
    let image = |v: &VersionView| {
        v.releases
            .first()
            .and_then(|r| r.image_digest.clone())
            .unwrap_or_else(|| "-".into())
    };
    let params = |v: &VersionView| {
        v.params
            .iter()
            .map(|(k, val)| format!("{k}={val}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let lineage = vec![
        LineageRow {
            field: "run",
            a: a.run_id.to_string(),
            b: b.run_id.to_string(),
        },
        LineageRow {
            field: "pipeline",
            a: format!("{} v{}", a.pipeline, a.pipeline_version),
            b: format!("{} v{}", b.pipeline, b.pipeline_version),
        },
        LineageRow {
            field: "commit",
            a: a.commit.clone(),
            b: b.commit.clone(),
        },
        LineageRow {
            field: "params",
            a: params(a),
            b: params(b),
        },
        LineageRow {
            field: "image",
            a: image(a),
            b: image(b),
        },
        LineageRow {
            field: "created",
            a: timefmt::datetime(a.created_ms),
            b: timefmt::datetime(b.created_ms),
        },
    ];
    Comparison {
        a: a.model.clone(),
        b: b.model.clone(),
        metrics,
        lineage,
    }
}

fn compare_text(comparison: &Comparison) -> String {
    let value = |v: Option<f64>| v.map_or("-".to_owned(), output::number);
    let metrics: Vec<[String; 4]> = comparison
        .metrics
        .iter()
        .map(|row| {
            [
                row.metric.clone(),
                value(row.a),
                value(row.b),
                row.diff.map_or("-".into(), |d| {
                    if d > 0.0 {
                        format!("+{}", output::number(d))
                    } else {
                        output::number(d)
                    }
                }),
            ]
        })
        .collect();
    let (a, b) = (comparison.a.as_str(), comparison.b.as_str());
    let mut out = output::table(["METRIC", a, b, "DIFF"], &metrics);
    out.push('\n');
    let lineage: Vec<[String; 3]> = comparison
        .lineage
        .iter()
        .map(|row| [row.field.to_owned(), row.a.clone(), row.b.clone()])
        .collect();
    out.push_str(&output::table(["LINEAGE", a, b], &lineage));
    out
}

async fn set_alias(
    c: &Coordinator,
    format: OutputFormat,
    model: &str,
    alias: &str,
    remove: bool,
) -> Result<Outcome, CliError> {
    let reply = c
        .control()
        .set_model_alias(pb::SetModelAliasRequest {
            model: model.to_owned(),
            alias: alias.to_owned(),
            remove,
        })
        .await
        .map_err(|s| c.failed(s))?
        .into_inner();
    let view = ModelView::from(reply);
    match format {
        OutputFormat::Json => output::json(&view)?,
        OutputFormat::Table if remove => {
            output::line(format!("removed alias {alias} of model {}", view.name))?
        }
        OutputFormat::Table => output::line(format!(
            "{}@{alias} is version {}",
            view.name,
            view.aliases.get(alias).copied().unwrap_or_default()
        ))?,
    }
    Ok(Outcome::Ok)
}

/// `kiln promote NAME@N --to ENV`.
pub(crate) async fn promote(
    c: &Coordinator,
    format: OutputFormat,
    args: &PromoteArgs,
) -> Result<Outcome, CliError> {
    let reply = c
        .control()
        .promote(pb::PromoteRequest {
            model: args.model.clone(),
            environment: args.to.clone(),
        })
        .await
        .map_err(|s| c.failed(s))?
        .into_inner();
    let run = RunView::from(reply);
    match format {
        OutputFormat::Json => output::json(&run)?,
        OutputFormat::Table => {
            let waiting: Vec<&str> = run
                .stages
                .iter()
                .filter(|s| s.state == StageState::AwaitingApproval)
                .map(|s| s.name.as_str())
                .collect();
            let mut text = format!(
                "promoting {} to {}: its gates passed again (run {})",
                args.model, args.to, run.id
            );
            if !waiting.is_empty() {
                text.push_str(&format!(
                    "; waiting for approval: kiln approve {} {}",
                    run.id,
                    waiting.join(" ")
                ));
            }
            output::line(text)?;
        }
    }
    Ok(Outcome::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(n: u32, metrics: &[(&str, f64)]) -> VersionView {
        VersionView {
            model: format!("churn@{n}"),
            name: "churn".into(),
            version: n,
            aliases: Vec::new(),
            metrics: metrics.iter().map(|(k, v)| ((*k).into(), *v)).collect(),
            run_id: n as u64,
            pipeline: "churn".into(),
            pipeline_version: 1,
            commit: format!("{n:040}"),
            params: BTreeMap::new(),
            triggered_by: "test".into(),
            created_ms: 0,
            releases: Vec::new(),
        }
    }

    #[test]
    fn compare_shows_the_difference_b_minus_a_and_missing_values() {
        let a = version(1, &[("recall", 0.5), ("old", 1.0)]);
        let b = version(2, &[("recall", 0.75), ("new", 2.0)]);
        let c = comparison(&a, &b);
        let recall = c.metrics.iter().find(|m| m.metric == "recall").unwrap();
        assert_eq!(recall.diff, Some(0.25));
        let old = c.metrics.iter().find(|m| m.metric == "old").unwrap();
        assert_eq!((old.b, old.diff), (None, None));
        let text = compare_text(&c);
        assert!(text.contains("+0.25"), "{text}");
        assert!(
            text.contains("churn@1") && text.contains("churn@2"),
            "{text}"
        );
    }
}
