//! Watching a live release: a task per release samples its source every
//! `every` until the watch window ends and reports to the event loop; the
//! controller judges each round ([`judge`]), counts consecutive breaches
//! and asks for a rollback (or freezes) at `failure_limit`. The task only
//! observes; the decision is the controller's.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_common::ids::EnvKey;
use kiln_common::spec::{self, MonitorSource, OnMissing};
use tokio::sync::{mpsc, watch};

use crate::delivery::HttpClient;
use crate::delivery::sources::{self, MetricSource, Sample};
use crate::engine::{Event, MonitorRequest};

/// One round of samples of a watched release.
pub(crate) struct Observation {
    pub(crate) release: u64,
    pub(crate) environment: EnvKey,
    /// Value per `rollback_when` metric (`None`: empty result), or why the
    /// source could not be read.
    pub(crate) values: Result<BTreeMap<String, Option<f64>>, String>,
}

/// How long one sample may take before it counts as missing.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Samples until the window closes or `stop` fires.
pub(crate) async fn watch(
    request: MonitorRequest,
    http: HttpClient,
    events: mpsc::Sender<Event>,
    mut stop: watch::Receiver<bool>,
    now_ms: impl Fn() -> u64,
) {
    let mut ticker = tokio::time::interval(request.monitor.every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(release = request.release, environment = %request.environment, "monitor started");
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if now_ms() >= request.until_ms {
            tracing::info!(release = request.release, "monitor window over");
            return;
        }
        let values = sample_all(&http, &request.monitor).await;
        let observation = Observation {
            release: request.release,
            environment: request.environment.clone(),
            values,
        };
        if events
            .send(Event::MonitorSample(observation))
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn sample_all(
    http: &HttpClient,
    monitor: &spec::Monitor,
) -> Result<BTreeMap<String, Option<f64>>, String> {
    let mut values = BTreeMap::new();
    for metric in monitor.rollback_when.keys() {
        let source = match &monitor.source {
            MonitorSource::Scrape { url, labels } => MetricSource::Scrape {
                url: url.clone(),
                metric: metric.clone(),
                labels: labels.clone(),
            },
            MonitorSource::Prometheus { url, query } => MetricSource::Prometheus {
                url: url.clone(),
                query: query.clone(),
            },
        };
        let value = match sources::sample(http, &source, SAMPLE_TIMEOUT)
            .await
            .map_err(|error| error.to_string())?
        {
            Sample::Value(value) => Some(value),
            Sample::Empty => None,
        };
        values.insert(metric.clone(), value);
    }
    Ok(values)
}

/// Whether a round breaches, and what was seen (for the reason).
pub(super) fn judge(
    monitor: &spec::Monitor,
    values: &Result<BTreeMap<String, Option<f64>>, String>,
) -> (bool, String) {
    let missing_breaches = monitor.on_missing == OnMissing::Fail;
    match values {
        Err(error) => (
            missing_breaches,
            format!(
                "source error ({error}); on_missing: {}",
                on_missing_name(monitor.on_missing)
            ),
        ),
        Ok(values) => {
            let mut breached = false;
            let mut seen = Vec::new();
            for (metric, condition) in &monitor.rollback_when {
                match values
                    .get(metric)
                    .copied()
                    .flatten()
                    .filter(|v| !v.is_nan())
                {
                    Some(value) => {
                        let hit = condition.holds(value);
                        breached |= hit;
                        seen.push(format!("{metric}={value} (breach when {condition})"));
                    }
                    None => {
                        breached |= missing_breaches;
                        seen.push(format!(
                            "{metric} missing (on_missing: {})",
                            on_missing_name(monitor.on_missing)
                        ));
                    }
                }
            }
            (breached, seen.join(", "))
        }
    }
}

fn on_missing_name(policy: OnMissing) -> &'static str {
    match policy {
        OnMissing::Fail => "fail",
        OnMissing::Pass => "pass",
    }
}
