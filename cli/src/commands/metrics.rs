//! `kiln metrics ENV [--since 1h]`: what the monitors read from an
//! environment's live releases, and each release's own metrics, as the
//! coordinator kept them.

use std::collections::BTreeMap;

use kiln_common::ids::EnvKey;
use kiln_proto::v1 as pb;
use serde::Serialize;

use crate::args::{MetricsArgs, OutputFormat};
use crate::client::Coordinator;
use crate::error::{CliError, Outcome};
use crate::{output, timefmt};

/// JSON: `{releases: [{id, state, created_ms, metrics}], samples: [{release,
/// at_ms, values, breached, error}]}`, oldest first.
#[derive(Debug, Serialize)]
struct HistoryView {
    releases: Vec<ReleasePoint>,
    samples: Vec<SampleView>,
}

#[derive(Debug, Serialize)]
struct ReleasePoint {
    id: u64,
    state: &'static str,
    created_ms: u64,
    metrics: BTreeMap<String, f64>,
}

#[derive(Debug, Serialize)]
struct SampleView {
    release: u64,
    at_ms: u64,
    values: BTreeMap<String, f64>,
    breached: bool,
    error: Option<String>,
}

pub(crate) async fn metrics(
    c: &Coordinator,
    format: OutputFormat,
    args: &MetricsArgs,
) -> Result<Outcome, CliError> {
    let (pipeline, environment) = EnvKey::parse_reference(&args.environment);
    let since_ms = args.since.map_or(0, |since| {
        timefmt::now_ms().saturating_sub(since.as_millis() as u64)
    });
    let request = pb::MetricHistoryRequest {
        environment: environment.to_owned(),
        pipeline: pipeline.unwrap_or_default().to_owned(),
        since_ms,
    };
    let reply = c
        .control()
        .metric_history(request)
        .await
        .map_err(|s| c.failed(s))?
        .into_inner();
    let view = HistoryView {
        releases: reply
            .releases
            .into_iter()
            .map(|release| ReleasePoint {
                id: release.id,
                state: match release.state() {
                    pb::ReleaseState::Live => "live",
                    pb::ReleaseState::Superseded => "superseded",
                    pb::ReleaseState::RolledBack => "rolled_back",
                    pb::ReleaseState::RollingOut => "rolling_out",
                    pb::ReleaseState::Aborted => "aborted",
                    pb::ReleaseState::Unspecified => "unknown",
                },
                created_ms: release.created_ms,
                metrics: release.metrics.into_iter().collect(),
            })
            .collect(),
        samples: reply
            .samples
            .into_iter()
            .map(|sample| SampleView {
                release: sample.release_id,
                at_ms: sample.at_ms,
                values: sample.values.into_iter().collect(),
                breached: sample.breached,
                error: (!sample.error.is_empty()).then_some(sample.error),
            })
            .collect(),
    };
    match format {
        OutputFormat::Json => output::json(&view)?,
        OutputFormat::Table => output::line(table(&view))?,
    }
    Ok(Outcome::Ok)
}

fn table(view: &HistoryView) -> String {
    let pairs = |values: &BTreeMap<String, f64>| {
        values
            .iter()
            .map(|(metric, value)| format!("{metric}={}", output::number(*value)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let releases: Vec<[String; 4]> = view
        .releases
        .iter()
        .map(|r| {
            [
                r.id.to_string(),
                r.state.to_owned(),
                timefmt::datetime(r.created_ms),
                pairs(&r.metrics),
            ]
        })
        .collect();
    let samples: Vec<[String; 4]> = view
        .samples
        .iter()
        .map(|s| {
            [
                timefmt::datetime(s.at_ms),
                s.release.to_string(),
                if s.breached { "BREACH" } else { "ok" }.to_owned(),
                s.error.clone().unwrap_or_else(|| pairs(&s.values)),
            ]
        })
        .collect();
    format!(
        "{}\n{}",
        output::table(["RELEASE", "STATE", "CREATED", "METRICS"], &releases),
        output::table(["TIME", "RELEASE", "", "MONITOR"], &samples),
    )
}
