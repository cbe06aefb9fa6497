//! Following a run live: `kiln run --wait` and `kiln demo`.
//!
//! `WatchRun` sends the whole run after every change; this module diffs
//! consecutive snapshots and prints one line per stage change, then a
//! summary. In JSON mode the lines go to stderr so stdout holds only the
//! final run.

use std::collections::HashMap;

use tonic::Status;

use crate::args::OutputFormat;
use crate::client::Coordinator;
use crate::error::CliError;
use crate::output;
use crate::reconnect;
use crate::timefmt;
use crate::view::{RunState, RunView, StageState, StageView};

/// Prints progress until run `run_id` finishes, then the summary (table
/// mode) or the final run (JSON mode); returns the final run.
///
/// A stream that breaks or ends before the run does (the coordinator
/// restarted) is opened again; the first snapshot of the new stream is
/// diffed against what was printed, so nothing is said twice.
pub(crate) async fn follow(
    coordinator: &Coordinator,
    run_id: u64,
    format: OutputFormat,
) -> Result<RunView, CliError> {
    let mut progress = Progress::default();
    let mut reconnect = coordinator.reconnect();
    let run = 'followed: loop {
        let broken = match coordinator.watch_run(run_id).await {
            Err(status) => status,
            Ok(mut updates) => loop {
                match updates.message().await {
                    Ok(Some(update)) => {
                        reconnect.recovered();
                        let run = RunView::from(update);
                        for text in progress.update(&run, timefmt::now_ms()) {
                            output::progress(format, &text)?;
                        }
                        if run.state.is_finished() {
                            break 'followed run;
                        }
                    }
                    // The stream ends after the finished run; before it,
                    // the coordinator is shutting down.
                    Ok(None) => break Status::unavailable("the run stream ended early"),
                    Err(status) => break status,
                }
            },
        };
        if !reconnect::is_resumable(&broken) {
            return Err(coordinator.failed(broken));
        }
        reconnect.pause(&broken).await?;
    };
    match format {
        OutputFormat::Json => output::json(&run)?,
        OutputFormat::Table => output::line(summary(&run))?,
    }
    Ok(run)
}

/// What was last printed about each stage, to print only changes.
#[derive(Default)]
struct Progress {
    /// By stage index: the fields whose change is worth a line.
    seen: HashMap<u32, (StageState, u32, Option<String>)>,
    /// Stage names are padded to this width so the states line up.
    name_width: usize,
    header_printed: bool,
}

impl Progress {
    /// The lines that `run` adds to what was printed before.
    fn update(&mut self, run: &RunView, now_ms: u64) -> Vec<String> {
        let mut lines = Vec::new();
        if !self.header_printed {
            self.header_printed = true;
            self.name_width = run.stages.iter().map(|s| s.name.len()).max().unwrap_or(0);
            lines.push(header(run));
        }
        for stage in &run.stages {
            let key = (stage.state, stage.attempt, stage.agent.clone());
            let previous = self.seen.insert(stage.idx, key.clone());
            let first_sight = previous.is_none();
            if previous.as_ref() == Some(&key)
                || (first_sight && stage.state == StageState::Pending)
            {
                continue;
            }
            let at = event_ms(stage).unwrap_or(now_ms);
            let name = format!("{:<width$}", stage.name, width = self.name_width);
            lines.push(format!(
                "[{}] {name}  {}",
                timefmt::clock(at),
                describe(stage)
            ));
        }
        lines
    }
}

fn header(run: &RunView) -> String {
    let commit = match output::short_commit(&run.commit) {
        "" => "its branch head".to_owned(),
        short => format!("commit {short}"),
    };
    format!(
        "run {} of {} (version {}) at {commit}, {}",
        run.id,
        run.pipeline,
        run.pipeline_version,
        run.state.as_str()
    )
}

/// When the stage's current state began, if the coordinator said so.
fn event_ms(stage: &StageView) -> Option<u64> {
    match stage.state {
        s if s.is_finished() => stage.finished_ms,
        StageState::Running => stage.started_ms,
        _ => None,
    }
}

/// `running on agent-1 (attempt 1)`, `failed after 2.5s: exit code 3`...
fn describe(stage: &StageView) -> String {
    let agent = stage.agent.as_deref().unwrap_or("an agent");
    let took = match (stage.started_ms, stage.finished_ms) {
        (Some(start), Some(end)) => Some(timefmt::duration(end.saturating_sub(start))),
        _ => None,
    };
    let why = output::stage_message(stage);
    let because = if why.is_empty() {
        String::new()
    } else {
        format!(": {why}")
    };
    // Retries are news; a first attempt only needs saying while it runs.
    let retry = if stage.attempt > 1 {
        format!(" (attempt {})", stage.attempt)
    } else {
        String::new()
    };
    match stage.state {
        StageState::Pending => format!("pending{retry}"),
        StageState::Ready => format!("waiting for an agent{retry}{because}"),
        StageState::Assigned => format!("assigned to {agent} (attempt {})", stage.attempt),
        StageState::Running => format!("running on {agent} (attempt {})", stage.attempt),
        StageState::Succeeded => match took {
            Some(took) => format!("succeeded in {took}{retry}"),
            None => format!("succeeded{retry}"),
        },
        StageState::Failed | StageState::TimedOut => {
            let verb = stage.state.as_str().replace('_', " ");
            match took {
                Some(took) => format!("{verb} after {took}{retry}{because}"),
                None => format!("{verb}{retry}{because}"),
            }
        }
        // The coordinator's message often starts with the verb already
        // ("skipped: `evaluate` did not succeed"); say it once.
        StageState::Cancelled | StageState::Skipped if why.starts_with(stage.state.as_str()) => why,
        StageState::Cancelled | StageState::Skipped => format!("{}{because}", stage.state.as_str()),
        StageState::AwaitingApproval => {
            format!("waiting for approval: kiln approve <run> {}", stage.name)
        }
        // The coordinator's message says where the rollout is.
        StageState::RollingOut if why.starts_with("rolling out") => why,
        StageState::RollingOut => format!("rolling out{because}"),
        StageState::Unknown => "in a state this kiln does not know".to_owned(),
    }
}

