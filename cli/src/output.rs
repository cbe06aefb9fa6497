//! Printing: aligned tables for people, JSON for scripts.
//!
//! Table headers are stable (the end-to-end tests and scripts match on
//! them); columns are separated by at least two spaces and the last column
//! is not padded. Every write returns an error instead of panicking, so a
//! closed pipe (`kiln runs | head -1`) ends the command quietly.

use std::io::{self, IsTerminal, Write};

use serde::Serialize;

use crate::args::OutputFormat;
use crate::error::CliError;
use crate::timefmt;
use crate::view::{AgentView, PipelineView, RunView, StageView};

/// Writes one line to stdout.
pub(crate) fn line(text: impl std::fmt::Display) -> Result<(), CliError> {
    writeln!(io::stdout().lock(), "{text}")?;
    Ok(())
}

/// A line for people watching: on stdout normally, on stderr when stdout
/// is reserved for JSON.
pub(crate) fn progress(format: OutputFormat, text: &str) -> Result<(), CliError> {
    match format {
        OutputFormat::Table => line(text),
        OutputFormat::Json => {
            writeln!(io::stderr().lock(), "{text}")?;
            Ok(())
        }
    }
}

/// Pretty JSON for one value (an object or an array), then a newline.
pub(crate) fn json(value: &impl Serialize) -> Result<(), CliError> {
    let value = with_rfc3339(serde_json::to_value(value).map_err(io::Error::from)?);
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &value).map_err(io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

/// Compact JSON on one line, for streams (`kiln logs --output json`).
pub(crate) fn json_line(value: &impl Serialize) -> Result<(), CliError> {
    let value = with_rfc3339(serde_json::to_value(value).map_err(io::Error::from)?);
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, &value).map_err(io::Error::from)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// The JSON keys holding a time as milliseconds since the Unix epoch, and
/// the key of the same time in RFC 3339 that [`with_rfc3339`] adds beside.
const TIME_KEYS: [(&str, &str); 8] = [
    ("at_ms", "at"),
    ("created_ms", "created_at"),
    ("finished_ms", "finished_at"),
    ("last_seen_ms", "last_seen_at"),
    ("registered_ms", "registered_at"),
    ("revoked_ms", "revoked_at"),
    ("started_ms", "started_at"),
    ("updated_ms", "updated_at"),
];

/// `value` with an RFC 3339 UTC string (or `null`) beside every time in
/// milliseconds, at any depth: `created_ms: 1709251199000` gains
/// `created_at: "2024-02-29T23:59:59Z"`. The milliseconds stay, so scripts
/// that read them keep working. Keys come out sorted.
fn with_rfc3339(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Array(items) => Value::Array(items.into_iter().map(with_rfc3339).collect()),
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (key, item) in map {
                if let Some((_, rfc_key)) = TIME_KEYS.iter().find(|(ms_key, _)| *ms_key == key) {
                    let text = item
                        .as_u64()
                        .and_then(timefmt::rfc3339)
                        .map_or(Value::Null, Value::String);
                    out.insert((*rfc_key).to_owned(), text);
                }
                out.insert(key, with_rfc3339(item));
            }
            Value::Object(out)
        }
        other => other,
    }
}

