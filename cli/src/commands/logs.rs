//! `kiln logs RUN [STAGE] [-f]`.
//!
//! All lines go to stdout in the order the coordinator sends them, so
//! `kiln logs 7 > out.txt` keeps stdout and stderr of a stage interleaved
//! as they happened. Lines Kiln wrote itself start with `kiln:` (dimmed on
//! a terminal), so they stand apart from the stage's own output.

use std::collections::HashMap;

use kiln_proto::v1 as pb;
use tonic::Status;

use crate::args::OutputFormat;
use crate::client::Coordinator;
use crate::error::{CliError, Outcome};
use crate::output;
use crate::reconnect;
use crate::view::{LogLineView, LogStream, RunView};

/// `kiln logs RUN [STAGE] [-f]`.
pub(crate) async fn logs(
    coordinator: &Coordinator,
    format: OutputFormat,
    run_id: u64,
    stage: Option<&str>,
    follow: bool,
) -> Result<Outcome, CliError> {
    print_logs(coordinator, format, run_id, stage, follow).await?;
    Ok(Outcome::Ok)
}

/// Prints the logs of a run (all stages when `stage` is `None`); shared
/// with `kiln demo`.
///
/// A stream that breaks (the coordinator restarted, or dropped this
/// follower for falling behind) is opened again with a cursor per stage,
/// and lines at or below what was already printed are dropped here too, so
/// against a coordinator that ignores the cursors every line still shows
/// exactly once.
pub(crate) async fn print_logs(
    coordinator: &Coordinator,
    format: OutputFormat,
    run_id: u64,
    stage: Option<&str>,
    follow: bool,
) -> Result<(), CliError> {
    // The run's stage names give a better error for a typo than the
    // coordinator's, and the width that lines the prefixes up.
    let run = RunView::from(coordinator.get_run(run_id).await?);
    let names: Vec<&str> = run.stages.iter().map(|s| s.name.as_str()).collect();
    if let Some(stage) = stage.filter(|s| !names.contains(s)) {
        return Err(CliError::Input(format!(
            "run {run_id} has no stage `{stage}`; its stages are: {}",
            names.join(", ")
        )));
    }
    let mut printer = Printer {
        prefix_width: (stage.is_none()).then(|| names.iter().map(|n| n.len()).max().unwrap_or(0)),
        last_attempt: None,
        colour: output::colour_enabled(),
    };
    let mut printed = Cursors::default();
    let mut reconnect = coordinator.reconnect();
    loop {
        let request = pb::StreamLogsRequest {
            run_id,
            stage: stage.unwrap_or_default().to_owned(),
            follow,
            resume: printed.resume(),
        };
        let broken = match coordinator.stream_logs(request).await {
            Err(status) => status,
            Ok(mut entries) => loop {
                match entries.message().await {
                    Ok(Some(entry)) => {
                        reconnect.recovered();
                        if printed.admit(&entry) {
                            print_line(&mut printer, format, LogLineView::from(entry))?;
                        }
                    }
                    Ok(None) if !follow => return Ok(()),
                    // A followed stream ends when its stage(s) do; one
                    // that ends before (a coordinator shutting down) is
                    // followed again.
                    Ok(None) => {
                        let run = coordinator.get_run_status(run_id).await;
                        match run.map(|run| all_finished(run, stage)) {
                            Ok(true) => return Ok(()),
                            Ok(false) => break Status::unavailable("the log stream ended early"),
                            Err(status) => break status,
                        }
                    }
                    Err(status) => break status,
                }
            },
        };
        if !reconnect::is_resumable(&broken) {
            return Err(coordinator.failed(broken));
        }
        reconnect.pause(&broken).await?;
    }
}

fn print_line(
    printer: &mut Printer,
    format: OutputFormat,
    line: LogLineView,
) -> Result<(), CliError> {
    match format {
        OutputFormat::Json => output::json_line(&line),
        OutputFormat::Table => printer.format(&line).into_iter().try_for_each(output::line),
    }
}

/// Whether the followed stage (or every stage) has finished.
fn all_finished(run: pb::Run, stage: Option<&str>) -> bool {
    RunView::from(run)
        .stages
        .iter()
        .filter(|s| stage.is_none_or(|name| s.name == name))
        .all(|s| s.state.is_finished())
}

/// Per stage, the next line not yet printed: `(attempt, seq)`, compared
/// as a pair, because every attempt numbers its lines from 0.
#[derive(Debug, Default)]
struct Cursors {
    next: HashMap<String, (u32, u64)>,
}

impl Cursors {
    /// True if `entry` comes after everything printed of its stage (and
    /// records it as printed).
    fn admit(&mut self, entry: &pb::LogEntry) -> bool {
        let position = (entry.attempt, entry.seq);
        let next = self.next.entry(entry.stage.clone()).or_default();
        if position < *next {
            return false;
        }
        *next = (entry.attempt, entry.seq + 1);
        true
    }

