//! `--mode agents`: a real farm running no-op runs, the shape of a CI
//! farm's "builds per second".
//!
//! Starts `kiln-coordinator` on a temp data dir and `--agents W` (default
//! 4) `kiln-agent --executor process` processes with `--capacity C`
//! (default 1, like a Buildbot worker's `max_builds=1`), each with its own
//! work dir, authenticated with an agent token created by the admin. It
//! registers a one-stage pipeline whose stage runs `true` in a throwaway git
//! repository, runs W unmeasured warm-up runs (each agent clones the
//! repository into its cache once), then submits `--runs N` (default 200)
//! runs at once over one connection and waits until all have finished.
//! Runs are triggered at the repository's head commit, as a push webhook
//! does, so the coordinator does not start `git rev-parse` per run.
//!
//! What it reports, all in one final line
//! `agents runs_per_s=.. p50_ms=.. p99_ms=.. agent_overhead_ms=.. ...`:
//!
//! - `runs_per_s`: N over the time from the first submit (client clock) to
//!   the last run's `finished_ms` (the coordinator's record, written once the
//!   run's end is durable; same host, same wall clock).
//! - `p50_ms`, `p99_ms`: per run, from the client sending its `TriggerRun`
//!   to the run's `finished_ms` — submit to finish, queueing included.
//! - `agent_overhead_ms`: the median of the agents' own per-attempt
//!   "prepared in N ms" lines (workspace and checkout), from their stderr or
//!   the stages' system log lines, when the agents print one
//!   (`overhead_from=agent-log`). Otherwise (`overhead_from=stage-records`)
//!   the median of each stage's `finished_ms - started_ms`: the agent sends
//!   `StageStarted` the moment an `Assign` arrives, before it touches the
//!   workspace, so this spans workspace, checkout, `sh -e true` and the
//!   report back — the whole cost of a stage on an agent, as in
//!   `docker-bench`. `stage_on_agent_ms` always carries that median.
//! - `queued_ms`: median of stage `started_ms - ` run `created_ms`, the wait
//!   for a free agent plus dispatch (with N runs at once, mostly waiting).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use kiln_common::channel::KilnChannel;
use kiln_proto::v1 as pb;
use kiln_tests::{Coordinator, CoordinatorOptions, Process, Repo, binary};
use pb::control_service_client::ControlServiceClient;

use crate::args::Args;
use crate::stats::percentile;

/// Stage logs of this many measured runs are searched for "prepared in"
/// lines; every run's would cost the coordinator more than the runs did.
const LOG_SAMPLE_RUNS: usize = 20;

/// How often the bench asks whether the next run has finished. Figures come
/// from the coordinator's records, so this only bounds how long after the
/// last run the bench notices.
const POLL_EVERY: Duration = Duration::from_millis(20);

pub(crate) async fn run(args: &Args) -> Result<()> {
    let settings = Settings::from_args(args);
    let farm = Farm::start(&settings).await?;
    farm.warm_up(&settings).await?;
    let mut figures = farm.measure(settings.runs, settings.timeout).await?;
    farm.prepared_from_stage_logs(&mut figures).await?;
    eprintln!("{}", figures.describe("agents"));
    println!("{}", figures.summary_line(&settings));
    Ok(())
}

/// The flags the agents and read-load modes share.
pub(crate) struct Settings {
    pub(crate) n_agents: usize,
    pub(crate) capacity: u32,
    pub(crate) runs: usize,
    pub(crate) warmup: usize,
    /// For all of one phase's runs to finish.
    pub(crate) timeout: Duration,
}

impl Settings {
    pub(crate) fn from_args(args: &Args) -> Self {
        let n_agents = args.get("--agents", 4).max(1) as usize;
        Self {
            n_agents,
            capacity: args.get("--capacity", 1).max(1) as u32,
            runs: args.get("--runs", 200).max(1) as usize,
            warmup: args.get("--warmup", n_agents as u64) as usize,
            timeout: Duration::from_secs(args.get("--timeout-s", 600)),
        }
    }
}

/// A coordinator, its agents and the no-op pipeline; everything is killed
/// and removed when dropped (processes first, then their dirs).
pub(crate) struct Farm {
    agents: Vec<Process>,
    pub(crate) coordinator: Coordinator,
    /// Each agent's stderr, searched for "prepared in" lines.
    agent_logs: Vec<PathBuf>,
    pub(crate) client: ControlServiceClient<KilnChannel>,
    noop: Pipeline,
    /// The pipelines' repositories, which agents clone from.
    repos: Vec<Repo>,
    /// Agents' work dirs, their logs and the coordinator's data dir.
    dirs: Vec<tempfile::TempDir>,
}

