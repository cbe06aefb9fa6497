//! `--mode simulated` (the default): dispatch throughput and latency of a
//! real coordinator with simulated agents.
//!
//! Starts `kiln-coordinator` (from the same target dir) on a temp data dir,
//! connects N simulated agents — gRPC clients that finish every stage the
//! moment it arrives — and keeps a number of chain-shaped runs in flight.
//! Dispatch latency is the time from the agent sending the completion that
//! makes the next stage ready to an agent receiving that next stage, so it
//! covers the durable commit of both transitions. Then it connects idle
//! agents up to `--idle-agents` and reads the coordinator's RSS.
//!
//! Beside it, as a baseline from the same run and disk, it measures how many
//! durable sled flushes per second the machine does (the floor every
//! acknowledged transition pays, shared by a group commit).
//!
//! Prints one final line:
//! `dispatch stages_per_s=.. p50_ms=.. p99_ms=.. agents=.. rss_mb=.. idle_agents=.. idle_rss_mb=.. baseline_flushes_per_s=..`

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiln_common::channel::KilnChannel;
use kiln_proto::v1 as pb;
use kiln_tests::{Coordinator, CoordinatorOptions};
use pb::agent_message::Msg;
use pb::coordinator_message::Msg as Out;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

use crate::args::Args;
use crate::stats::rss_mb;

const CHAIN_LEN: usize = 10;

/// Completions waiting for the stage they make ready: (run, next stage
/// index) → when the completion was sent.
type ReadyAt = Arc<Mutex<HashMap<(u64, u32), Instant>>>;

struct Shared {
    ready_at: ReadyAt,
    latencies_us: Mutex<Vec<u64>>,
    finished: AtomicU64,
    runs_done: mpsc::UnboundedSender<()>,
}

