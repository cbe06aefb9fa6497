//! The coordinator's `/metrics` as Prometheus tooling sees it: it passes
//! `promtool check metrics`, and a real Prometheus scrapes it and answers
//! queries about it. (Metric sources and alerts are crate-private; their
//! tests against real Prometheus and Alertmanager servers live in
//! `kiln-coordinator`'s `delivery` module.)

use std::io::Write;
use std::time::Duration;

use anyhow::{Result, ensure};
use kiln_tests::prom::{self, Prometheus};
use kiln_tests::{Coordinator, CoordinatorOptions, eventually, start_agent};

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_metrics_pass_promtool() -> Result<()> {
    let Some(promtool) = prom::binary("promtool", "coordinator_metrics_pass_promtool")? else {
        return Ok(());
    };
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    // One stage run, so the per-pipeline histograms have a series.
    let work = tempfile::tempdir()?;
    let _agent = start_agent(&coordinator.url(), "a1", "", 1, work.path())?;
    let repo =
        kiln_tests::Repo::new("pipeline: measured\nstages:\n  only: { commands: [\"exit 0\"] }\n")?;
    let run = kiln_tests::register_and_run(&coordinator, &repo).await?;
    let mut client = coordinator.client().await?;
    let done = kiln_tests::wait_run(&mut client, run, Duration::from_secs(60)).await?;
    ensure!(
        done.state == kiln_proto::v1::RunState::Succeeded as i32,
        "{done:?}"
    );
    let (status, metrics) = prom::http_get(&coordinator.http, "/metrics")?;
    ensure!(status == 200, "GET /metrics answered {status}: {metrics}");
    for family in [
        "# TYPE kiln_active_runs gauge",
        "# TYPE kiln_ready_stages gauge",
        "# TYPE kiln_connected_agents gauge",
        "# TYPE kiln_runs_finished_total counter",
        "# TYPE kiln_stages_finished_total counter",
        "# TYPE kiln_dispatch_latency_seconds histogram",
        "kiln_dispatch_latency_seconds_count{pipeline=\"measured\"} 1",
        "# TYPE kiln_stage_duration_seconds histogram",
        "kiln_stage_duration_seconds_count{pipeline=\"measured\",state=\"succeeded\"} 1",
        "# TYPE kiln_gate_decisions_total counter",
        "# TYPE kiln_alerts_total counter",
        "# TYPE kiln_alerts_dropped_total counter",
    ] {
        ensure!(metrics.contains(family), "no {family:?} in\n{metrics}");
    }
    let report = prom::promtool_check_metrics(&promtool, &metrics)?;
    // Printed so a run's log shows what promtool said (nothing, when clean).
    let _ = writeln!(
        std::io::stderr(),
        "promtool check metrics on the coordinator's /metrics: {:?}",
        report.trim()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_coordinator() -> Result<()> {
    let data = tempfile::tempdir()?;
    let work = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let Some(prometheus) =
        Prometheus::start("prometheus_scrapes_the_coordinator", &[&coordinator.http])?
    else {
        return Ok(());
    };
    let _agent = start_agent(&coordinator.url(), "scraped", "", 1, work.path())?;

    // The agent's connection shows up in Prometheus within a few scrapes.
    let series = eventually(
        Duration::from_secs(60),
        "prometheus to see one connected agent",
        || async {
            let data = prometheus.query(r#"kiln_connected_agents{job="kiln"}"#)?;
            let result = &data["result"][0];
            Ok((result["value"][1] == "1").then(|| result.clone()))
        },
    )
    .await?;
    assert_eq!(series["metric"]["instance"], coordinator.http.as_str());

    // Counters scraped with their labels, and the scrape itself healthy.
    let data = prometheus.query(r#"kiln_runs_finished_total{state="succeeded"}"#)?;
    assert_eq!(data["result"][0]["value"][1], "0", "{data}");
    let data = prometheus.query(r#"up{job="kiln"}"#)?;
    assert_eq!(data["result"][0]["value"][1], "1", "{data}");
    Ok(())
}
