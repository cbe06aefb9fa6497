//! `deploy/prometheus/`: the alerting and recording rules pass `promtool
//! check` and their unit tests (`promtool test rules`), name only metrics
//! the coordinator exports, and load into a real Prometheus scraping a real
//! coordinator, where every rule evaluates without error.
//!
//! Needs Debian's `prometheus` (with promtool); `tests/setup.sh` installs it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kiln_tests::prom::{Prometheus, binary, http_get};
use kiln_tests::{Coordinator, CoordinatorOptions};

fn deploy_prometheus(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/prometheus")
        .join(file)
}

/// `promtool ARGS`, which must succeed.
fn promtool(promtool: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new(promtool)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "promtool {args:?} failed ({}):\n{said}",
        output.status
    );
    Ok(said)
}

/// Every `kiln_*` metric name the rules use, histogram series reduced to
/// their family (`_bucket`, `_count`, `_sum`).
fn metric_names_in_rules(rules: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = rules;
    while let Some(at) = rest.find("kiln_") {
        let preceded_by_word = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded_by_word {
            let name = &tail[..end];
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.insert(family.to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_rules_pass_promtool_and_their_unit_tests() -> Result<()> {
    const TEST: &str = "the_rules_pass_promtool_and_their_unit_tests";
    let Some(promtool_path) = binary("promtool", TEST)? else {
        return Ok(());
    };
    let rules = deploy_prometheus("kiln-rules.yml");
    promtool(
        &promtool_path,
        &["check", "rules", &rules.display().to_string()],
    )?;
    promtool(
        &promtool_path,
        &[
            "check",
            "config",
            &deploy_prometheus("prometheus.yml").display().to_string(),
        ],
    )?;
    let tested = promtool(
        &promtool_path,
        &[
            "test",
            "rules",
            &deploy_prometheus("kiln-rules.test.yml")
                .display()
                .to_string(),
        ],
    )?;
    ensure!(tested.contains("SUCCESS"), "{tested}");

    // Every alert the rules define has a unit test.
    let rules_text = std::fs::read_to_string(&rules)?;
    let tests_text = std::fs::read_to_string(deploy_prometheus("kiln-rules.test.yml"))?;
    for line in rules_text.lines() {
        if let Some(alert) = line.trim().strip_prefix("- alert: ") {
            ensure!(
                tests_text.contains(&format!("alertname: {alert}\n")),
                "alert {alert} has no test in kiln-rules.test.yml"
            );
        }
    }
    Ok(())
}

#[test]
fn the_rules_name_only_metrics_the_coordinator_exports() -> Result<()> {
    let rules = std::fs::read_to_string(deploy_prometheus("kiln-rules.yml"))?;
    let without_comments: String = rules
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let used = metric_names_in_rules(&without_comments);
    ensure!(used.len() >= 8, "too few metric names found: {used:?}");
    // The registry's source: families with label values appear in /metrics
    // only once something happened (a rollback, a breach), so they are
    // looked up where they are declared.
    let declared = include_str!("../../coordinator/src/metrics.rs");
    for name in &used {
        ensure!(
            declared.contains(&format!("\"{name}\"")),
            "kiln-rules.yml uses {name}, which coordinator/src/metrics.rs does not declare"
        );
    }
    // And the ones a fresh coordinator shows are really there.
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let (status, exposition) = http_get(&coordinator.http, "/metrics")?;
    ensure!(status == 200, "GET /metrics: {status}");
    let exported: BTreeSet<&str> = exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    // Labelled by what happened (a rollback, a breach) or by pipeline (the
    // histograms): they appear with the first such event.
    let on_demand: BTreeSet<&str> = [
        "kiln_rollbacks_total",
        "kiln_monitor_breaches_total",
        "kiln_dispatch_latency_seconds",
        "kiln_stage_duration_seconds",
    ]
    .into();
    for name in &used {
        ensure!(
            exported.contains(name.as_str()) || on_demand.contains(name.as_str()),
            "{name} is not in a fresh coordinator's /metrics:\n{exposition}"
        );
    }
    Ok(())
}

#[test]
fn a_real_prometheus_evaluates_every_rule_against_a_real_coordinator() -> Result<()> {
    const TEST: &str = "a_real_prometheus_evaluates_every_rule_against_a_real_coordinator";
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let rules = deploy_prometheus("kiln-rules.yml");
    let Some(prometheus) = Prometheus::start_with_rules(
        TEST,
        "kiln-coordinator",
        &[coordinator.http.as_str()],
        &[rules.as_path()],
    )?
    else {
        return Ok(());
    };
    // Wait until every rule has been evaluated at least once after the
    // first scrape, and check none failed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = http_get(&prometheus.addr, "/api/v1/rules")?;
        let answer: serde_json::Value = serde_json::from_str(&body)?;
        let rules: Vec<&serde_json::Value> = answer["data"]["groups"]
            .as_array()
            .context("no rule groups")?
            .iter()
            .flat_map(|group| group["rules"].as_array().into_iter().flatten())
            .collect();
        let scraped = prometheus.query("up{job=\"kiln-coordinator\"} == 1")?["result"]
            .as_array()
            .is_some_and(|result| !result.is_empty());
        let unhealthy: Vec<String> = rules
            .iter()
            .filter(|rule| rule["health"] != "ok")
            .map(|rule| {
                format!(
                    "{} ({}: {})",
                    rule["name"], rule["health"], rule["lastError"]
                )
            })
            .collect();
        if scraped && rules.len() >= 10 && unhealthy.is_empty() {
            // A fresh coordinator with no agents: nothing fires (the agent
            // alert waits 5 minutes), and the coordinator is up.
            let firing = prometheus.query("ALERTS{alertstate=\"firing\"}")?;
            ensure!(
                firing["result"].as_array().is_some_and(Vec::is_empty),
                "alerts fire on a healthy farm: {firing}"
            );
            // The rules see the real series: with no agent connected, the
            // alert about it is pending (within an evaluation or two).
            let pending = prometheus
                .query("ALERTS{alertname=\"KilnNoAgentsConnected\", alertstate=\"pending\"}")?;
            if pending["result"]
                .as_array()
                .is_some_and(|result| result.len() == 1)
            {
                return dashboard_queries_run(&prometheus);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "after 60 s: scraped {scraped}, {} rules, unhealthy {unhealthy:?}, \
                 KilnNoAgentsConnected not pending",
                rules.len()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every query of the Grafana dashboard (`deploy/grafana/kiln-farm.json`),
/// with Grafana's `$__rate_interval` filled in, is accepted by Prometheus
/// and names only exported metrics or recorded series.
fn dashboard_queries_run(prometheus: &Prometheus) -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/kiln-farm.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let rules = std::fs::read_to_string(deploy_prometheus("kiln-rules.yml"))?;
    let declared = include_str!("../../coordinator/src/metrics.rs");
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().context("no panels")? {
        for target in panel["targets"].as_array().context("no targets")? {
            let expr = target["expr"].as_str().context("a target without expr")?;
            prometheus
                .query(&expr.replace("$__rate_interval", "1m"))
                .with_context(|| format!("panel {}", panel["title"]))?;
            for name in metric_names_in_rules(expr) {
                ensure!(
                    declared.contains(&format!("\"{name}\"")),
                    "the dashboard uses {name}, which coordinator/src/metrics.rs does not declare"
                );
            }
            for recorded in expr.split(|c: char| !(c.is_ascii_alphanumeric() || "_:".contains(c))) {
                if recorded.starts_with("kiln:") {
                    ensure!(
                        rules.contains(&format!("record: {recorded}")),
                        "the dashboard uses {recorded}, which kiln-rules.yml does not record"
                    );
                }
            }
            queries += 1;
        }
    }
    ensure!(queries >= 10, "only {queries} dashboard queries");
    Ok(())
}