/// A registered pipeline and the commit its runs are triggered at.
pub(crate) struct Pipeline {
    pub(crate) name: String,
    pub(crate) commit: String,
}

impl Farm {
    pub(crate) async fn start(settings: &Settings) -> Result<Self> {
        let data = tempfile::tempdir()?;
        let options = CoordinatorOptions {
            // The coordinator's own defaults, not the tests' short ones.
            lease_ttl: "10s",
            heartbeat: "1s",
            extra_args: vec![
                "--max-agents-per-token".into(),
                settings.n_agents.max(64).to_string(),
            ],
            ..Default::default()
        };
        let coordinator = Coordinator::start(data.path(), &options)?;
        let client = coordinator.client().await?;
        let logs = tempfile::tempdir()?;
        let mut farm = Self {
            agents: Vec::new(),
            coordinator,
            agent_logs: Vec::new(),
            client,
            noop: Pipeline {
                name: String::new(),
                commit: String::new(),
            },
            repos: Vec::new(),
            dirs: Vec::new(),
        };
        for i in 0..settings.n_agents {
            let work = tempfile::tempdir()?;
            let log = logs.path().join(format!("agent-{i}.log"));
            farm.agents.push(spawn_agent(
                &farm.coordinator,
                &format!("bench-{i}"),
                settings.capacity,
                &work,
                &log,
            )?);
            farm.agent_logs.push(log);
            farm.dirs.push(work);
        }
        farm.dirs.extend([logs, data]);
        farm.wait_for_agents(settings.n_agents).await?;
        farm.noop = farm
            .register("pipeline: bench-noop\nstages:\n  noop:\n    commands: [\"true\"]\n")
            .await?;
        eprintln!(
            "{} agents connected (capacity {} each, process executor)",
            settings.n_agents, settings.capacity
        );
        Ok(farm)
    }

    /// Registers `kiln_yml` from a throwaway repository of its own.
    pub(crate) async fn register(&mut self, kiln_yml: &str) -> Result<Pipeline> {
        let repo = Repo::new(kiln_yml)?;
        let commit = repo.commit("README", "kiln-bench\n")?;
        let name = kiln_tests::register(&self.coordinator, &repo).await?;
        self.repos.push(repo);
        Ok(Pipeline { name, commit })
    }

