//! `artifact-bench`: upload and download of a 1 GiB artifact through a real
//! coordinator on loopback, beside `sha256sum` and `cp` of the same file in
//! the same run (hashing is the floor: the coordinator hashes every byte it
//! receives and every byte it serves, and the client hashes what it gets).
//!
//! Prints one line:
//! `artifacts upload_mb_s=.. download_mb_s=.. sha256sum_mb_s=.. cp_mb_s=.. peak_rss_mb=..`
//! where `peak_rss_mb` is the coordinator's peak resident memory.

use std::process::Command;
use std::time::Instant;

use anyhow::{Result, ensure};
use kiln_agent::transfer::{digest_file, download_file, upload_file};
use kiln_proto::v1::artifact_service_client::ArtifactServiceClient;
use kiln_tests::{Coordinator, CoordinatorOptions, peak_rss_mb, write_generated};

const SIZE: u64 = 1 << 30;
const MB: f64 = 1024.0 * 1024.0;

#[tokio::main]
async fn main() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let file = scratch.path().join("artifact.bin");
    write_generated(&file, SIZE, 42)?;
    let (digest, size) = digest_file(&file).await?;

    let sha256sum_s = timed_command(Command::new("sha256sum").arg(&file))?;
    let copy = scratch.path().join("copy.bin");
    let cp_s = timed_command(Command::new("cp").arg(&file).arg(&copy))?;
    std::fs::remove_file(&copy)?;

    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let channel = coordinator.channel().await?;
    let mut client = ArtifactServiceClient::new(channel).max_decoding_message_size(8 << 20);

    let started = Instant::now();
    ensure!(
        upload_file(&mut client, &file, &digest, size, "bench", |_| {}).await?,
        "the blob was new"
    );
    let upload_s = started.elapsed().as_secs_f64();

    let downloaded = scratch.path().join("downloaded.bin");
    let started = Instant::now();
    download_file(&mut client, &digest, &downloaded, |_| {}).await?;
    let download_s = started.elapsed().as_secs_f64();
    let peak = peak_rss_mb(coordinator.process.pid())?;

    let rate = |seconds: f64| SIZE as f64 / MB / seconds;
    println!(
        "artifacts upload_mb_s={:.0} download_mb_s={:.0} sha256sum_mb_s={:.0} cp_mb_s={:.0} peak_rss_mb={peak:.0}",
        rate(upload_s),
        rate(download_s),
        rate(sha256sum_s),
        rate(cp_s)
    );
    Ok(())
}

fn timed_command(command: &mut Command) -> Result<f64> {
    let started = Instant::now();
    let status = command.stdout(std::process::Stdio::null()).status()?;
    ensure!(status.success(), "{command:?} failed");
    Ok(started.elapsed().as_secs_f64())
}
