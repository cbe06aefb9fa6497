//! Counters, gauges and the dispatch histogram that the engine and the
//! delivery tasks update and `/metrics` renders in the Prometheus text
//! format (0.0.4).
//!
//! Built on the `prometheus` crate rather than `prometheus-client`: the latter
//! only writes OpenMetrics text (counter families named without `_total`,
//! `# EOF`), which `promtool check metrics` rejects ("no help text"), and
//! passing promtool is a requirement. Every metric lives in this struct's own
//! registry, never the process-global one, so embedded coordinators (the
//! demo, tests) do not collide.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use kiln_common::ids::EnvKey;

use crate::store::{RunState, StageState};

/// Dispatch latency buckets, in seconds: from an idle farm (milliseconds)
/// to a saturated one (stages queued for minutes).
const DISPATCH_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Stage duration buckets, in seconds: from a one-line check to a
/// six-hour training run.
const DURATION_BUCKETS: [f64; 14] = [
    0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1_800.0, 3_600.0, 7_200.0, 14_400.0,
    21_600.0,
];
/// Pipelines that get a label value of their own; later ones share
/// [`OTHER_PIPELINES`], so a farm with many pipelines cannot blow up the
/// series count.
const MAX_PIPELINE_LABELS: usize = 64;
const OTHER_PIPELINES: &str = "_other";
const RUN_OUTCOMES: [&str; 3] = ["succeeded", "failed", "cancelled"];
const STAGE_OUTCOMES: [&str; 5] = ["succeeded", "failed", "timed_out", "cancelled", "skipped"];
/// Where alerts go; see `delivery::alerts`.
const ALERT_DESTINATIONS: [&str; 2] = ["alertmanager", "webhook"];

/// How a gate stage can be decided; `awaiting_approval` is a gate with
/// `approval: manual` waiting for `kiln approve` or `kiln reject`.
const GATE_OUTCOMES: [&str; 3] = ["passed", "failed", "awaiting_approval"];

/// Everything `/metrics` shows. Cheap to update from any thread (atomics
/// inside); the engine is the main writer, the alerter the other.
pub(crate) struct Metrics {
    /// Owns every metric below; `render` gathers from it.
    registry: Registry,
    active_runs: IntGauge,
    /// Ready stages waiting for an agent: the dispatch queue depth.
    ready_stages: IntGauge,
    connected_agents: IntGauge,
    runs_finished: IntCounterVec,
    stages_finished: IntCounterVec,
    /// Queue wait: ready to assigned, by pipeline.
    dispatch_latency: HistogramVec,
    /// Started to settled, by pipeline and final state.
    stage_duration: HistogramVec,
    /// The pipelines that have a label value of their own.
    pipeline_labels: Mutex<BTreeSet<String>>,
    releases: IntCounterVec,
    gate_decisions: IntCounterVec,
    rollbacks: IntCounterVec,
    monitor_breaches: IntCounterVec,
    alerts: IntCounterVec,
    /// Alerts dropped because the alerter's queue was full or closed.
    alerts_dropped: IntCounter,
    /// Commit status rounds (a report's attempts) by forge and outcome.
    commit_statuses: IntCounterVec,
    /// Reports queued and not yet accepted by their forge.
    commit_statuses_queued: IntGauge,
    /// The last monitor sample of the live release of each environment.
    monitor_values: GaugeVec,
    /// The series `monitor_values` holds per environment (release, its
    /// model version `NAME@N` or "", metric names): a new release's first
    /// sample removes the old release's, so there are never more series
    /// than environments × metrics.
    monitor_series: Mutex<HashMap<EnvKey, MonitorSeries>>,
}

