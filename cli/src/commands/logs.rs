//! `kiln logs RUN [STAGE] [-f]`.
//!
//! All lines go to stdout in the order the coordinator sends them, so
//! `kiln logs 7 > out.txt` keeps stdout and stderr of a stage interleaved
//! as they happened. Lines Kiln wrote itself start with `kiln:` (dimmed on
//! a terminal), so they stand apart from the stage's own output.

use futures::StreamExt;
use kiln_proto::v1 as pb;

use crate::args::OutputFormat;
use crate::client::Coordinator;
use crate::error::{CliError, Outcome};
use crate::output;
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
    let request = pb::StreamLogsRequest {
        run_id,
        stage: stage.unwrap_or_default().to_owned(),
        follow,
        resume: Vec::new(),
    };
    let mut entries = coordinator.stream_logs(request).await?;
    let mut printer = Printer {
        prefix_width: (stage.is_none()).then(|| names.iter().map(|n| n.len()).max().unwrap_or(0)),
        last_attempt: None,
        colour: output::colour_enabled(),
    };
    while let Some(entry) = entries.next().await {
        let line = LogLineView::from(entry?);
        match format {
            OutputFormat::Json => output::json_line(&line)?,
            OutputFormat::Table => {
                for text in printer.format(&line) {
                    output::line(text)?;
                }
            }
        }
    }
    Ok(())
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