pub(crate) async fn run(args: &Args) -> Result<()> {
    let n_agents = args.get("--agents", 100) as usize;
    let capacity = args.get("--capacity", 4) as u32;
    let in_flight = args.get("--in-flight", 200) as usize;
    let total_runs = args.get("--runs", 2_000) as usize;
    let idle_agents = args.get("--idle-agents", 1_000) as usize;

    let baseline = sled_flushes_per_s()?;
    eprintln!("baseline: {baseline:.0} durable sled flushes/s on this disk");

    let data = tempfile::tempdir()?;
    let options = CoordinatorOptions {
        lease_ttl: "30s",
        heartbeat: "5s",
        // Every simulated agent uses the one agent token.
        extra_args: vec!["--max-agents-per-token".into(), "100000".into()],
        ..Default::default()
    };
    let coordinator = Coordinator::start(data.path(), &options)?;
    let mut control = coordinator.client().await?;
    let spec = chain_spec();
    control
        .register_pipeline(pb::RegisterPipelineRequest {
            file_name: "bench/kiln.yml".into(),
            spec_yaml: spec,
            repo: "/bench".into(),
            branch: "main".into(),
            subdir: String::new(),
            path: String::new(),
        })
        .await?;

    let (runs_done, mut done_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        ready_at: Arc::default(),
        latencies_us: Mutex::new(Vec::new()),
        finished: AtomicU64::new(0),
        runs_done,
    });
    let mut agents = Vec::new();
    for i in 0..n_agents {
        agents.push(
            connect_agent(
                &coordinator,
                &format!("bench-{i}"),
                capacity,
                Some(shared.clone()),
            )
            .await?,
        );
    }
    eprintln!("{n_agents} simulated agents connected (capacity {capacity} each)");

    let started = Instant::now();
    let mut triggered = 0;
    // Latency is measured on stage-to-stage hand-offs only: a run's first
    // assignment can reach the agent before the trigger's reply reaches us.
    let trigger = |control: &mut pb::control_service_client::ControlServiceClient<KilnChannel>| {
        let mut control = control.clone();
        async move {
            control
                .trigger_run(pb::TriggerRunRequest {
                    pipeline: "bench".into(),
                    rev: "0".repeat(40),
                    triggered_by: "bench".into(),
                    ..Default::default()
                })
                .await?;
            anyhow::Ok(())
        }
    };
    while triggered < in_flight.min(total_runs) {
        trigger(&mut control).await?;
        triggered += 1;
    }
    let mut completed = 0;
    while completed < total_runs {
        done_rx.recv().await.context("agents stopped")?;
        completed += 1;
        if triggered < total_runs {
            trigger(&mut control).await?;
            triggered += 1;
        }
    }
    let elapsed = started.elapsed();
    let stages = shared.finished.load(Ordering::Relaxed);
    let stages_per_s = stages as f64 / elapsed.as_secs_f64();
    let mut latencies = std::mem::take(&mut *shared.latencies_us.lock().unwrap());
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize] as f64 / 1000.0;
    let (p50, p99) = (pct(0.50), pct(0.99));
    let rss = rss_mb(coordinator.process.pid())?;
    eprintln!(
        "{stages} stages in {:.2}s: {stages_per_s:.0} stages/s, dispatch p50 {p50:.2} ms, p99 {p99:.2} ms, coordinator RSS {rss:.0} MB",
        elapsed.as_secs_f64()
    );

    let mut idle = Vec::new();
    for i in n_agents..idle_agents.max(n_agents) {
        idle.push(connect_agent(&coordinator, &format!("idle-{i}"), 1, None).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let listed = control
        .list_agents(pb::ListAgentsRequest {})
        .await?
        .into_inner()
        .agents;
    let connected = listed.iter().filter(|agent| agent.connected).count();
    let idle_rss = rss_mb(coordinator.process.pid())?;
    eprintln!("{connected} agents connected, coordinator RSS {idle_rss:.0} MB");

    println!(
        "dispatch stages_per_s={stages_per_s:.0} p50_ms={p50:.2} p99_ms={p99:.2} agents={n_agents} rss_mb={rss:.0} idle_agents={connected} idle_rss_mb={idle_rss:.0} baseline_flushes_per_s={baseline:.0}"
    );
    drop((agents, idle));
    Ok(())
}

fn chain_spec() -> String {
    let mut spec = String::from("pipeline: bench\nstages:\n");
    for i in 0..CHAIN_LEN {
        spec.push_str(&format!("  s{i}:\n    commands: [\"true\"]\n"));
        if i > 0 {
            spec.push_str(&format!("    needs: [s{}]\n", i - 1));
        }
    }
    spec
}

/// Connects one simulated agent; with `shared` it finishes every stage at
/// once and records latencies, without it it only heartbeats.
async fn connect_agent(
    coordinator: &Coordinator,
    name: &str,
    capacity: u32,
    shared: Option<Arc<Shared>>,
) -> Result<tokio::task::JoinHandle<()>> {
    let channel = Channel::from_shared(coordinator.url())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let token = kiln_common::channel::Token::new(&coordinator.agent_token)?;
    let channel = kiln_common::channel::KilnChannel::new(channel, Some(&token));
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::unbounded_channel();
    let hello = pb::Hello {
        name: name.into(),
        capacity,
        version: "bench".into(),
        ..Default::default()
    };
    tx.send(pb::AgentMessage {
        msg: Some(Msg::Hello(hello)),
    })?;
    let mut inbound = client
        .connect(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok(tokio::spawn(async move {
        let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                message = inbound.message() => {
                    let Ok(Some(pb::CoordinatorMessage { msg: Some(msg) })) = message else { return };
                    if let (Out::Assign(assign), Some(shared)) = (msg, &shared) {
                        complete(&tx, assign, shared);
                    }
                }
                _ = heartbeat.tick() => {
                    let beat = pb::AgentMessage { msg: Some(Msg::Heartbeat(pb::Heartbeat { running: 0 })) };
                    if tx.send(beat).is_err() { return; }
                }
            }
        }
    }))
}

fn complete(tx: &mpsc::UnboundedSender<pb::AgentMessage>, assign: pb::Assign, shared: &Shared) {
    let Some(stage) = assign.stage else { return };
    let now = Instant::now();
    if let Some(ready) = shared
        .ready_at
        .lock()
        .unwrap()
        .remove(&(stage.run_id, stage.stage_idx))
    {
        shared
            .latencies_us
            .lock()
            .unwrap()
            .push(now.duration_since(ready).as_micros() as u64);
    }
    let last = stage.stage_idx as usize + 1 == CHAIN_LEN;
    if !last {
        shared
            .ready_at
            .lock()
            .unwrap()
            .insert((stage.run_id, stage.stage_idx + 1), now);
    }
    let finished = pb::StageFinished {
        stage: Some(stage),
        outcome: pb::Outcome::Succeeded as i32,
        ..Default::default()
    };
    let _ = tx.send(pb::AgentMessage {
        msg: Some(Msg::Finished(finished)),
    });
    shared.finished.fetch_add(1, Ordering::Relaxed);
    if last {
        let _ = shared.runs_done.send(());
    }
}

/// Durable flushes per second of a small sled write: the cost floor of one
/// acknowledged transition without group commit.
fn sled_flushes_per_s() -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let db = sled::Config::new().path(dir.path()).open()?;
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        db.insert(n.to_be_bytes(), &b"transition"[..])?;
        db.flush()?;
        n += 1;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}
