//! Metric history end to end: the monitor's samples of a live release and
//! the release's metrics, read back with `kiln metrics`, exported on the
//! coordinator's `/metrics` with the release as a label, and still there
//! after the coordinator is killed and started again.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Result;
use kiln_proto::v1 as pb;
use kiln_tests::delivery::{history, model_server, release_state, ship, spec, webhook};
use kiln_tests::{CoordinatorOptions, Farm, Repo, eventually};

/// `kiln --output json metrics production [--since S]`.
fn metrics(farm: &Farm, since: Option<&str>) -> Result<serde_json::Value> {
    let mut args = vec!["--output", "json", "metrics", "production"];
    if let Some(since) = since {
        args.extend(["--since", since]);
    }
    let out = farm.coordinator.kiln(&args);
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn sample_times(history: &serde_json::Value, release: u64) -> BTreeSet<u64> {
    history["samples"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["release"] == release)
        .filter_map(|s| s["at_ms"].as_u64())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn metric_history_is_kept_exported_and_survives_a_restart() -> Result<()> {
    let serve = tempfile::tempdir()?;
    let server = model_server(serve.path().to_path_buf()).await?;
    let (hook, _alerts) = webhook().await?;
    let options = CoordinatorOptions {
        extra_args: vec!["--alert-webhook-url".into(), hook],
        ..Default::default()
    };
    let mut farm = Farm::start(&options, &[("deliver", "", 2)])?;
    let repo = Repo::new(&spec(serve.path(), server.port))?;
    let run = ship(&farm, &repo, "good-1\n", r#"{"recall": 0.8}"#).await?;
    assert_eq!(run.state, pb::RunState::Succeeded as i32, "{run:#?}");
    let release = history(&farm, "production").await?[0].clone();
    assert_eq!(release_state(&release), pb::ReleaseState::Live);

    // Samples every 200 ms, each with the value the server gave.
    let before = eventually(Duration::from_secs(20), "five samples", || {
        let farm = &farm;
        async move {
            let history = metrics(farm, None)?;
            Ok((sample_times(&history, release.id).len() >= 5).then_some(history))
        }
    })
    .await?;
    let first = &before["samples"][0];
    assert_eq!(first["values"]["model_error_ratio"], 0.01, "{first}");
    assert_eq!(first["breached"], false);
    assert!(first["at"].is_string(), "RFC 3339 beside epoch ms: {first}");
    let point = before["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == release.id)
        .unwrap();
    assert_eq!(point["metrics"]["recall"], 0.8, "{point}");
    assert_eq!(point["state"], "live");

    // Exported with the release as a label, one release per environment.
    let exposition = reqwest::Client::new()
        .get(format!("http://{}/metrics", farm.coordinator.http))
        .send()
        .await?
        .text()
        .await?;
    let series = format!(
        "kiln_monitor_value{{environment=\"production\",metric=\"model_error_ratio\",model=\"\",pipeline=\"model\",release=\"{}\"}} 0.01",
        release.id
    );
    assert!(exposition.contains(&series), "{exposition}");

    // Killed and started again: every sample is still there.
    let kept = sample_times(&before, release.id);
    farm.coordinator
        .crash_and_restart(&options, Duration::from_millis(300))?;
    let after = metrics(&farm, None)?;
    let restored = sample_times(&after, release.id);
    assert!(
        kept.is_subset(&restored),
        "lost {:?}",
        kept.difference(&restored).collect::<Vec<_>>()
    );
    // --since narrows to the recent ones: the monitor resumed after the
    // restart and keeps sampling, while the ones kept from before age.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let asked_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let recent = sample_times(&metrics(&farm, Some("1s"))?, release.id);
    let all = sample_times(&metrics(&farm, None)?, release.id);
    assert!(
        !recent.is_empty(),
        "the monitor samples again after the restart"
    );
    assert!(recent.len() < all.len(), "{recent:?} of {all:?}");
    assert!(
        recent.iter().all(|&t| t + 1_000 + 500 >= asked_ms),
        "{recent:?} asked at {asked_ms}"
    );
    assert!(recent.is_disjoint(&kept));
    Ok(())
}