    async fn wait_for_agents(&mut self, n_agents: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let agents = self
                .client
                .list_agents(pb::ListAgentsRequest {})
                .await?
                .into_inner()
                .agents;
            if agents.iter().filter(|agent| agent.connected).count() >= n_agents {
                return Ok(());
            }
            if let Some(exited) = self.agents.iter_mut().find_map(|agent| {
                let status = agent.child.try_wait().ok().flatten()?;
                Some(format!("{} exited ({status})", agent.name))
            }) {
                bail!("{exited}; its stderr is in the bench's temp dir");
            }
            if Instant::now() > deadline {
                bail!("only some of {n_agents} agents connected within 30s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Unmeasured runs, so every agent has cloned the repository once.
    pub(crate) async fn warm_up(&self, settings: &Settings) -> Result<()> {
        if settings.warmup > 0 {
            let ids = self.submit(&self.noop, settings.warmup).await?;
            self.wait_all(&ids, settings.timeout).await?;
        }
        Ok(())
    }

    /// Triggers `n` runs of the no-op pipeline at once, waits for all of
    /// them and returns what they cost.
    pub(crate) async fn measure(&self, n: usize, timeout: Duration) -> Result<Figures> {
        let log_offsets = self.agent_log_lengths();
        let submitted = self.submit(&self.noop, n).await?;
        let runs = self.wait_all(&submitted, timeout).await?;
        let first_submit_ms = submitted.iter().map(|run| run.1).min().unwrap_or(0);
        let last_finish_ms = runs.iter().map(|run| run.finished_ms).max().unwrap_or(0);
        let wall_ms = last_finish_ms.saturating_sub(first_submit_ms).max(1) as f64;
        let submit_ms: HashMap<u64, u64> = submitted.iter().copied().collect();
        let latency_ms = runs
            .iter()
            .map(|run| run.finished_ms.saturating_sub(submit_ms[&run.id]) as f64)
            .collect();
        let stages = runs.iter().flat_map(|run| {
            run.stages
                .iter()
                .map(move |stage| (run.created_ms, stage.started_ms, stage.finished_ms))
        });
        let (mut stage_on_agent_ms, mut queued_ms) = (Vec::new(), Vec::new());
        for (created, started, finished) in stages {
            stage_on_agent_ms.push(finished.saturating_sub(started) as f64);
            queued_ms.push(started.saturating_sub(created) as f64);
        }
        Ok(Figures {
            runs: n,
            runs_per_s: n as f64 * 1000.0 / wall_ms,
            latency_ms,
            stage_on_agent_ms,
            queued_ms,
            prepared_ms: self.prepared_in_agent_logs(&log_offsets)?,
            sample_run_ids: runs
                .iter()
                .take(LOG_SAMPLE_RUNS)
                .map(|run| run.id)
                .collect(),
        })
    }

    /// When the agents wrote no "prepared in" lines to stderr, looks for
    /// them among the system lines of a sample of the runs' stage logs.
    /// Separate from [`Farm::measure`] because reading logs competes with
    /// whatever load a caller put on the coordinator.
    pub(crate) async fn prepared_from_stage_logs(&self, figures: &mut Figures) -> Result<()> {
        if !figures.prepared_ms.is_empty() {
            return Ok(());
        }
        let mut client = self.client.clone();
        for &run_id in &figures.sample_run_ids {
            for entry in kiln_tests::logs(&mut client, run_id, "").await? {
                let line = entry.line.unwrap_or_default();
                if line.stream == pb::LogStream::System as i32 {
                    figures.prepared_ms.extend(prepared_ms(&line.text));
                }
            }
        }
        Ok(())
    }

    /// Triggers `n` runs of `pipeline` concurrently on the one connection;
    /// returns (run id, client clock in ms since the epoch just before its
    /// request left).
    pub(crate) async fn submit(&self, pipeline: &Pipeline, n: usize) -> Result<Vec<(u64, u64)>> {
        let triggers = (0..n).map(|_| {
            let mut client = self.client.clone();
            let request = pb::TriggerRunRequest {
                pipeline: pipeline.name.clone(),
                rev: pipeline.commit.clone(),
                triggered_by: "kiln-bench".into(),
                ..Default::default()
            };
            async move {
                let submitted_ms = now_ms();
                let run = client.trigger_run(request).await?.into_inner();
                anyhow::Ok((run.id, submitted_ms))
            }
        });
        futures::future::try_join_all(triggers).await
    }

    /// Waits until every run has finished, oldest first (one small request
    /// per poll, not a listing); fails on a run that did not succeed.
    pub(crate) async fn wait_all(
        &self,
        submitted: &[(u64, u64)],
        timeout: Duration,
    ) -> Result<Vec<pb::Run>> {
        let deadline = Instant::now() + timeout;
        let mut client = self.client.clone();
        let mut finished = Vec::with_capacity(submitted.len());
        for &(id, _) in submitted {
            let run = loop {
                let run = kiln_tests::get_run(&mut client, id).await?;
                if is_finished(&run)? {
                    break run;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{} of {} runs finished within {timeout:?}",
                        finished.len(),
                        submitted.len()
                    );
                }
                tokio::time::sleep(POLL_EVERY).await;
            };
            if run.state != pb::RunState::Succeeded as i32 {
                let why = run.stages.iter().map(|stage| stage.message.as_str());
                bail!(
                    "run {id} did not succeed: {}",
                    why.collect::<Vec<_>>().join("; ")
                );
            }
            finished.push(run);
        }
        Ok(finished)
    }

    fn agent_log_lengths(&self) -> Vec<u64> {
        let length = |path: &PathBuf| std::fs::metadata(path).map_or(0, |meta| meta.len());
        self.agent_logs.iter().map(length).collect()
    }

    /// "prepared in N ms" values the agents wrote to stderr after `offsets`.
    fn prepared_in_agent_logs(&self, offsets: &[u64]) -> Result<Vec<f64>> {
        let mut values = Vec::new();
        for (path, &offset) in self.agent_logs.iter().zip(offsets) {
            let mut file = File::open(path)?;
            file.seek(SeekFrom::Start(offset))?;
            let mut text = Vec::new();
            file.read_to_end(&mut text)?;
            let text = String::from_utf8_lossy(&text);
            values.extend(text.lines().filter_map(prepared_ms));
        }
        Ok(values)
    }
}

/// Starts one `kiln-agent --executor process` with its stderr (at `info`,
/// the agent's default) in `log`.
fn spawn_agent(
    coordinator: &Coordinator,
    name: &str,
    capacity: u32,
    work: &tempfile::TempDir,
    log: &PathBuf,
) -> Result<Process> {
    let child = Command::new(binary("kiln-agent"))
        .args(["--coordinator", &coordinator.url(), "--name", name])
        .args(["--capacity", &capacity.to_string(), "--executor", "process"])
        .args(["--work-dir".as_ref(), work.path().as_os_str()])
        .env("KILN_AGENT_TOKEN", &coordinator.agent_token)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log)?)
        .spawn()
        .context("starting kiln-agent")?;
    Ok(Process {
        child,
        name: format!("kiln-agent {name}"),
    })
}

