//! `--mode web-followers`: what browsers following a live log on the web
//! dashboard cost a farm's dispatch throughput.
//!
//! Starts the same farm as `--mode agents` (same flags) and one run whose
//! stage prints a line every 10 ms for `--print-s` seconds (default 600;
//! it holds one agent slot in both phases and is cancelled at the end),
//! then measures `--runs N` no-op runs twice: alone, and while
//! `--followers F` (default 100) clients follow that stage's
//! `/runs/RUN/stages/STAGE/events` stream, each on its own HTTP connection,
//! as a browser's `EventSource` does.
//!
//! Prints one final line:
//! `web-followers runs_per_s_without=.. runs_per_s_with=.. cost_pct=.. followers=.. events=..`
//! where `cost_pct` is the loss of throughput under the followers (the
//! issue's target: under 10).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kiln_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agents::{Farm, Settings};
use crate::args::Args;

const STAGE: &str = "print";

pub(crate) async fn run(args: &Args) -> Result<()> {
    let settings = Settings::from_args(args);
    let n_followers = args.get("--followers", 100) as usize;
    let print_s = args.get("--print-s", 600);

    let mut farm = Farm::start(&settings).await?;
    farm.warm_up(&settings).await?;
    let printer = start_printer(&mut farm, print_s).await?;

    let alone = farm.measure(settings.runs, settings.timeout).await?;
    eprintln!("{}", alone.describe("without followers"));

    let stop = Arc::new(AtomicBool::new(false));
    let streaming = Arc::new(AtomicUsize::new(0));
    let events = Arc::new(AtomicU64::new(0));
    let address = farm.coordinator.http.clone();
    let path = format!("/runs/{printer}/stages/{STAGE}/events");
    let mut followers = Vec::new();
    for _ in 0..n_followers {
        followers.push(tokio::spawn(follow(
            address.clone(),
            path.clone(),
            farm.coordinator.admin_token.clone(),
            stop.clone(),
            streaming.clone(),
            events.clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while streaming.load(Ordering::Relaxed) < n_followers {
        ensure!(
            Instant::now() < deadline,
            "only {} of {n_followers} followers got a line within 30s",
            streaming.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = events.load(Ordering::Relaxed);
    let loaded = farm.measure(settings.runs, settings.timeout).await;
    let during = events.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    let mut failures = 0;
    for follower in followers {
        failures += follower.await??;
    }
    let loaded = loaded?;
    eprintln!("{}", loaded.describe("with followers"));
    let mut client = farm.client.clone();
    client
        .cancel_run(pb::CancelRunRequest { run_id: printer })
        .await?;
    let cost_pct = (1.0 - loaded.runs_per_s / alone.runs_per_s) * 100.0;
    eprintln!(
        "{n_followers} followers received {during} live lines while the runs were measured; {failures} streams failed"
    );
    println!(
        "web-followers runs_per_s_without={:.1} runs_per_s_with={:.1} cost_pct={cost_pct:.1} followers={n_followers} events={during} stream_failures={failures} agents={} runs={}",
        alone.runs_per_s, loaded.runs_per_s, settings.n_agents, settings.runs,
    );
    Ok(())
}

/// Starts the run whose stage prints for `seconds`; returns its id once
/// the stage runs.
async fn start_printer(farm: &mut Farm, seconds: u64) -> Result<u64> {
    let lines = seconds * 100;
    let kiln_yml = format!(
        "pipeline: bench-printer\nstages:\n  {STAGE}:\n    timeout: {}s\n    commands:\n      - |\n        i=0; while [ $i -lt {lines} ]; do echo \"line $i\"; i=$((i+1)); sleep 0.01; done\n",
        seconds * 2
    );
    let pipeline = farm.register(&kiln_yml).await?;
    let run_id = farm.submit(&pipeline, 1).await?[0].0;
    let mut client = farm.client.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let run = kiln_tests::get_run(&mut client, run_id).await?;
        let state = kiln_tests::stage(&run, STAGE).state;
        if state == pb::StageState::Running as i32 {
            return Ok(run_id);
        }
        ensure!(
            Instant::now() < deadline,
            "the printing stage did not start within 60s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One browser's `EventSource`: a plain HTTP/1.1 request with the bearer
/// token, reading events until `stop`; reconnects (as a browser would)
/// after a failure. Returns how many connections failed.
async fn follow(
    address: String,
    path: String,
    token: String,
    stop: Arc<AtomicBool>,
    streaming: Arc<AtomicUsize>,
    events: Arc<AtomicU64>,
) -> Result<u64> {
    let mut announce = Some(streaming);
    let mut failures = 0;
    let mut last_id: Option<u64> = None;
    while !stop.load(Ordering::Relaxed) {
        match stream_once(
            &address,
            &path,
            &token,
            &stop,
            &mut announce,
            &events,
            &mut last_id,
        )
        .await
        {
            Ok(()) => {}
            Err(error) => {
                if failures == 0 {
                    eprintln!("a follower's stream failed: {error:#}");
                }
                failures += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(failures)
}

async fn stream_once(
    address: &str,
    path: &str,
    token: &str,
    stop: &AtomicBool,
    announce: &mut Option<Arc<AtomicUsize>>,
    events: &AtomicU64,
    last_id: &mut Option<u64>,
) -> Result<()> {
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    let resume = last_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n{resume}\r\n"
    );
    socket.write_all(request.as_bytes()).await?;
    let mut pending = String::new();
    let mut buffer = vec![0u8; 16 * 1024];
    let mut headers_done = false;
    while !stop.load(Ordering::Relaxed) {
        let n = match tokio::time::timeout(Duration::from_millis(200), socket.read(&mut buffer))
            .await
        {
            Ok(read) => read?,
            Err(_) => continue,
        };
        if n == 0 {
            bail!("the coordinator closed the stream");
        }
        pending.push_str(&String::from_utf8_lossy(&buffer[..n]));
        if !headers_done {
            let Some(end) = pending.find("\r\n\r\n") else {
                continue;
            };
            let status = pending.lines().next().unwrap_or_default().to_owned();
            ensure!(
                status.contains(" 200 "),
                "the events request answered {status}"
            );
            pending.drain(..end + 4);
            headers_done = true;
        }
        // Chunked transfer framing sits between events; only `id:` lines
        // matter here, and the server writes each event in one chunk.
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            if let Some(id) = event
                .lines()
                .find_map(|line| line.strip_prefix("id: "))
                .and_then(|id| id.trim().parse().ok())
            {
                *last_id = Some(id);
                events.fetch_add(1, Ordering::Relaxed);
                if let Some(streaming) = announce.take() {
                    streaming.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    Ok(())
}