/// An environment's `kiln_monitor_value` series: (release, model version,
/// metric names).
type MonitorSeries = (u64, String, Vec<String>);

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let gauge = IntGauge::new(name, help).expect("valid gauge");
            registry
                .register(Box::new(gauge.clone()))
                .expect("unique metric name");
            gauge
        };
        let counters = |name: &str, help: &str, labels: &[&str]| {
            let counters =
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry
                .register(Box::new(counters.clone()))
                .expect("unique metric name");
            counters
        };
        let active_runs = gauge("kiln_active_runs", "Runs not finished yet.");
        let ready_stages = gauge(
            "kiln_ready_stages",
            "Stages waiting for an agent (the dispatch queue depth).",
        );
        let connected_agents = gauge("kiln_connected_agents", "Agents with an open stream.");
        let runs_finished = counters(
            "kiln_runs_finished_total",
            "Runs finished, by final state.",
            &["state"],
        );
        let stages_finished = counters(
            "kiln_stages_finished_total",
            "Stage attempts settled, by state.",
            &["state"],
        );
        let histograms = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            let histograms = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("valid histogram");
            registry
                .register(Box::new(histograms.clone()))
                .expect("unique metric name");
            histograms
        };
        let dispatch_latency = histograms(
            "kiln_dispatch_latency_seconds",
            "Queue wait: time from a stage becoming ready to its assignment being sent to an agent, by pipeline.",
            &DISPATCH_BUCKETS,
            &["pipeline"],
        );
        let stage_duration = histograms(
            "kiln_stage_duration_seconds",
            "Time from a stage attempt starting on its agent to its final state, by pipeline and state.",
            &DURATION_BUCKETS,
            &["pipeline", "state"],
        );
        let releases = counters(
            "kiln_releases_total",
            "Releases created, by pipeline and environment (a rollback's restore is not a new release).",
            &["pipeline", "environment"],
        );
        let gate_decisions = counters(
            "kiln_gate_decisions_total",
            "Gate stages decided, by outcome.",
            &["outcome"],
        );
        let rollbacks = counters(
            "kiln_rollbacks_total",
            "Rollbacks finished, by pipeline, environment and outcome.",
            &["pipeline", "environment", "outcome"],
        );
        let monitor_breaches = counters(
            "kiln_monitor_breaches_total",
            "Monitor samples that met a rollback_when condition, by pipeline and environment.",
            &["pipeline", "environment"],
        );
        let alerts = counters(
            "kiln_alerts_total",
            "Alert deliveries finished (after retries), by destination and outcome.",
            &["destination", "outcome"],
        );
        let alerts_dropped = IntCounter::new(
            "kiln_alerts_dropped_total",
            "Alerts dropped before delivery because the alert queue was full or closed.",
        )
        .expect("valid counter");
        registry
            .register(Box::new(alerts_dropped.clone()))
            .expect("unique metric name");
        let commit_statuses = counters(
            "kiln_commit_status_rounds_total",
            "Commit status reports sent to a forge (each round of up to 5 attempts), by forge and \
             outcome; a failed round is tried again later.",
            &["forge", "outcome"],
        );
        let commit_statuses_queued = gauge(
            "kiln_commit_status_queued",
            "Commit status reports waiting for their forge to accept them.",
        );
        let monitor_values = GaugeVec::new(
            Opts::new(
                "kiln_monitor_value",
                "The last value a monitor read for the live release of an environment, by metric \
                 (NaN: missing).",
            ),
            &["pipeline", "environment", "release", "model", "metric"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(monitor_values.clone()))
            .expect("unique metric name");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "kiln_build_info",
                "Always 1; the labels say which Kiln program and version this is.",
            ),
            &["component", "version"],
        )
        .expect("valid gauge");
        build_info
            .with_label_values(&["coordinator", env!("CARGO_PKG_VERSION")])
            .set(1);
        registry
            .register(Box::new(build_info))
            .expect("unique metric name");
        // The process's CPU, memory, file descriptors and start time
        // (`process_*`), read from /proc at each scrape.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric name");

        // Fixed label sets start at 0, so the series exist (and `rate()` has
        // a baseline) before the first event.
        for state in RUN_OUTCOMES {
            runs_finished.with_label_values(&[state]);
        }
        for state in STAGE_OUTCOMES {
            stages_finished.with_label_values(&[state]);
        }
        for outcome in GATE_OUTCOMES {
            gate_decisions.with_label_values(&[outcome]);
        }
        for destination in ALERT_DESTINATIONS {
            for outcome in ["sent", "failed"] {
                alerts.with_label_values(&[destination, outcome]);
            }
        }
        for forge in ["gitea", "github", "gitlab"] {
            for outcome in ["sent", "failed"] {
                commit_statuses.with_label_values(&[forge, outcome]);
            }
        }
        Self {
            registry,
            active_runs,
            ready_stages,
            connected_agents,
            runs_finished,
            stages_finished,
            dispatch_latency,
            stage_duration,
            pipeline_labels: Mutex::new(BTreeSet::new()),
            releases,
            gate_decisions,
            rollbacks,
            monitor_breaches,
            alerts,
            alerts_dropped,
            commit_statuses,
            commit_statuses_queued,
            monitor_values,
            monitor_series: Mutex::default(),
        }
    }
}