/// The last word on a followed run: how it ended and, if badly, where to
/// look next.
pub(crate) fn summary(run: &RunView) -> String {
    let took = match (run.created_ms, run.finished_ms) {
        (Some(start), Some(end)) => format!(" in {}", timefmt::duration(end.saturating_sub(start))),
        _ => String::new(),
    };
    let total = run.stages.len();
    let succeeded = run
        .stages
        .iter()
        .filter(|s| s.state == StageState::Succeeded)
        .count();
    let mut text = format!(
        "run {} {}{took}: {succeeded} of {total} stages succeeded",
        run.id,
        run.state.as_str()
    );
    if run.state == RunState::Succeeded {
        return text;
    }
    let broken: Vec<&StageView> = run
        .stages
        .iter()
        .filter(|s| matches!(s.state, StageState::Failed | StageState::TimedOut))
        .collect();
    for stage in &broken {
        text.push_str(&format!("\n  {} {}", stage.name, describe(stage)));
    }
    if let Some(first) = broken.first() {
        text.push_str(&format!(
            "\nsee its output with: kiln logs {} {}",
            run.id, first.name
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(idx: u32, name: &str, state: StageState) -> StageView {
        StageView {
            idx,
            name: name.into(),
            state,
            attempt: 0,
            agent: None,
            started_ms: None,
            finished_ms: None,
            exit_code: None,
            message: String::new(),
            needs: vec![],
            metrics: Default::default(),
            gate: None,
        }
    }

    fn run(state: RunState, stages: Vec<StageView>) -> RunView {
        RunView {
            id: 7,
            pipeline: "hello".into(),
            pipeline_version: 2,
            pipeline_digest: String::new(),
            params: Default::default(),
            variables: Default::default(),
            commit: "0123456789abcdef".into(),
            rev: String::new(),
            state,
            triggered_by: "cli:test".into(),
            created_ms: Some(1_000),
            finished_ms: None,
            stages,
            rollback: None,
        }
    }

    /// Drops the `[HH:MM:SS] ` prefix, which depends on the time zone.
    fn strip_clock(lines: Vec<String>) -> Vec<String> {
        lines
            .into_iter()
            .map(|l| l.get(11..).unwrap_or(&l).to_owned())
            .collect()
    }

    #[test]
    fn prints_the_header_and_then_only_changes() {
        let mut progress = Progress::default();
        let mut build = stage(0, "build", StageState::Pending);
        let test = stage(1, "unit-tests", StageState::Pending);
        let first = progress.update(&run(RunState::Queued, vec![build.clone(), test.clone()]), 0);
        assert_eq!(
            first,
            ["run 7 of hello (version 2) at commit 0123456789, queued"]
        );

        (build.state, build.attempt, build.agent) =
            (StageState::Running, 1, Some("agent-1".into()));
        let lines = progress.update(
            &run(RunState::Running, vec![build.clone(), test.clone()]),
            0,
        );
        assert_eq!(
            strip_clock(lines),
            ["build       running on agent-1 (attempt 1)"]
        );
        assert!(
            progress
                .update(&run(RunState::Running, vec![build.clone(), test]), 0)
                .is_empty()
        );
    }

    #[test]
    fn endings_say_how_long_and_why() {
        let mut failed = stage(0, "train", StageState::Failed);
        (
            failed.attempt,
            failed.started_ms,
            failed.finished_ms,
            failed.exit_code,
        ) = (2, Some(1_000), Some(3_500), Some(3));
        assert_eq!(
            describe(&failed),
            "failed after 2.5s (attempt 2): exit code 3"
        );
        let mut timed_out = stage(0, "train", StageState::TimedOut);
        timed_out.message = "timed out after 5s".into();
        assert_eq!(describe(&timed_out), "timed out: timed out after 5s");
        let mut requeued = stage(0, "train", StageState::Ready);
        (requeued.attempt, requeued.message) = (2, "agent lost".into());
        assert_eq!(
            describe(&requeued),
            "waiting for an agent (attempt 2): agent lost"
        );
    }

    #[test]
    fn summary_points_at_the_failed_stage() {
        let mut ok = stage(0, "prepare", StageState::Succeeded);
        ok.exit_code = Some(0);
        let mut bad = stage(1, "train", StageState::Failed);
        bad.exit_code = Some(1);
        let mut failed = run(
            RunState::Failed,
            vec![ok.clone(), bad, stage(2, "evaluate", StageState::Skipped)],
        );
        failed.finished_ms = Some(9_100);
        assert_eq!(
            summary(&failed),
            "run 7 failed in 8.1s: 1 of 3 stages succeeded\n  \
             train failed: exit code 1\n\
             see its output with: kiln logs 7 train"
        );
        let mut good = run(RunState::Succeeded, vec![ok]);
        good.finished_ms = Some(2_000);
        assert_eq!(
            summary(&good),
            "run 7 succeeded in 1.0s: 1 of 1 stages succeeded"
        );
    }
}
