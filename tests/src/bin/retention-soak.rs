//! `retention-soak`: does the coordinator's data directory level off when a
//! pipeline keeps only its newest runs?
//!
//! A real coordinator and a process agent run `--runs` (default 10,000)
//! runs of a one-stage pipeline with `retention: {keep: {runs: 100}}`, in
//! waves; after every `--gc-every` runs (default 500) it calls `kiln gc`
//! (`CollectGarbage`) and prints the data directory's size. Bounded by
//! `--max-minutes` (default 30): it stops there and says so.
//!
//! Prints one line per collection:
//! `runs=N elapsed_s=.. data_mib=.. runs_stored=.. deleted_this_gc=..`
//! and a last `soak ...` line with the first and last sizes after the
//! first collection. The stages write no artifacts: blobs are kept at
//! least the GC's one-hour grace period, longer than this soak runs.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiln_proto::v1 as pb;
use kiln_tests::{CoordinatorOptions, Farm, Repo, register, wait_run};

struct Flags {
    runs: u64,
    gc_every: u64,
    wave: u64,
    max: Duration,
}

fn flags() -> Result<Flags> {
    let mut flags = Flags {
        runs: 10_000,
        gc_every: 500,
        wave: 100,
        max: Duration::from_secs(30 * 60),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--runs" => flags.runs = value.parse()?,
            "--gc-every" => flags.gc_every = value.parse()?,
            "--wave" => flags.wave = value.parse()?,
            "--max-minutes" => flags.max = Duration::from_secs(value.parse::<u64>()? * 60),
            other => {
                anyhow::bail!("unknown flag {other}; use --runs, --gc-every, --wave, --max-minutes")
            }
        }
    }
    Ok(flags)
}

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

#[tokio::main]
async fn main() -> Result<()> {
    let flags = flags()?;
    let farm = Farm::start(&CoordinatorOptions::default(), &[("soak-1", "", 8)])?;
    let data_dir = farm.dirs[0].path().to_path_buf();
    let repo = Repo::new(
        r#"
pipeline: soak
retention: { keep: { runs: 100 } }
stages:
  work:
    commands:
      - echo "run $KILN_RUN_ID working"
      - echo "a second line of output for the log"
"#,
    )?;
    let pipeline = register(&farm.coordinator, &repo).await?;
    let mut client = farm.coordinator.client().await?;
    let started = Instant::now();
    let mut done = 0u64;
    let mut sizes = Vec::new();
    while done < flags.runs {
        if started.elapsed() > flags.max {
            println!(
                "stopped at {done} runs: --max-minutes {} reached",
                flags.max.as_secs() / 60
            );
            break;
        }
        let wave = flags.wave.min(flags.runs - done);
        let mut ids = Vec::with_capacity(wave as usize);
        for _ in 0..wave {
            let run = client
                .trigger_run(pb::TriggerRunRequest {
                    pipeline: pipeline.clone(),
                    triggered_by: "soak".into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            ids.push(run.id);
        }
        for id in ids {
            let run = wait_run(&mut client, id, Duration::from_secs(300)).await?;
            anyhow::ensure!(
                run.state == pb::RunState::Succeeded as i32,
                "run {id} did not succeed: {run:?}"
            );
        }
        let before = done;
        done += wave;
        if done / flags.gc_every > before / flags.gc_every || done == flags.runs {
            let report = client
                .collect_garbage(pb::GcRequest::default())
                .await?
                .into_inner();
            let stored = client
                .list_runs(pb::ListRunsRequest {
                    pipeline: pipeline.clone(),
                    limit: 10_000,
                })
                .await?
                .into_inner()
                .runs
                .len();
            let bytes = dir_bytes(&data_dir);
            sizes.push(bytes);
            println!(
                "runs={done} elapsed_s={:.0} data_mib={:.1} runs_stored={stored} deleted_this_gc={}",
                started.elapsed().as_secs_f64(),
                bytes as f64 / (1 << 20) as f64,
                report.runs_deleted.len()
            );
        }
    }
    if let (Some(first), Some(last), Some(max)) = (sizes.first(), sizes.last(), sizes.iter().max())
    {
        println!(
            "soak runs={done} collections={} first_mib={:.1} last_mib={:.1} max_mib={:.1}",
            sizes.len(),
            *first as f64 / (1 << 20) as f64,
            *last as f64 / (1 << 20) as f64,
            *max as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