impl Metrics {
    pub(crate) fn set_engine_gauges(&self, active_runs: usize, ready: usize, agents: usize) {
        self.active_runs.set(gauge_value(active_runs));
        self.ready_stages.set(gauge_value(ready));
        self.connected_agents.set(gauge_value(agents));
    }

    pub(crate) fn run_finished(&self, state: RunState) {
        let label = match state {
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::Queued | RunState::Running => return,
        };
        self.runs_finished.with_label_values(&[label]).inc();
    }

    /// A stage of `pipeline` settled in `state`; `ran` is how long its
    /// last attempt ran, if it started.
    pub(crate) fn stage_finished(&self, pipeline: &str, state: StageState, ran: Option<Duration>) {
        let Some(label) = stage_outcome(state) else {
            return;
        };
        self.stages_finished.with_label_values(&[label]).inc();
        if let Some(ran) = ran {
            self.stage_duration
                .with_label_values(&[&self.pipeline_label(pipeline), label])
                .observe(ran.as_secs_f64());
        }
    }

    /// `pipeline` itself while fewer than [`MAX_PIPELINE_LABELS`] have
    /// been seen, else [`OTHER_PIPELINES`].
    fn pipeline_label(&self, pipeline: &str) -> String {
        let mut seen = self
            .pipeline_labels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if seen.contains(pipeline) {
            return pipeline.to_owned();
        }
        if seen.len() < MAX_PIPELINE_LABELS {
            seen.insert(pipeline.to_owned());
            return pipeline.to_owned();
        }
        OTHER_PIPELINES.to_owned()
    }

    /// A stage of `pipeline` was assigned `latency` after it became ready.
    pub(crate) fn observe_dispatch_latency(&self, pipeline: &str, latency: Duration) {
        self.dispatch_latency
            .with_label_values(&[&self.pipeline_label(pipeline)])
            .observe(latency.as_secs_f64());
    }

    /// A release went live in `environment`.
    pub(crate) fn release_created(&self, environment: &EnvKey) {
        self.releases
            .with_label_values(&[environment.pipeline(), &environment.name])
            .inc();
    }

    /// A gate was decided: `outcome` is `passed`, `failed` or
    /// `awaiting_approval`.
    pub(crate) fn gate_decided(&self, outcome: &str) {
        debug_assert!(GATE_OUTCOMES.contains(&outcome), "gate outcome {outcome}");
        self.gate_decisions.with_label_values(&[outcome]).inc();
    }

    /// A rollback in `environment` ended; `succeeded` is whether the previous
    /// release is live again.
    pub(crate) fn rollback_finished(&self, environment: &EnvKey, succeeded: bool) {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        self.rollbacks
            .with_label_values(&[environment.pipeline(), &environment.name, outcome])
            .inc();
    }

    /// One monitor sample of a release in `environment` breached.
    pub(crate) fn monitor_breach(&self, environment: &EnvKey) {
        self.monitor_breaches
            .with_label_values(&[environment.pipeline(), &environment.name])
            .inc();
    }

