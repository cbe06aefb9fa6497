//! Coordinator crashes while people and runs are watching: `kiln logs -f`
//! and `kiln run --wait` (the real CLI) carry on across a `kill -9` and a
//! restart on the same data dir and port, and twenty runs in flight through
//! five crashes end with every log line stored exactly once.

use std::collections::BTreeSet;
use std::io::Read;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use kiln_proto::v1 as pb;
use kiln_tests::{
    Coordinator, CoordinatorOptions, Process, Repo, get_run, kiln_command, logs, register,
    register_and_run, stage, start_agent, wait_run,
};

type Client = pb::control_service_client::ControlServiceClient<kiln_common::channel::KilnChannel>;

/// What a transport failure looks like when it leaks to the user.
const TRANSPORT_WORDS: [&str; 4] = ["h2", "transport", "broken pipe", "connection reset"];

/// A `kiln` process running alongside the test, its output collected as
/// it comes.
struct Cli {
    process: Process,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Cli {
    fn spawn(url: &str, args: &[&str]) -> Result<Self> {
        let mut child = kiln_command(url, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kiln")?;
        let stdout = collect(child.stdout.take().context("kiln stdout")?);
        let stderr = collect(child.stderr.take().context("kiln stderr")?);
        let process = Process {
            child,
            name: format!("kiln {}", args.join(" ")),
        };
        Ok(Self {
            process,
            stdout,
            stderr,
        })
    }

    fn stdout(&self) -> String {
        self.stdout.lock().expect("stdout buffer").clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr buffer").clone()
    }

    /// Waits until stdout satisfies `ready`.
    fn wait_for(&self, what: &str, limit: Duration, ready: impl Fn(&str) -> bool) -> Result<()> {
        let deadline = Instant::now() + limit;
        while !ready(&self.stdout()) {
            if Instant::now() > deadline {
                bail!(
                    "kiln did not print {what} within {limit:?}; stdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits for the CLI to exit; returns its status, stdout and stderr.
    fn finish(mut self, limit: Duration) -> Result<(ExitStatus, String, String)> {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.process.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!(
                    "kiln did not exit within {limit:?}; stdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The readers finish once the pipes close.
        std::thread::sleep(Duration::from_millis(100));
        Ok((status, self.stdout(), self.stderr()))
    }
}

/// Appends everything `pipe` yields to a shared string, on a thread.
fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buffer) {
            if n == 0 {
                break;
            }
            sink.lock()
                .expect("output buffer")
                .push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    });
    text
}

fn assert_no_transport_words(stderr: &str) {
    let lowered = stderr.to_lowercase();
    for word in TRANSPORT_WORDS {
        assert!(!lowered.contains(word), "stderr leaks `{word}`:\n{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_follow_carries_on_across_a_coordinator_crash_without_missing_or_doubling_a_line()
-> Result<()> {
    let data = tempfile::tempdir()?;
    let options = CoordinatorOptions::default();
    let mut coordinator = Coordinator::start(data.path(), &options)?;
    let work = tempfile::tempdir()?;
    let _agent = start_agent(&coordinator.url(), "steady", "", 1, work.path())?;
    let repo = Repo::new(
        "pipeline: numbered\nstages:\n  count:\n    commands: [\"for i in $(seq 1 80); do echo line $i; sleep 0.05; done\"]\n",
    )?;
    let id = register_and_run(&coordinator, &repo).await?;
    // One stage (bare lines, the stream ends with the stage) and every
    // stage (`[count] ` prefixes, the stream ends with the run).
    let one = Cli::spawn(
        &coordinator.url(),
        &["logs", &id.to_string(), "count", "-f"],
    )?;
    let all = Cli::spawn(&coordinator.url(), &["logs", &id.to_string(), "-f"])?;
    for cli in [&one, &all] {
        cli.wait_for("ten lines", Duration::from_secs(30), |out| {
            out.contains("line 10\n")
        })?;
    }

    coordinator.crash_and_restart(&options, Duration::from_millis(500))?;

    let expected: Vec<String> = (1..=80).map(|i| format!("line {i}")).collect();
    for (cli, prefix) in [(one, ""), (all, "[count] ")] {
        let (status, stdout, stderr) = cli.finish(Duration::from_secs(90))?;
        assert!(
            status.success(),
            "{status}; stdout:\n{stdout}\nstderr:\n{stderr}"
        );
        let lines: Vec<&str> = stdout
            .lines()
            .filter_map(|line| line.strip_prefix(prefix))
            .filter(|line| line.starts_with("line "))
            .collect();
        assert_eq!(lines, expected, "every line exactly once, in order");
        assert_no_transport_words(&stderr);
        assert!(
            stderr.matches("reconnecting").count() <= 1,
            "one note per outage:\n{stderr}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn run_wait_carries_on_across_a_coordinator_crash_and_exits_0() -> Result<()> {
    let data = tempfile::tempdir()?;
    let options = CoordinatorOptions::default();
    let mut coordinator = Coordinator::start(data.path(), &options)?;
    let work = tempfile::tempdir()?;
    let _agent = start_agent(&coordinator.url(), "steady", "", 1, work.path())?;
    let repo = Repo::new(
        "pipeline: waited\nstages:\n  slow:\n    commands: [\"for i in $(seq 1 60); do echo tick $i; sleep 0.05; done\"]\n  after:\n    needs: [slow]\n    commands: [\"echo after\"]\n",
    )?;
    let pipeline = register(&coordinator, &repo).await?;
    let cli = Cli::spawn(&coordinator.url(), &["run", &pipeline, "--wait"])?;
    cli.wait_for("the stage running", Duration::from_secs(30), |out| {
        out.contains("running on")
    })?;

    coordinator.crash_and_restart(&options, Duration::from_millis(500))?;

    let (status, stdout, stderr) = cli.finish(Duration::from_secs(90))?;
    assert_eq!(
        status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("succeeded") && stdout.contains("2 of 2 stages succeeded"),
        "{stdout}"
    );
    let running = stdout
        .lines()
        .filter(|line| line.contains("slow") && line.contains("running on"))
        .count();
    assert_eq!(running, 1, "no progress line twice:\n{stdout}");
    assert_no_transport_words(&stderr);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_gives_up_with_exit_3_when_the_coordinator_stays_away() -> Result<()> {
    let data = tempfile::tempdir()?;
    let mut coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let work = tempfile::tempdir()?;
    let _agent = start_agent(&coordinator.url(), "steady", "", 1, work.path())?;
    let repo = Repo::new(
        "pipeline: abandoned\nstages:\n  long:\n    commands: [\"echo started\", \"sleep 30\"]\n",
    )?;
    let id = register_and_run(&coordinator, &repo).await?;
    let cli = Cli::spawn(
        &coordinator.url(),
        &[
            "--reconnect-for",
            "2s",
            "logs",
            &id.to_string(),
            "long",
            "-f",
        ],
    )?;
    cli.wait_for("the first line", Duration::from_secs(30), |out| {
        out.contains("started")
    })?;
    coordinator.process.kill9();

    let (status, stdout, stderr) = cli.finish(Duration::from_secs(30))?;
    assert_eq!(
        status.code(),
        Some(3),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("error: cannot reach the coordinator at")
            && stderr.contains("could not get it back within 2.0s"),
        "{stderr}"
    );
    assert_no_transport_words(&stderr);
    Ok(())
}

/// xorshift64*, seeded, so a failing crash schedule can be replayed.
struct Rng(u64);

impl Rng {
    fn between_ms(&mut self, low: u64, high: u64) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let value = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        Duration::from_millis(low + value % (high - low + 1))
    }
}

const RUNS: usize = 20;
const LINES: usize = 2_000;
const CRASHES: usize = 5;

/// The engine redesign's crash test: twenty runs in flight, the
/// coordinator killed five times at random moments and restarted on the
/// same data dir. Every run succeeds; the succeeded attempt's stored log is
/// lines 1..2000 once each in order; no stage completes twice (its
/// dependent starts after it finished, once, and attempts add up). Replay a
/// schedule with `KILN_CRASH_SEED=<seed>`.
#[tokio::test(flavor = "multi_thread")]
async fn twenty_runs_survive_five_coordinator_crashes_with_exactly_once_logs() -> Result<()> {
    let seed = match std::env::var("KILN_CRASH_SEED") {
        Ok(seed) => seed.parse().context("KILN_CRASH_SEED")?,
        Err(_) => SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64 | 1,
    };
    eprintln!("crash test seed: {seed} (replay with KILN_CRASH_SEED={seed})");
    let mut rng = Rng(seed);

    let data = tempfile::tempdir()?;
    // Stages print their lines in bursts of 100 with a pause between, about
    // 4 s each, so with six slots the runs are in flight through all five
    // crashes. A lease long enough that a coordinator outage alone never
    // re-queues a stage.
    let options = CoordinatorOptions {
        lease_ttl: "10s",
        ..Default::default()
    };
    let mut coordinator = Coordinator::start(data.path(), &options)?;
    let mut agents = Vec::new();
    let mut work_dirs = Vec::new();
    for name in ["crash-a", "crash-b", "crash-c"] {
        let work = tempfile::tempdir()?;
        agents.push(start_agent(&coordinator.url(), name, "", 2, work.path())?);
        work_dirs.push(work);
    }
    let repo = Repo::new(&format!(
        "pipeline: crashes\nstages:\n  count:\n    retries: 2\n    commands: [\"i=1; while [ $i -le {LINES} ]; do echo line $i; if [ $((i % 100)) -eq 0 ]; then sleep 0.2; fi; i=$((i+1)); done\"]\n  after:\n    needs: [count]\n    commands: [\"echo after\"]\n"
    ))?;
    let pipeline = register(&coordinator, &repo).await?;
    let mut client = coordinator.client().await?;
    let mut ids = Vec::new();
    for _ in 0..RUNS {
        let run = client
            .trigger_run(pb::TriggerRunRequest {
                pipeline: pipeline.clone(),
                triggered_by: "crash-test".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        ids.push(run.id);
    }

    let started = Instant::now();
    for crash in 1..=CRASHES {
        let up_for = rng.between_ms(200, 1_200);
        let down_for = rng.between_ms(50, 500);
        tokio::time::sleep(up_for).await;
        let in_flight = unfinished(&mut coordinator.client().await?, &ids).await?;
        eprintln!(
            "crash {crash} at {:?}: kill -9 with {in_flight} runs in flight, down for {down_for:?}",
            started.elapsed()
        );
        ensure!(in_flight > 0, "the runs ended before crash {crash}");
        coordinator.crash_and_restart(&options, down_for)?;
    }

    let mut client = coordinator.client().await?;
    let mut finished = Vec::new();
    for &id in &ids {
        finished.push(wait_run(&mut client, id, Duration::from_secs(120)).await?);
    }
    eprintln!(
        "all runs ended {:?} after the first crash",
        started.elapsed()
    );
    for run in &finished {
        check_run(&mut client, run).await?;
    }

    // Nothing changes across one more crash: what was reported was durable.
    coordinator.crash_and_restart(&options, Duration::from_millis(200))?;
    let mut client = coordinator.client().await?;
    for before in &finished {
        let after = get_run(&mut client, before.id).await?;
        assert_eq!(&after, before, "run {} changed across a restart", before.id);
    }
    drop(agents);
    Ok(())
}

/// How many of `ids` have not finished yet.
async fn unfinished(client: &mut Client, ids: &[u64]) -> Result<usize> {
    let mut count = 0;
    for &id in ids {
        let run = get_run(client, id).await?;
        let done = matches!(
            pb::RunState::try_from(run.state)?,
            pb::RunState::Succeeded | pb::RunState::Failed | pb::RunState::Cancelled
        );
        count += usize::from(!done);
    }
    Ok(count)
}

/// One run's end state and stored logs, as the crash test expects them.
async fn check_run(
    client: &mut pb::control_service_client::ControlServiceClient<
        kiln_common::channel::KilnChannel,
    >,
    run: &pb::Run,
) -> Result<()> {
    let id = run.id;
    ensure!(
        run.state == pb::RunState::Succeeded as i32,
        "run {id} did not succeed: {run:#?}"
    );
    let count = stage(run, "count");
    let after = stage(run, "after");
    for stage in [count, after] {
        ensure!(
            stage.state == pb::StageState::Succeeded as i32 && stage.exit_code == 0,
            "run {id} stage {} did not succeed: {stage:#?}",
            stage.name
        );
        ensure!(
            (1..=3).contains(&stage.attempt),
            "run {id} stage {} has attempt {}",
            stage.name,
            stage.attempt
        );
    }
    // A stage that completed twice would have made its dependent ready
    // before its (second) end, or finished the run before it.
    ensure!(
        count.started_ms <= count.finished_ms
            && count.finished_ms <= after.started_ms
            && after.started_ms <= after.finished_ms
            && after.finished_ms <= run.finished_ms,
        "run {id}: stage times out of order: {run:#?}"
    );

    let entries = logs(client, id, "count").await?;
    let attempts: BTreeSet<u32> = entries.iter().map(|entry| entry.attempt).collect();
    ensure!(
        attempts.iter().all(|&attempt| attempt <= count.attempt),
        "run {id}: lines of attempts {attempts:?}, but the stage is at attempt {}",
        count.attempt
    );
    let last: Vec<&pb::LogEntry> = entries
        .iter()
        .filter(|entry| entry.attempt == count.attempt)
        .collect();
    let seqs: Vec<u64> = last.iter().map(|entry| entry.seq).collect();
    let contiguous: Vec<u64> = (0..seqs.len() as u64).collect();
    ensure!(
        seqs == contiguous,
        "run {id}: sequence numbers of attempt {} are not 0..{}: {:?}",
        count.attempt,
        seqs.len(),
        first_gap(&seqs)
    );
    let lines: Vec<&str> = last
        .iter()
        .filter_map(|entry| entry.line.as_ref())
        .map(|line| line.text.as_str())
        .filter(|text| text.starts_with("line "))
        .collect();
    let expected: Vec<String> = (1..=LINES).map(|i| format!("line {i}")).collect();
    if lines != expected {
        let wrong = lines
            .iter()
            .zip(&expected)
            .position(|(got, want)| got != want);
        bail!(
            "run {id}: the stored log of attempt {} has {} numbered lines, not 1..{LINES} once each; first difference at index {wrong:?}",
            count.attempt,
            lines.len()
        );
    }

    let after_lines: Vec<pb::LogEntry> = logs(client, id, "after").await?;
    let echoed = after_lines
        .iter()
        .filter(|entry| entry.attempt == after.attempt)
        .filter(|entry| entry.line.as_ref().is_some_and(|line| line.text == "after"))
        .count();
    ensure!(echoed == 1, "run {id}: `after` printed {echoed} times");
    Ok(())
}

fn first_gap(seqs: &[u64]) -> Option<(usize, u64)> {
    seqs.iter()
        .enumerate()
        .find(|&(index, &seq)| seq != index as u64)
        .map(|(index, &seq)| (index, seq))
}

/// A follower that stops reading while a stage prints fast is dropped
/// (its stream ends with ABORTED and says where it was) instead of making
/// the coordinator buffer for it; it resumes from its cursor and gets every
/// line exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_follower_is_dropped_and_resumes_from_its_cursor() -> Result<()> {
    const LINES: u64 = 60_000;
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let work = tempfile::tempdir()?;
    let _agent = start_agent(&coordinator.url(), "steady", "", 1, work.path())?;
    let repo = Repo::new(&format!(
        "pipeline: chatty\nstages:\n  flood:\n    commands: [\"echo go\", \"sleep 1\", \"seq 1 {LINES}\"]\n"
    ))?;
    let id = register_and_run(&coordinator, &repo).await?;
    let mut client = coordinator.client().await?;
    let follow = |resume: Vec<pb::LogCursor>| pb::StreamLogsRequest {
        run_id: id,
        stage: "flood".into(),
        follow: true,
        resume,
    };
    let mut stream = client.stream_logs(follow(Vec::new())).await?.into_inner();
    let first = stream.message().await?.context("the first line")?;
    // Stop reading while the stage prints every line.
    wait_run(&mut client, id, Duration::from_secs(60)).await?;

    let mut seen = vec![first];
    let dropped = loop {
        match stream.message().await {
            Ok(Some(entry)) => seen.push(entry),
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let status = dropped.context("the slow follower was never dropped")?;
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(status.message().contains("fell behind"), "{status:?}");
    assert!(
        (seen.len() as u64) < LINES + 1,
        "it was dropped before it had everything"
    );

    let last = seen.last().context("lines before the drop")?;
    let cursor = pb::LogCursor {
        stage: "flood".into(),
        attempt: last.attempt,
        next_seq: last.seq + 1,
    };
    let mut resumed = client.stream_logs(follow(vec![cursor])).await?.into_inner();
    while let Some(entry) = resumed.message().await? {
        seen.push(entry);
    }
    let seqs: Vec<u64> = seen.iter().map(|entry| entry.seq).collect();
    let expected: Vec<u64> = (0..seqs.len() as u64).collect();
    assert!(seqs == expected, "every line exactly once, in order");
    let numbers: Vec<u64> = seen
        .iter()
        .filter_map(|entry| entry.line.as_ref()?.text.parse().ok())
        .collect();
    assert!(
        numbers == (1..=LINES).collect::<Vec<_>>(),
        "the stage's {LINES} lines, each once"
    );
    Ok(())
}
