//! `rollback-bench`: how fast a degraded release is replaced.
//!
//! A real coordinator and process agent ship a good model, then a bad one
//! that passes the offline gate. The stand-in model server reports a high
//! error ratio while the bad model is deployed; the coordinator's monitor
//! (every `every`, `failure_limit` consecutive breaches) rolls back. The
//! figure is the time from the first breaching sample the server served to
//! the previous model being the deployed one again (polled every 5 ms).
//!
//! Prints: `rollback detect_to_live_s=.. every_s=.. failure_limit=..`
//! (target: at most `failure_limit × every + 2 s`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kiln_tests::Repo;
use kiln_tests::delivery::{farm, model_server, ship, spec, webhook};

#[tokio::main]
async fn main() -> Result<()> {
    let serve = tempfile::tempdir()?;
    let server = model_server(serve.path().to_path_buf()).await?;
    let (hook, _alerts) = webhook().await?;
    let farm = farm(&hook)?;
    // The shared pipeline samples every 200 ms with failure_limit 3.
    let (every, failure_limit) = (Duration::from_millis(200), 3u32);
    let repo = Repo::new(&spec(serve.path(), server.port))?;
    ship(&farm, &repo, "good-1\n", r#"{"recall": 0.8}"#).await?;
    ship(&farm, &repo, "bad\n", r#"{"recall": 0.8}"#).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let healed_at = loop {
        let model = std::fs::read_to_string(serve.path().join("production")).unwrap_or_default();
        let breached = server.first_bad_at.lock().unwrap().is_some();
        if breached && model.trim() == "good-1" {
            break Instant::now();
        }
        anyhow::ensure!(Instant::now() < deadline, "no rollback within 60 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let first_bad = server
        .first_bad_at
        .lock()
        .unwrap()
        .context("no breaching sample was served")?;
    println!(
        "rollback detect_to_live_s={:.2} every_s={:.1} failure_limit={failure_limit}",
        healed_at.duration_since(first_bad).as_secs_f64(),
        every.as_secs_f64()
    );
    Ok(())
}
