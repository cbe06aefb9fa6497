//! `kiln run`, `kiln runs`, `kiln status`, `kiln cancel`, `kiln retry`.

use kiln_proto::v1 as pb;

use crate::args::{OutputFormat, RunArgs, RunsArgs};
use crate::client::Coordinator;
use crate::commands::{artifacts, watch};
use crate::error::{CliError, Outcome};
use crate::view::{RunState, RunView};
use crate::{output, timefmt};

/// `kiln run NAME [--rev R] [--wait]`.
pub(crate) async fn run(
    coordinator: &Coordinator,
    format: OutputFormat,
    args: &RunArgs,
) -> Result<Outcome, CliError> {
    let params = parse_params(&args.params)?;
    let run = match &args.source {
        Some(dir) => {
            let source_digest = artifacts::upload_source(coordinator, dir).await?;
            trigger_request(
                coordinator,
                pb::TriggerRunRequest {
                    source_digest,
                    params,
                    ..request(&args.pipeline, None)
                },
            )
            .await?
        }
        None => {
            let request = pb::TriggerRunRequest {
                params,
                ..request(&args.pipeline, args.rev.as_deref())
            };
            trigger_request(coordinator, request).await?
        }
    };
    if args.wait {
        let finished = watch::follow(coordinator, run.id, format).await?;
        return Ok(outcome_of(&finished));
    }
    match format {
        // Alone on the line, for `id=$(kiln run hello)`.
        OutputFormat::Table => output::line(run.id)?,
        OutputFormat::Json => output::json(&run)?,
    }
    Ok(Outcome::Ok)
}

/// Triggers a run on behalf of the local user; shared with `kiln demo`.
pub(crate) async fn trigger(
    coordinator: &Coordinator,
    pipeline: &str,
    rev: Option<&str>,
) -> Result<RunView, CliError> {
    trigger_request(coordinator, request(pipeline, rev)).await
}

/// `-p NAME=VALUE` flags as a map; the coordinator checks names and types
/// against the pipeline file.
fn parse_params(flags: &[String]) -> Result<std::collections::HashMap<String, String>, CliError> {
    let mut params = std::collections::HashMap::new();
    for flag in flags {
        let Some((name, value)) = flag.split_once('=') else {
            return Err(CliError::Input(format!(
                "-p {flag}: give a parameter as NAME=VALUE, like -p EPOCHS=20"
            )));
        };
        if params.insert(name.to_owned(), value.to_owned()).is_some() {
            return Err(CliError::Input(format!(
                "-p {name}=... is given twice; keep one"
            )));
        }
    }
    Ok(params)
}

fn request(pipeline: &str, rev: Option<&str>) -> pb::TriggerRunRequest {
    pb::TriggerRunRequest {
        pipeline: pipeline.to_owned(),
        rev: rev.unwrap_or_default().to_owned(),
        triggered_by: triggered_by(std::env::var("USER").ok().as_deref()),
        ..Default::default()
    }
}

async fn trigger_request(
    coordinator: &Coordinator,
    request: pb::TriggerRunRequest,
) -> Result<RunView, CliError> {
    Ok(coordinator.trigger_run(request).await?.into())
}

/// `cli:alice`, so runs say who started them.
fn triggered_by(user: Option<&str>) -> String {
    match user.map(str::trim) {
        Some(user) if !user.is_empty() => format!("cli:{user}"),
        _ => "cli:unknown".to_owned(),
    }
}

/// Exit 0 only for a run that succeeded.
pub(crate) fn outcome_of(run: &RunView) -> Outcome {
    if run.state == RunState::Succeeded {
        Outcome::Ok
    } else {
        Outcome::RunNotSucceeded
    }
}

/// `kiln runs [--pipeline P] [--limit N]`.
pub(crate) async fn list(
    coordinator: &Coordinator,
    format: OutputFormat,
    args: &RunsArgs,
) -> Result<Outcome, CliError> {
    let request = pb::ListRunsRequest {
        pipeline: args.pipeline.clone().unwrap_or_default(),
        limit: args.limit.unwrap_or(0),
    };
    let runs: Vec<RunView> = coordinator
        .list_runs(request)
        .await?
        .into_iter()
        .map(RunView::from)
        .collect();
    match format {
        OutputFormat::Json => output::json(&runs)?,
        OutputFormat::Table => {
            output::line(output::runs_table(&runs, timefmt::now_ms()).trim_end())?
        }
    }
    Ok(Outcome::Ok)
}

/// `kiln status RUN`.
pub(crate) async fn status(
    coordinator: &Coordinator,
    format: OutputFormat,
    run_id: u64,
) -> Result<Outcome, CliError> {
    let run = RunView::from(coordinator.get_run(run_id).await?);
    print_status(&run, format)?;
    Ok(Outcome::Ok)
}

/// The run header and its stage table; shared with `kiln demo`.
pub(crate) fn print_status(run: &RunView, format: OutputFormat) -> Result<(), CliError> {
    match format {
        OutputFormat::Json => output::json(run),
        OutputFormat::Table => {
            let now = timefmt::now_ms();
            let stages = output::stages_table(&run.stages, now);
            output::line(format!(
                "{}\n{}{}",
                output::run_header(run, now),
                stages.trim_end(),
                output::delivery_details(&run.stages)
            ))
        }
    }
}

/// `kiln cancel RUN`.
pub(crate) async fn cancel(
    coordinator: &Coordinator,
    format: OutputFormat,
    run_id: u64,
) -> Result<Outcome, CliError> {
    let run = RunView::from(coordinator.cancel_run(run_id).await?);
    match format {
        OutputFormat::Json => output::json(&run)?,
        OutputFormat::Table => output::line(format!("run {} {}", run.id, run.state.as_str()))?,
    }
    Ok(Outcome::Ok)
}

/// `kiln retry RUN STAGE`.
pub(crate) async fn retry(
    coordinator: &Coordinator,
    format: OutputFormat,
    run_id: u64,
    stage_name: &str,
) -> Result<Outcome, CliError> {
    let run = RunView::from(coordinator.retry_stage(run_id, stage_name).await?);
    match format {
        OutputFormat::Json => output::json(&run)?,
        OutputFormat::Table => {
            let stage = run.stages.iter().find(|s| s.name == stage_name);
            let detail = match stage {
                Some(s) => format!(
                    "; {} is {} (attempt {})",
                    s.name,
                    s.state.as_str(),
                    s.attempt
                ),
                None => String::new(),
            };
            output::line(format!("run {} {}{detail}", run.id, run.state.as_str()))?;
        }
    }
    Ok(Outcome::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_name_the_local_user() {
        assert_eq!(triggered_by(Some("alice")), "cli:alice");
        assert_eq!(triggered_by(Some(" ")), "cli:unknown");
        assert_eq!(triggered_by(None), "cli:unknown");
    }

    #[test]
    fn only_success_exits_zero() {
        let mut run = RunView::from(pb::Run::default());
        for (state, want) in [
            (RunState::Succeeded, Outcome::Ok),
            (RunState::Failed, Outcome::RunNotSucceeded),
            (RunState::Cancelled, Outcome::RunNotSucceeded),
        ] {
            run.state = state;
            assert_eq!(outcome_of(&run), want, "{state:?}");
        }
    }
}