    /// A monitor sample of the live `release` of `environment`; the
    /// environment's series of an older release go.
    pub(crate) fn monitor_sampled(
        &self,
        environment: &EnvKey,
        release: u64,
        model: &str,
        values: &std::collections::BTreeMap<String, Option<f64>>,
    ) {
        let mut series = self
            .monitor_series
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let release_label = release.to_string();
        if let Some((old, old_model, metrics)) = series.get(environment)
            && (*old != release || old_model != model)
        {
            let old = old.to_string();
            for metric in metrics {
                let _ = self.monitor_values.remove_label_values(&[
                    environment.pipeline(),
                    &environment.name,
                    &old,
                    old_model,
                    metric,
                ]);
            }
        }
        for (metric, value) in values {
            self.monitor_values
                .with_label_values(&[
                    environment.pipeline(),
                    &environment.name,
                    &release_label,
                    model,
                    metric,
                ])
                .set(value.unwrap_or(f64::NAN));
        }
        series.insert(
            environment.clone(),
            (release, model.to_owned(), values.keys().cloned().collect()),
        );
    }

    /// One alert's delivery to `destination` ("alertmanager" or "webhook")
    /// ended, after any retries.
    pub(crate) fn alert_delivered(&self, destination: &str, sent: bool) {
        let outcome = if sent { "sent" } else { "failed" };
        self.alerts.with_label_values(&[destination, outcome]).inc();
    }

    /// An alert never reached the alerter (queue full or alerter stopped).
    pub(crate) fn alert_dropped(&self) {
        self.alerts_dropped.inc();
    }

    /// One round of a commit status report to `forge` ended.
    pub(crate) fn commit_status_round(&self, forge: &str, sent: bool) {
        let outcome = if sent { "sent" } else { "failed" };
        self.commit_statuses
            .with_label_values(&[forge, outcome])
            .inc();
    }

    /// How many commit status reports wait for their forge.
    pub(crate) fn set_commit_statuses_queued(&self, queued: usize) {
        self.commit_statuses_queued.set(queued as i64);
    }

    /// The Prometheus text exposition (format 0.0.4) of everything above.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            // Only malformed families fail to encode, and ours are fixed.
            tracing::error!(%error, "cannot encode /metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The `state` label of a stage that ended in `state`; `None` if it has not.
fn stage_outcome(state: StageState) -> Option<&'static str> {
    Some(match state {
        StageState::Succeeded => "succeeded",
        StageState::Failed => "failed",
        StageState::TimedOut => "timed_out",
        StageState::Cancelled => "cancelled",
        StageState::Skipped => "skipped",
        _ => return None,
    })
}

/// Counts are far below `i64::MAX`; saturate rather than wrap if not.
fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::testing;