fn is_finished(run: &pb::Run) -> Result<bool> {
    Ok(matches!(
        pb::RunState::try_from(run.state)?,
        pb::RunState::Succeeded | pb::RunState::Failed | pb::RunState::Cancelled
    ))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// What one batch of runs cost.
pub(crate) struct Figures {
    pub(crate) runs: usize,
    pub(crate) runs_per_s: f64,
    /// Per run, client submit to the run's `finished_ms`.
    latency_ms: Vec<f64>,
    /// Per stage, `finished_ms - started_ms`.
    stage_on_agent_ms: Vec<f64>,
    /// Per stage, its `started_ms` - its run's `created_ms`.
    queued_ms: Vec<f64>,
    /// The agents' own "prepared in N ms" lines; empty when they print none.
    prepared_ms: Vec<f64>,
    /// Runs whose stage logs [`Farm::prepared_from_stage_logs`] searches.
    sample_run_ids: Vec<u64>,
}

impl Figures {
    /// The agents' own per-stage cost and where it came from.
    fn agent_overhead(&self) -> (f64, &'static str) {
        if self.prepared_ms.is_empty() {
            (percentile(&self.stage_on_agent_ms, 0.5), "stage-records")
        } else {
            (percentile(&self.prepared_ms, 0.5), "agent-log")
        }
    }

    pub(crate) fn summary_line(&self, settings: &Settings) -> String {
        let (overhead, from) = self.agent_overhead();
        format!(
            "agents runs_per_s={:.1} p50_ms={:.0} p99_ms={:.0} agent_overhead_ms={overhead:.1} overhead_from={from} stage_on_agent_ms={:.1} queued_ms={:.0} agents={} capacity={} runs={}",
            self.runs_per_s,
            percentile(&self.latency_ms, 0.5),
            percentile(&self.latency_ms, 0.99),
            percentile(&self.stage_on_agent_ms, 0.5),
            percentile(&self.queued_ms, 0.5),
            settings.n_agents,
            settings.capacity,
            self.runs,
        )
    }

    /// One human line for stderr.
    pub(crate) fn describe(&self, phase: &str) -> String {
        let (overhead, from) = self.agent_overhead();
        format!(
            "{phase}: {} runs, {:.1} runs/s; submit→finished p50 {:.0} ms, p99 {:.0} ms; on an agent p50 {:.1} ms, p99 {:.1} ms; agent overhead {overhead:.1} ms (from {from}, {} prepared lines)",
            self.runs,
            self.runs_per_s,
            percentile(&self.latency_ms, 0.5),
            percentile(&self.latency_ms, 0.99),
            percentile(&self.stage_on_agent_ms, 0.5),
            percentile(&self.stage_on_agent_ms, 0.99),
            self.prepared_ms.len(),
        )
    }
}

/// The milliseconds of an agent's "prepared in N ms" line (also `N s`,
/// `N µs`/`N us`, or a `prepared_ms=N` field), whatever the log format
/// around it; `None` for any other line.
fn prepared_ms(line: &str) -> Option<f64> {
    let line = line.to_ascii_lowercase();
    if let Some(at) = line.find("prepared_ms=") {
        return number_prefix(&line[at + "prepared_ms=".len()..]).map(|(value, _)| value);
    }
    let at = line.find("prepared in ")?;
    let (value, rest) = number_prefix(&line[at + "prepared in ".len()..])?;
    let unit = rest.trim_start();
    if unit.starts_with("ms") {
        Some(value)
    } else if unit.starts_with("µs") || unit.starts_with("us") {
        Some(value / 1000.0)
    } else if unit.starts_with('s') {
        Some(value * 1000.0)
    } else {
        None
    }
}

/// A leading decimal number and the text after it.
fn number_prefix(text: &str) -> Option<(f64, &str)> {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    Some((text[..end].parse().ok()?, &text[end..]))
}

#[cfg(test)]
mod tests {
    use super::prepared_ms;

    #[test]
    fn reads_prepared_lines_in_any_unit_and_ignores_the_rest() {
        let check = |line: &str, want: Option<f64>| assert_eq!(prepared_ms(line), want, "{line}");
        check(
            "2026-01-01T00:00:00Z  INFO kiln_agent::stage: prepared in 12 ms stage=1/noop/1",
            Some(12.0),
        );
        check("[kiln] workspace prepared in 3.5ms", Some(3.5));
        check("prepared in 1.25 s", Some(1250.0));
        check("prepared in 800µs", Some(0.8));
        check("INFO attempt ready prepared_ms=7 stage=2/x/1", Some(7.0));
        check("INFO starting stage stage=1/noop/1", None);
        check("prepared in a hurry", None);
        check("prepared in 5 minutes", None);
    }
}
