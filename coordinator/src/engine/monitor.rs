//! Watching a live release: a task per release samples its source every
//! `every` until the watch window ends and reports to the engine, which
//! counts consecutive breaches and rolls back (or freezes) at
//! `failure_limit`. The task only observes; the decision is the engine's.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_common::ids::EnvKey;
use kiln_common::spec::{self, MonitorSource, OnBreach, OnMissing};
use tokio::sync::{mpsc, watch};

use super::environments::Watch;
use super::{Engine, Event, MonitorRequest};
use crate::delivery::HttpClient;
use crate::delivery::sources::{self, MetricSource, Sample};

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

impl Engine {
    /// Counts a breach or a healthy sample; acts at `failure_limit`.
    pub(super) fn observe(&mut self, observation: Observation) {
        let Observation {
            release,
            environment,
            values,
        } = observation;
        let Some(record) = self.delivery.release(release).cloned() else {
            return;
        };
        let Ok(spec) = self.spec(&record.pipeline, record.pipeline_version) else {
            return;
        };
        let Some(monitor) = spec
            .parsed
            .stage_idx(&record.stage)
            .and_then(|idx| spec.parsed.stages[idx].monitor.clone())
        else {
            return;
        };
        let (breached, observed) = judge(&monitor, &values);
        let count =
            match self
                .delivery
                .observe(&environment, release, breached, monitor.failure_limit)
            {
                Watch::Ignored | Watch::Counted(0) => return,
                Watch::Counted(count) | Watch::Act(count) => count,
            };
        self.metrics.monitor_breach(&environment);
        tracing::warn!(release, environment = %environment, count, limit = monitor.failure_limit, %observed, "monitor breach");
        if count < monitor.failure_limit {
            return;
        }
        let reason = format!(
            "{} consecutive breaches of release {release} in `{environment}`: {observed}",
            monitor.failure_limit
        );
        self.alert_breach(&environment, release, &reason);
        match monitor.on_breach {
            OnBreach::Rollback => {
                if let Err(error) =
                    self.start_rollback(&environment, None, reason.clone(), "monitor".into())
                {
                    tracing::error!(%error, "automatic rollback could not start");
                    self.alert_rollback_not_started(&environment, release, &error.to_string());
                }
            }
            OnBreach::Freeze => {
                if let Some(op) = self.delivery.freeze(&environment, reason) {
                    self.write(op);
                }
            }
        }
    }
}

/// Whether a round breaches, and what was seen (for the reason).
fn judge(
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