/// True when stdout is a terminal that wants colour (`NO_COLOR` unset), so
/// pipes and files never see escape codes.
pub(crate) fn colour_enabled() -> bool {
    io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Faint text when `colour` is on, plain text otherwise.
pub(crate) fn dim(text: &str, colour: bool) -> String {
    if colour {
        format!("\x1b[2m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

/// Columns padded to their widest cell (comfy-table, without borders):
/// two spaces between columns, the last one not padded.
pub(crate) fn table<const N: usize>(headers: [&str; N], rows: &[[String; N]]) -> String {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(headers);
    for row in rows {
        table.add_row(row);
    }
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, if i + 1 == N { 0 } else { 2 }));
    }
    let mut text = String::new();
    for line in table.lines() {
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// The first 10 characters of a commit id, the usual short form.
pub(crate) fn short_commit(commit: &str) -> &str {
    commit.get(..10).unwrap_or(commit)
}

/// `ID PIPELINE STATE COMMIT TRIGGERED_BY AGE DURATION`.
pub(crate) fn runs_table(runs: &[RunView], now_ms: u64) -> String {
    let rows: Vec<_> = runs
        .iter()
        .map(|run| {
            let created = run.created_ms.unwrap_or(0);
            [
                run.id.to_string(),
                run.pipeline.clone(),
                run.state.as_str().to_owned(),
                or_dash(short_commit(&run.commit)),
                or_dash(&run.triggered_by),
                timefmt::age(created, now_ms),
                timefmt::elapsed(created, run.finished_ms.unwrap_or(0), now_ms),
            ]
        })
        .collect();
    let headers = [
        "ID",
        "PIPELINE",
        "STATE",
        "COMMIT",
        "TRIGGERED_BY",
        "AGE",
        "DURATION",
    ];
    table(headers, &rows)
}

/// `STAGE STATE ATTEMPT AGENT DURATION MESSAGE`.
pub(crate) fn stages_table(stages: &[StageView], now_ms: u64) -> String {
    let rows: Vec<_> = stages
        .iter()
        .map(|stage| {
            let attempt = match stage.attempt {
                0 => "-".to_owned(),
                n => n.to_string(),
            };
            let started = stage.started_ms.unwrap_or(0);
            [
                stage.name.clone(),
                stage.state.as_str().to_owned(),
                attempt,
                or_dash(stage.agent.as_deref().unwrap_or("")),
                timefmt::elapsed(started, stage.finished_ms.unwrap_or(0), now_ms),
                stage_message(stage),
            ]
        })
        .collect();
    let headers = ["STAGE", "STATE", "ATTEMPT", "AGENT", "DURATION", "MESSAGE"];
    table(headers, &rows)
}

/// The coordinator's message, or the exit code of a failed command when it
/// gave none.
pub(crate) fn stage_message(stage: &StageView) -> String {
    match stage.exit_code {
        _ if !stage.message.is_empty() => stage.message.clone(),
        Some(code) if code != 0 => format!("exit code {code}"),
        _ => String::new(),
    }
}

/// The lines above `kiln status`'s stage table.
pub(crate) fn run_header(run: &RunView, now_ms: u64) -> String {
    let created = run.created_ms.unwrap_or(0);
    let rev = if run.rev.is_empty() {
        "branch head"
    } else {
        &run.rev
    };
    let duration = timefmt::elapsed(created, run.finished_ms.unwrap_or(0), now_ms);
    let version = match (run.pipeline_version, run.pipeline_digest.as_str()) {
        (0, "") => "no version".to_owned(),
        (0, _) => "no version: its pipeline file was refused".to_owned(),
        (version, _) => format!("version {version}"),
    };
    let file = if run.pipeline_digest.is_empty() {
        String::new()
    } else {
        format!("file       {} (read at the commit)\n", run.pipeline_digest)
    };
    let pairs = |map: &std::collections::BTreeMap<String, String>| {
        map.iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut inputs = String::new();
    if let Some(plan) = &run.rollback {
        let what = if plan.summary.is_empty() {
            format!(
                "roll back {}/{} from release {} to release {}: {}",
                plan.pipeline, plan.environment, plan.from_release, plan.to_release, plan.reason
            )
        } else {
            plan.summary.clone()
        };
        inputs.push_str(&format!("deploys    {what}\n"));
    }
    if !run.variables.is_empty() {
        inputs.push_str(&format!("event      {}\n", pairs(&run.variables)));
    }
    if !run.params.is_empty() {
        inputs.push_str(&format!("params     {}\n", pairs(&run.params)));
    }
    format!(
        "run {id}  {pipeline} ({version})  {state}\n\
         commit     {commit} ({rev})\n\
         {file}{inputs}\
         triggered  by {by}, {age} ({at})\n\
         duration   {duration}\n",
        id = run.id,
        pipeline = run.pipeline,
        state = run.state.as_str(),
        commit = or_dash(&run.commit),
        by = or_dash(&run.triggered_by),
        age = timefmt::age(created, now_ms),
        at = timefmt::datetime(created),
    )
}

/// `NAME STATE RUNNING/CAPACITY LABELS LAST_SEEN`.
pub(crate) fn agents_table(agents: &[AgentView], now_ms: u64) -> String {
    let rows: Vec<_> = agents
        .iter()
        .map(|agent| {
            let labels: Vec<_> = agent
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            [
                agent.name.clone(),
                agent.state.as_str().to_owned(),
                format!("{}/{}", agent.running, agent.capacity),
                cpus_used(agent),
                memory_used(agent),
                gpus_used(agent),
                or_dash(&labels.join(",")),
                timefmt::age(agent.last_seen_ms.unwrap_or(0), now_ms),
            ]
        })
        .collect();
    table(
        [
            "NAME",
            "STATE",
            "RUNNING/CAPACITY",
            "CPUS",
            "MEMORY",
            "GPUS",
            "LABELS",
            "LAST_SEEN",
        ],
        &rows,
    )
}

/// `1.5/8`: CPUs reserved of those declared (`-` when not declared).
fn cpus_used(agent: &AgentView) -> String {
    let total = agent.resources.cpus;
    let total = if total > 0.0 {
        format!("{total}")
    } else {
        "-".into()
    };
    format!("{}/{total}", agent.in_use.cpus)
}

/// `2.0G/15.6G`: memory reserved of what was declared.
fn memory_used(agent: &AgentView) -> String {
    let gib = |bytes: u64| format!("{:.1}G", bytes as f64 / (1u64 << 30) as f64);
    let total = match agent.resources.memory_bytes {
        0 => "-".into(),
        bytes => gib(bytes),
    };
    format!("{}/{total}", gib(agent.in_use.memory_bytes))
}

/// `1/2 (0)`: GPUs in use of those declared, and which; `-` without any.
fn gpus_used(agent: &AgentView) -> String {
    if agent.resources.gpus.is_empty() {
        return "-".into();
    }
    let mut used = format!("{}/{}", agent.in_use.gpus.len(), agent.resources.gpus.len());
    if !agent.in_use.gpus.is_empty() {
        let devices: Vec<String> = agent.in_use.gpus.iter().map(u32::to_string).collect();
        used.push_str(&format!(" ({})", devices.join(",")));
    }
    used
}

/// `NAME VERSION STAGES REPO BRANCH SUBDIR REGISTERED`.
pub(crate) fn pipelines_table(pipelines: &[PipelineView], now_ms: u64) -> String {
    let rows: Vec<_> = pipelines
        .iter()
        .map(|p| {
            [
                p.name.clone(),
                p.version.to_string(),
                p.stages.len().to_string(),
                p.repo.clone(),
                p.branch.clone(),
                or_dash(&p.subdir),
                timefmt::age(p.registered_ms.unwrap_or(0), now_ms),
            ]
        })
        .collect();
    let headers = [
        "NAME",
        "VERSION",
        "STAGES",
        "REPO",
        "BRANCH",
        "SUBDIR",
        "REGISTERED",
    ];
    table(headers, &rows)
}

/// `kiln pipeline show`: the facts, then the file.
pub(crate) fn pipeline_details(p: &PipelineView) -> String {
    let rows = [
        ["pipeline".to_owned(), p.name.clone()],
        ["version".to_owned(), p.version.to_string()],
        ["stages".to_owned(), p.stages.join(", ")],
        ["repo".to_owned(), p.repo.clone()],
        ["branch".to_owned(), p.branch.clone()],
        ["subdir".to_owned(), or_dash(&p.subdir)],
        [
            "file".to_owned(),
            if p.path.is_empty() {
                "registered snapshot".to_owned()
            } else {
                format!("{} (read at each run's commit)", p.path)
            },
        ],
        ["digest".to_owned(), or_dash(&p.digest)],
        ["repository".to_owned(), or_dash(&p.repository)],
        [
            "registered".to_owned(),
            timefmt::datetime(p.registered_ms.unwrap_or(0)),
        ],
    ];
    let facts: String = rows.iter().map(|[k, v]| format!("{k:<11}{v}\n")).collect();
    let yaml = p.spec_yaml.trim_end();
    format!("{facts}\n--- kiln.yml ---\n{yaml}\n")
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

/// Metrics and gate decisions under the stage table ("" when none).
pub(crate) fn delivery_details(stages: &[StageView]) -> String {
    let mut out = String::new();
    for stage in stages {
        if !stage.metrics.is_empty() {
            let values: Vec<String> = stage
                .metrics
                .iter()
                .map(|(k, v)| format!("{k}={}", number(*v)))
                .collect();
            out.push_str(&format!(
                "\nmetrics of {}: {}",
                stage.name,
                values.join(" ")
            ));
        }
        if let Some(gate) = &stage.gate {
            out.push_str(&format!("\ngate {}: {}", stage.name, gate.summary));
            for check in &gate.checks {
                let value = check.value.map_or("missing".to_owned(), number);
                let champion = check
                    .champion
                    .map(|c| format!(" (champion {})", number(c)))
                    .unwrap_or_default();
                let by = check
                    .decided_by_on_missing
                    .as_ref()
                    .map(|policy| format!(" [on_missing: {policy} decided]"))
                    .unwrap_or_default();
                let verdict = if check.passed { "pass" } else { "FAIL" };
                out.push_str(&format!(
                    "\n  {verdict} {} {} {value}{champion}{by}",
                    check.metric, check.rule
                ));
            }
        }
    }
    out
}

/// A metric value for people: 4 decimals, NaN spelled out.
pub(crate) fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else {
        format!("{value:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{AgentState, ResourcesView, StageState, StageView};

    #[test]
    fn the_agents_table_shows_resources_and_what_is_in_use() {
        let agent = |name: &str, resources: ResourcesView, in_use: ResourcesView| AgentView {
            name: name.into(),
            state: AgentState::Connected,
            running: 1,
            capacity: 4,
            labels: Default::default(),
            version: String::new(),
            last_seen_ms: None,
            resources,
            in_use,
        };
        let gpu_box = agent(
            "gpu-box",
            ResourcesView {
                cpus: 8.0,
                memory_bytes: 16 << 30,
                gpus: vec![0, 1],
            },
            ResourcesView {
                cpus: 2.0,
                memory_bytes: 4 << 30,
                gpus: vec![1],
            },
        );
        let bare = agent("bare", ResourcesView::default(), ResourcesView::default());
        let table = agents_table(&[gpu_box, bare], 0);
        let lines: Vec<Vec<&str>> = table
            .lines()
            .map(|line| line.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0][..6],
            [
                "NAME",
                "STATE",
                "RUNNING/CAPACITY",
                "CPUS",
                "MEMORY",
                "GPUS"
            ]
        );
        assert_eq!(
            lines[1][..7],
            [
                "gpu-box",
                "connected",
                "1/4",
                "2/8",
                "4.0G/16.0G",
                "1/2",
                "(1)"
            ]
        );
        assert_eq!(
            lines[2][..6],
            ["bare", "connected", "1/4", "0/-", "0.0G/-", "-"]
        );
    }

    #[test]
    fn times_in_milliseconds_gain_rfc3339_siblings_at_any_depth() {
        let value = serde_json::json!({
            "id": 7,
            "created_ms": 1_709_251_199_000u64,
            "finished_ms": null,
            "timeout_ms": 5000,
            "stages": [{"started_ms": 951_912_000_250u64}],
        });
        let out = with_rfc3339(value);
        assert_eq!(out["created_at"], "2024-02-29T23:59:59Z");
        assert_eq!(out["created_ms"], 1_709_251_199_000u64);
        assert!(out["finished_at"].is_null());
        assert_eq!(out["stages"][0]["started_at"], "2000-03-01T12:00:00.25Z");
        // Only the listed time keys: a duration stays as it is.
        assert!(out.get("timeout_at").is_none(), "{out}");
    }

    #[test]
    fn tables_align_columns_and_do_not_pad_the_last() {
        let text = table(
            ["A", "LONG_HEADER", "Z"],
            &[
                ["x".into(), "y".into(), "last".into()],
                ["wide cell".into(), "".into(), "".into()],
            ],
        );
        assert_eq!(
            text,
            "A          LONG_HEADER  Z\n\
             x          y            last\n\
             wide cell\n"
        );
    }

    #[test]
    fn stage_rows_show_dashes_until_things_happen() {
        let stage = StageView {
            idx: 0,
            name: "train".into(),
            state: StageState::Failed,
            attempt: 2,
            agent: Some("agent-1".into()),
            started_ms: Some(1_000),
            finished_ms: Some(3_500),
            exit_code: Some(3),
            message: String::new(),
            needs: vec![],
            metrics: Default::default(),
            gate: None,
        };
        let pending = StageView {
            name: "evaluate".into(),
            state: StageState::Pending,
            attempt: 0,
            agent: None,
            started_ms: None,
            finished_ms: None,
            exit_code: None,
            ..stage.clone()
        };
        let text = stages_table(&[stage, pending], 10_000);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(
            lines[0],
            "STAGE     STATE    ATTEMPT  AGENT    DURATION  MESSAGE"
        );
        assert_eq!(
            lines[1],
            "train     failed   2        agent-1  2.5s      exit code 3"
        );
        assert_eq!(lines[2], "evaluate  pending  -        -        -");
    }

    #[test]
    fn short_commits_are_ten_characters() {
        assert_eq!(short_commit("0123456789abcdef"), "0123456789");
        assert_eq!(short_commit("abc"), "abc");
    }
}