    /// Where to start again, for `StreamLogsRequest.resume`.
    fn resume(&self) -> Vec<pb::LogCursor> {
        let mut cursors: Vec<pb::LogCursor> = self
            .next
            .iter()
            .map(|(stage, &(attempt, next_seq))| pb::LogCursor {
                stage: stage.clone(),
                attempt,
                next_seq,
            })
            .collect();
        cursors.sort_by(|a, b| a.stage.cmp(&b.stage));
        cursors
    }
}

/// Turns log lines into text, remembering enough to mark retries.
struct Printer {
    /// `Some(width)` when several stages are printed: lines start with
    /// `[stage]`, padded to the longest name so the text lines up.
    prefix_width: Option<usize>,
    /// The attempt of the previous line (of one stage), to announce a new
    /// attempt when a single stage's log moves on to a retry.
    last_attempt: Option<u32>,
    /// Dim Kiln's own lines (a terminal that wants colour).
    colour: bool,
}

impl Printer {
    fn format(&mut self, line: &LogLineView) -> Vec<String> {
        let mut out = Vec::new();
        let body = match line.stream {
            LogStream::System => output::dim(&format!("kiln: {}", line.text), self.colour),
            LogStream::Stdout | LogStream::Stderr => line.text.clone(),
        };
        match self.prefix_width {
            Some(width) => {
                // A retry's lines are told apart by the tag, `[train#2]`.
                let tag = if line.attempt > 1 {
                    format!("[{}#{}]", line.stage, line.attempt)
                } else {
                    format!("[{}]", line.stage)
                };
                out.push(format!("{tag:<w$} {body}", w = width + 2));
            }
            None => {
                if self.last_attempt.is_some_and(|a| a != line.attempt) {
                    out.push(output::dim(
                        &format!("kiln: --- attempt {} ---", line.attempt),
                        self.colour,
                    ));
                }
                self.last_attempt = Some(line.attempt);
                out.push(body);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(stage: &str, attempt: u32, stream: LogStream, text: &str) -> LogLineView {
        LogLineView {
            stage: stage.into(),
            attempt,
            seq: 0,
            stream,
            text: text.into(),
            at_ms: None,
        }
    }

    #[test]
    fn all_stages_are_prefixed_and_aligned() {
        let mut printer = Printer {
            prefix_width: Some("unit-tests".len()),
            last_attempt: None,
            colour: false,
        };
        let build = printer.format(&line("build", 1, LogStream::Stdout, "compiling"));
        assert_eq!(build, ["[build]      compiling"]);
        let system = printer.format(&line("unit-tests", 2, LogStream::System, "checked out"));
        assert_eq!(system, ["[unit-tests#2] kiln: checked out"]);
    }

    fn entry(stage: &str, attempt: u32, seq: u64) -> pb::LogEntry {
        pb::LogEntry {
            stage: stage.into(),
            attempt,
            seq,
            line: None,
        }
    }

    #[test]
    fn a_resumed_stream_prints_no_line_twice() {
        let mut printed = Cursors::default();
        assert!(printed.resume().is_empty(), "nothing printed, no cursor");
        for seq in 0..3 {
            assert!(printed.admit(&entry("train", 1, seq)));
        }
        assert!(printed.admit(&entry("eval", 1, 0)));
        // A coordinator that ignores the cursors sends everything again.
        let replayed: Vec<bool> = (0..5)
            .map(|seq| printed.admit(&entry("train", 1, seq)))
            .collect();
        assert_eq!(replayed, [false, false, false, true, true]);
        assert!(!printed.admit(&entry("eval", 1, 0)));
        // A retry numbers from 0 again; an earlier attempt is old news.
        assert!(printed.admit(&entry("train", 2, 0)));
        assert!(!printed.admit(&entry("train", 1, 5)));
        let resume: Vec<(String, u32, u64)> = printed
            .resume()
            .into_iter()
            .map(|c| (c.stage, c.attempt, c.next_seq))
            .collect();
        assert_eq!(resume, [("eval".into(), 1, 1), ("train".into(), 2, 1)]);
    }

    #[test]
    fn one_stage_prints_bare_text_and_marks_retries() {
        let mut printer = Printer {
            prefix_width: None,
            last_attempt: None,
            colour: false,
        };
        assert_eq!(
            printer.format(&line("train", 1, LogStream::Stderr, "warn")),
            ["warn"]
        );
        assert_eq!(
            printer.format(&line("train", 2, LogStream::Stdout, "again")),
            ["kiln: --- attempt 2 ---", "again"]
        );
    }
}
