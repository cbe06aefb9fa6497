//! `--mode read-load`: what reading a big log does to a farm's throughput
//! and to the coordinator's memory.
//!
//! Starts the same farm as `--mode agents` (same flags), writes one stage
//! log of `--log-mib` (default 50) MiB — `yes` lines of 599 bytes plus a
//! newline, so it stays within the coordinator's per-attempt caps of 100,000
//! lines and 64 MiB — then measures `--runs N` no-op runs twice: alone, and
//! while `--readers R` (default 5) clients, each on its own connection,
//! read that whole log with `StreamLogs` (not follow) over and over. During
//! the loaded phase it samples the coordinator's RSS every 20 ms and reads
//! its VmHWM (reset just before the phase, where the kernel allows it).
//!
//! Prints one final line:
//! `read-load runs_per_s_without=.. runs_per_s_with=.. rss_mb=.. rss_mb_before=.. ...`
//! where `rss_mb` is the coordinator's peak RSS during the loaded phase.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use kiln_common::channel::KilnChannel;
use kiln_proto::v1 as pb;
use pb::control_service_client::ControlServiceClient;

use crate::agents::{Farm, Settings};
use crate::args::Args;
use crate::stats::{reset_peak_rss, rss_mb};

/// Text bytes of one generated log line (a newline follows each).
const LINE_TEXT_BYTES: u64 = 599;
/// The coordinator stores at most this many lines per attempt
/// (`engine::logs::MAX_LINES_PER_ATTEMPT`).
const MAX_LINES_PER_ATTEMPT: u64 = 100_000;
const LOG_STAGE: &str = "print";
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(20);

