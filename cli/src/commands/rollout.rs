//! `kiln rollout status|promote|abort ENV`: a progressive rollout
//! (`strategy:`) as the coordinator runs it — the step and its traffic
//! weight, the analysis rounds, and how it ended.

use std::collections::BTreeMap;

use kiln_common::ids::EnvKey;
use kiln_common::spec::Strategy;
use kiln_proto::v1 as pb;
use serde::Serialize;

use crate::args::{OutputFormat, RolloutCommand};
use crate::client::Coordinator;
use crate::error::{CliError, Outcome};
use crate::{output, timefmt};

/// JSON: the rollout, its steps and every analysis round.
#[derive(Debug, Serialize)]
struct RolloutView {
    pipeline: String,
    environment: String,
    kind: String,
    candidate: u64,
    previous: u64,
    steps: Vec<u32>,
    /// 1-based, as the table shows it.
    step: u32,
    weight: u32,
    phase: String,
    analysis_until_ms: Option<u64>,
    outcome: Option<String>,
    reason: Option<String>,
    promote_requested: bool,
    started_ms: u64,
    finished_ms: Option<u64>,
    rounds: Vec<RoundView>,
}

#[derive(Debug, Serialize)]
struct RoundView {
    step: u32,
    at_ms: u64,
    values: BTreeMap<String, f64>,
    missing: Vec<String>,
    error: Option<String>,
    breached: bool,
}

impl From<pb::Rollout> for RolloutView {
    fn from(r: pb::Rollout) -> Self {
        let some = |s: String| (!s.is_empty()).then_some(s);
        Self {
            pipeline: r.pipeline,
            environment: r.environment,
            kind: r.kind,
            candidate: r.candidate,
            previous: r.previous,
            steps: r.steps,
            step: r.step + 1,
            weight: r.weight,
            phase: r.phase,
            analysis_until_ms: Some(r.analysis_until_ms).filter(|&ms| ms != 0),
            outcome: some(r.outcome),
            reason: some(r.reason),
            promote_requested: r.promote_requested,
            started_ms: r.started_ms,
            finished_ms: Some(r.finished_ms).filter(|&ms| ms != 0),
            rounds: r
                .rounds
                .into_iter()
                .map(|round| RoundView {
                    step: round.step + 1,
                    at_ms: round.at_ms,
                    values: round.values.into_iter().collect(),
                    missing: round.missing,
                    error: some(round.error),
                    breached: round.breached,
                })
                .collect(),
        }
    }
}

pub(crate) async fn rollout(
    c: &Coordinator,
    format: OutputFormat,
    command: &RolloutCommand,
) -> Result<Outcome, CliError> {
    let (RolloutCommand::Status { environment }
    | RolloutCommand::Promote { environment }
    | RolloutCommand::Abort { environment }) = command;
    let (pipeline, name) = EnvKey::parse_reference(environment);
    let request = pb::RolloutRequest {
        pipeline: pipeline.unwrap_or_default().to_owned(),
        environment: name.to_owned(),
    };
    let mut control = c.control();
    let reply = match command {
        RolloutCommand::Status { .. } => control.rollout_status(request).await,
        RolloutCommand::Promote { .. } => control.rollout_promote(request).await,
        RolloutCommand::Abort { .. } => control.rollout_abort(request).await,
    };
    let view = RolloutView::from(reply.map_err(|s| c.failed(s))?.into_inner());
    match format {
        OutputFormat::Json => output::json(&view)?,
        OutputFormat::Table => {
            let said = match command {
                RolloutCommand::Status { .. } => None,
                RolloutCommand::Promote { .. } => Some(format!(
                    "promoting release {}: it takes all traffic next",
                    view.candidate
                )),
                RolloutCommand::Abort { .. } => Some(format!(
                    "aborting the rollout of release {}: release {} goes back to 100%",
                    view.candidate, view.previous
                )),
            };
            if let Some(said) = said {
                output::line(said)?;
            }
            output::line(text(&view, timefmt::now_ms()))?;
        }
    }
    Ok(Outcome::Ok)
}

/// The rollout for people: one line of where it is, the steps, then the
/// analysis rounds.
fn text(view: &RolloutView, now_ms: u64) -> String {
    // `view.step` counts from 1.
    let steps = Strategy::steps_text(&view.steps, (view.step as usize).wrapping_sub(1));
    let mut out = format!(
        "{} of release {} in {}/{} (replacing release {}): step {} of {} at {}%, {}",
        view.kind,
        view.candidate,
        view.pipeline,
        view.environment,
        view.previous,
        view.step,
        view.steps.len(),
        view.weight,
        view.phase
    );
    if let Some(until) = view.analysis_until_ms {
        out.push_str(&format!(
            " (next step in {})",
            timefmt::duration(until.saturating_sub(now_ms))
        ));
    }
    if let Some(outcome) = &view.outcome {
        out.push_str(&format!(": {outcome}"));
    }
    out.push_str(&format!("\nsteps: {steps}"));
    if let Some(reason) = &view.reason {
        out.push_str(&format!("\nreason: {reason}"));
    }
    if !view.rounds.is_empty() {
        let rows: Vec<[String; 4]> = view
            .rounds
            .iter()
            .map(|round| {
                let mut values: Vec<String> = round
                    .values
                    .iter()
                    .map(|(metric, value)| format!("{metric}={}", output::number(*value)))
                    .collect();
                values.extend(round.missing.iter().map(|m| format!("{m}=missing")));
                if let Some(error) = &round.error {
                    values.push(format!("error: {error}"));
                }
                [
                    round.step.to_string(),
                    timefmt::clock(round.at_ms),
                    values.join(" "),
                    if round.breached { "breached" } else { "ok" }.to_owned(),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&output::table(["STEP", "AT", "VALUES", "RESULT"], &rows));
    }
    out
}