    /// The value of one sample line (`name{labels}`) in `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn monitor_values_keep_one_release_per_environment() {
        let metrics = Metrics::default();
        let production = EnvKey::of_pipeline("credit", "production");
        let values =
            |v: f64| std::collections::BTreeMap::from([("error_ratio".to_owned(), Some(v))]);
        metrics.monitor_sampled(&production, 1, "credit@1", &values(0.1));
        let series = |release: u64| {
            format!(
                "kiln_monitor_value{{environment=\"production\",metric=\"error_ratio\",model=\"credit@{release}\",pipeline=\"credit\",release=\"{release}\"}}"
            )
        };
        assert_eq!(sample(&metrics.render(), &series(1)), Some(0.1));
        metrics.monitor_sampled(&production, 2, "credit@2", &values(0.7));
        let text = metrics.render();
        assert_eq!(sample(&text, &series(2)), Some(0.7));
        assert_eq!(
            sample(&text, &series(1)),
            None,
            "the old release's series is gone"
        );
    }

    #[test]
    fn every_family_renders_with_its_labels() {
        let metrics = Metrics::default();
        metrics.set_engine_gauges(2, 5, 3);
        metrics.run_finished(RunState::Succeeded);
        metrics.run_finished(RunState::Running);
        metrics.stage_finished("credit", StageState::TimedOut, Some(Duration::from_secs(3)));
        metrics.observe_dispatch_latency("credit", Duration::from_millis(30));
        metrics.release_created(&EnvKey::of_pipeline("credit", "production"));
        metrics.gate_decided("awaiting_approval");
        metrics.rollback_finished(&EnvKey::of_pipeline("credit", "production"), false);
        metrics.monitor_breach(&EnvKey::of_pipeline("credit", "staging"));
        metrics.alert_delivered("webhook", true);
        metrics.alert_dropped();
        let text = metrics.render();
        for (series, value) in [
            ("kiln_active_runs", 2.0),
            ("kiln_ready_stages", 5.0),
            ("kiln_connected_agents", 3.0),
            ("kiln_runs_finished_total{state=\"succeeded\"}", 1.0),
            ("kiln_runs_finished_total{state=\"failed\"}", 0.0),
            ("kiln_stages_finished_total{state=\"timed_out\"}", 1.0),
            (
                "kiln_dispatch_latency_seconds_bucket{pipeline=\"credit\",le=\"0.025\"}",
                0.0,
            ),
            (
                "kiln_dispatch_latency_seconds_bucket{pipeline=\"credit\",le=\"0.05\"}",
                1.0,
            ),
            (
                "kiln_dispatch_latency_seconds_count{pipeline=\"credit\"}",
                1.0,
            ),
            (
                "kiln_stage_duration_seconds_bucket{pipeline=\"credit\",state=\"timed_out\",le=\"1\"}",
                0.0,
            ),
            (
                "kiln_stage_duration_seconds_bucket{pipeline=\"credit\",state=\"timed_out\",le=\"5\"}",
                1.0,
            ),
            (
                "kiln_releases_total{environment=\"production\",pipeline=\"credit\"}",
                1.0,
            ),
            (
                "kiln_gate_decisions_total{outcome=\"awaiting_approval\"}",
                1.0,
            ),
            ("kiln_gate_decisions_total{outcome=\"passed\"}", 0.0),
            (
                "kiln_rollbacks_total{environment=\"production\",outcome=\"failed\",pipeline=\"credit\"}",
                1.0,
            ),
            (
                "kiln_monitor_breaches_total{environment=\"staging\",pipeline=\"credit\"}",
                1.0,
            ),
            (
                "kiln_alerts_total{destination=\"webhook\",outcome=\"sent\"}",
                1.0,
            ),
            (
                "kiln_alerts_total{destination=\"alertmanager\",outcome=\"failed\"}",
                0.0,
            ),
            ("kiln_alerts_dropped_total", 1.0),
        ] {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        let build_info = format!(
            "kiln_build_info{{component=\"coordinator\",version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(sample(&text, &build_info), Some(1.0), "{text}");
        assert!(
            sample(&text, "process_resident_memory_bytes").is_some_and(|bytes| bytes > 0.0),
            "{text}"
        );
    }

    #[test]
    fn pipeline_labels_are_bounded() {
        let metrics = Metrics::default();
        for n in 0..MAX_PIPELINE_LABELS + 10 {
            metrics.observe_dispatch_latency(&format!("p{n}"), Duration::from_millis(5));
        }
        // A pipeline seen early keeps its own label.
        metrics.observe_dispatch_latency("p0", Duration::from_millis(5));
        let text = metrics.render();
        let series = text
            .lines()
            .filter(|line| line.starts_with("kiln_dispatch_latency_seconds_count{"))
            .count();
        assert_eq!(series, MAX_PIPELINE_LABELS + 1, "{text}");
        assert_eq!(
            sample(
                &text,
                "kiln_dispatch_latency_seconds_count{pipeline=\"_other\"}"
            ),
            Some(10.0)
        );
        assert_eq!(
            sample(
                &text,
                "kiln_dispatch_latency_seconds_count{pipeline=\"p0\"}"
            ),
            Some(2.0)
        );
    }

    #[test]
    fn render_passes_promtool() {
        let Some(promtool) = testing::binary("promtool", "render_passes_promtool") else {
            return;
        };
        let metrics = Metrics::default();
        let staging = EnvKey::of_pipeline("credit", "staging");
        metrics.release_created(&staging);
        metrics.rollback_finished(&staging, true);
        metrics.monitor_breach(&staging);
        metrics.observe_dispatch_latency("credit", Duration::from_secs(2));
        metrics.stage_finished(
            "credit",
            StageState::Succeeded,
            Some(Duration::from_secs(40)),
        );
        let report = testing::promtool_check_metrics(&promtool, &metrics.render());
        assert_eq!(report, Ok(String::new()), "promtool check metrics");
    }
}