pub(crate) async fn run(args: &Args) -> Result<()> {
    let settings = Settings::from_args(args);
    let n_readers = args.get("--readers", 5) as usize;
    let log_mib = args.get("--log-mib", 50);

    let mut farm = Farm::start(&settings).await?;
    farm.warm_up(&settings).await?;
    let log = write_log(&mut farm, log_mib, settings.timeout).await?;

    let mut alone = farm.measure(settings.runs, settings.timeout).await?;
    farm.prepared_from_stage_logs(&mut alone).await?;
    eprintln!("{}", alone.describe("without readers"));

    let pid = farm.coordinator.process.pid();
    let rss_before = rss_mb(pid)?;
    let hwm_reset = reset_peak_rss(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let streaming = Arc::new(AtomicUsize::new(0));
    let reading_started = Instant::now();
    let mut readers = Vec::new();
    for _ in 0..n_readers {
        let client = farm.coordinator.client().await?;
        readers.push(tokio::spawn(read_in_a_loop(
            client,
            log.run_id,
            stop.clone(),
            streaming.clone(),
        )));
    }
    let sampler = tokio::spawn(sample_rss(pid, stop.clone()));
    // The load is on before the first run is submitted.
    let deadline = Instant::now() + Duration::from_secs(30);
    while streaming.load(Ordering::Relaxed) < n_readers {
        ensure!(
            Instant::now() < deadline,
            "the log readers did not start within 30s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let loaded = farm.measure(settings.runs, settings.timeout).await;
    stop.store(true, Ordering::Relaxed);
    let reading_for = reading_started.elapsed();
    let mut reads = ReadTotals::default();
    for reader in readers {
        reads.add(&reader.await??);
    }
    let sampled_peak = sampler.await??;
    let mut loaded = loaded?;
    farm.prepared_from_stage_logs(&mut loaded).await?;
    eprintln!("{}", loaded.describe("with readers"));
    let hwm = if hwm_reset {
        kiln_tests::peak_rss_mb(pid)?
    } else {
        eprintln!("cannot reset the coordinator's VmHWM; rss_mb is sampled every 20 ms only");
        0.0
    };
    let peak = sampled_peak.max(hwm);
    let read_mib_per_s = reads.bytes as f64 / (1 << 20) as f64 / reading_for.as_secs_f64();
    eprintln!(
        "{n_readers} readers: {} whole reads of the {:.1} MiB log, {read_mib_per_s:.0} MiB/s of log text, {} failed reads; coordinator RSS {rss_before:.0} MB before, peak {peak:.0} MB (sampled {sampled_peak:.0}, VmHWM {hwm:.0})",
        reads.whole,
        log.mib(),
        reads.errors,
    );
    println!(
        "read-load runs_per_s_without={:.1} runs_per_s_with={:.1} rss_mb={peak:.0} rss_mb_before={rss_before:.0} readers={n_readers} log_mib={:.1} log_reads={} read_mib_per_s={read_mib_per_s:.0} read_errors={} agents={} runs={}",
        alone.runs_per_s,
        loaded.runs_per_s,
        log.mib(),
        reads.whole,
        reads.errors,
        settings.n_agents,
        settings.runs,
    );
    Ok(())
}

/// The stage log the readers read.
struct BigLog {
    run_id: u64,
    lines: u64,
    text_bytes: u64,
}

impl BigLog {
    fn mib(&self) -> f64 {
        (self.text_bytes + self.lines) as f64 / (1 << 20) as f64
    }
}

/// Runs a stage that prints `mib` MiB of lines, and reads its log back once
/// to check the coordinator stored all of it.
async fn write_log(farm: &mut Farm, mib: u64, timeout: Duration) -> Result<BigLog> {
    let lines = (mib << 20).div_ceil(LINE_TEXT_BYTES + 1);
    ensure!(
        lines <= MAX_LINES_PER_ATTEMPT,
        "{mib} MiB needs {lines} lines of {} bytes, over the coordinator's {MAX_LINES_PER_ATTEMPT}",
        LINE_TEXT_BYTES + 1
    );
    let kiln_yml = format!(
        "pipeline: bench-biglog\nstages:\n  {LOG_STAGE}:\n    commands:\n      - |\n        yes \"$(printf '%{LINE_TEXT_BYTES}s' '' | tr ' ' x)\" | head -n {lines}\n"
    );
    let pipeline = farm.register(&kiln_yml).await?;
    let started = Instant::now();
    let submitted = farm.submit(&pipeline, 1).await?;
    let run_id = submitted[0].0;
    farm.wait_all(&submitted, timeout).await?;
    let written_in = started.elapsed();

    let started = Instant::now();
    let mut client = farm.client.clone();
    let mut totals = ReadTotals::default();
    read_once(
        &mut client,
        run_id,
        &AtomicBool::new(false),
        &mut totals,
        None,
    )
    .await?;
    let log = BigLog {
        run_id,
        lines: totals.lines,
        text_bytes: totals.bytes,
    };
    eprintln!(
        "log of run {run_id}: {} lines, {:.1} MiB, written in {:.1}s, read back once in {:.2}s",
        log.lines,
        log.mib(),
        written_in.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if log.lines < lines {
        bail!(
            "the coordinator kept {} of {lines} lines; the log is not the size asked for",
            log.lines
        );
    }
    Ok(log)
}

#[derive(Default)]
struct ReadTotals {
    /// Reads that got to the end of the log.
    whole: u64,
    /// Stdout lines received (the agent's own system lines not counted).
    lines: u64,
    /// Their text, whole reads or not.
    bytes: u64,
    errors: u64,
}

impl ReadTotals {
    fn add(&mut self, other: &Self) {
        self.whole += other.whole;
        self.lines += other.lines;
        self.bytes += other.bytes;
        self.errors += other.errors;
    }
}

/// One reader: the whole log, again and again, until `stop`. Says it is
/// streaming (`streaming` + 1) once its first line arrives.
async fn read_in_a_loop(
    mut client: ControlServiceClient<KilnChannel>,
    run_id: u64,
    stop: Arc<AtomicBool>,
    streaming: Arc<AtomicUsize>,
) -> Result<ReadTotals> {
    let mut totals = ReadTotals::default();
    let mut announce = Some(streaming);
    while !stop.load(Ordering::Relaxed) {
        if let Err(error) =
            read_once(&mut client, run_id, &stop, &mut totals, announce.take()).await
        {
            if totals.errors == 0 {
                eprintln!("a log read failed: {error:#}");
            }
            totals.errors += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(totals)
}

/// Streams the log once, adding to `totals`; gives up quietly at `stop`.
async fn read_once(
    client: &mut ControlServiceClient<KilnChannel>,
    run_id: u64,
    stop: &AtomicBool,
    totals: &mut ReadTotals,
    mut announce: Option<Arc<AtomicUsize>>,
) -> Result<()> {
    let request = pb::StreamLogsRequest {
        run_id,
        stage: LOG_STAGE.into(),
        follow: false,
        resume: Vec::new(),
    };
    let mut stream = client.stream_logs(request).await?.into_inner();
    while let Some(entry) = stream.message().await? {
        if let Some(streaming) = announce.take() {
            streaming.fetch_add(1, Ordering::Relaxed);
        }
        let line = entry.line.unwrap_or_default();
        if line.stream == pb::LogStream::Stdout as i32 {
            totals.lines += 1;
            totals.bytes += line.text.len() as u64;
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
    }
    totals.whole += 1;
    Ok(())
}

/// The highest RSS of `pid` seen until `stop`, in MB.
async fn sample_rss(pid: i32, stop: Arc<AtomicBool>) -> Result<f64> {
    let mut peak: f64 = 0.0;
    while !stop.load(Ordering::Relaxed) {
        peak = peak.max(rss_mb(pid)?);
        tokio::time::sleep(RSS_SAMPLE_EVERY).await;
    }
    Ok(peak)
}
