//! What `kiln-agent --metrics ADDR` serves at `/metrics` (Prometheus text
//! format 0.0.4): the agent's slots and running stages, whether its stream
//! to the coordinator is up, how long stages take to start, and the bytes of
//! outputs it stored. A leaf: the supervisor and the stage tasks update it,
//! the binary renders it.
//!
//! Every metric lives in this value's own registry (not the process-global
//! one), so agents embedded in one process (`kiln demo`, tests) keep apart.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Start-up latency buckets, in seconds: a warm process executor starts in
/// milliseconds, a cold checkout or image start takes seconds.
const START_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The agent's metrics; cheap to clone (one shared registry).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    slots: IntGauge,
    running: IntGauge,
    connected: IntGauge,
    /// From the `Assign` to the commands running: checkout, inputs, start.
    prepare: Histogram,
    /// From calling the executor to the commands running: process spawn,
    /// or container create, attach and start.
    executor_start: Histogram,
    output_bytes: IntCounter,
}

impl Metrics {
    /// Metrics of an agent whose executor is `executor` (`process` or
    /// `docker`), with `kiln_build_info` and, on Linux, the process's own
    /// CPU, memory and file descriptors (`process_*`).
    pub fn new(executor: &str) -> Self {
        let registry = Registry::new();
        let register = |collector: Box<dyn prometheus::core::Collector>| {
            registry.register(collector).expect("unique metric name");
        };
        let gauge = |name: &str, help: &str| {
            let gauge = IntGauge::new(name, help).expect("valid gauge");
            register(Box::new(gauge.clone()));
            gauge
        };
        let histogram = |name: &str, help: &str| {
            let opts = HistogramOpts::new(name, help)
                .const_label("executor", executor)
                .buckets(START_BUCKETS.to_vec());
            let histogram = Histogram::with_opts(opts).expect("valid histogram");
            register(Box::new(histogram.clone()));
            histogram
        };
        let build_info = IntGaugeVec::new(
            Opts::new(
                "kiln_build_info",
                "Always 1; the labels say which Kiln program and version this is.",
            ),
            &["component", "version"],
        )
        .expect("valid gauge");
        build_info
            .with_label_values(&["agent", env!("CARGO_PKG_VERSION")])
            .set(1);
        register(Box::new(build_info));
        #[cfg(target_os = "linux")]
        register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        let slots = gauge(
            "kiln_agent_slots",
            "Stages this agent runs at once (--capacity).",
        );
        let running = gauge("kiln_agent_running_stages", "Stage attempts running now.");
        let connected = gauge(
            "kiln_agent_connected",
            "1 while the agent's stream to the coordinator is open, else 0.",
        );
        let prepare = histogram(
            "kiln_agent_stage_prepare_seconds",
            "Time from a stage's assignment to its commands running (checkout, inputs, start).",
        );
        let executor_start = histogram(
            "kiln_agent_executor_start_seconds",
            "Time the executor took to start a stage's commands (spawn, or container create and start).",
        );
        let output_bytes = IntCounter::new(
            "kiln_agent_output_bytes_total",
            "Bytes of packed stage outputs stored in the coordinator's blob store (uploaded, or found there already).",
        )
        .expect("valid counter");
        register(Box::new(output_bytes.clone()));
        Self {
            inner: Arc::new(Inner {
                registry,
                slots,
                running,
                connected,
                prepare,
                executor_start,
                output_bytes,
            }),
        }
    }

    /// The Prometheus text exposition of everything above.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.inner.registry.gather(), &mut out) {
            // Only malformed families fail to encode, and these are fixed.
            tracing::error!(%error, "cannot encode /metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// The supervisor's view after each event.
    pub(crate) fn set_state(&self, capacity: u32, running: usize, connected: bool) {
        self.inner.slots.set(i64::from(capacity));
        self.inner
            .running
            .set(i64::try_from(running).unwrap_or(i64::MAX));
        self.inner.connected.set(i64::from(connected));
    }

    /// A stage's commands started `prepare` after its assignment arrived,
    /// `executor_start` of it in the executor.
    pub(crate) fn stage_started(&self, prepare: Duration, executor_start: Duration) {
        self.inner.prepare.observe(prepare.as_secs_f64());
        self.inner
            .executor_start
            .observe(executor_start.as_secs_f64());
    }

    /// An output of `bytes` (packed) is in the blob store.
    pub(crate) fn output_stored(&self, bytes: u64) {
        self.inner.output_bytes.inc_by(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric_with_its_values() {
        let metrics = Metrics::new("docker");
        metrics.set_state(4, 3, true);
        metrics.stage_started(Duration::from_millis(300), Duration::from_millis(40));
        metrics.output_stored(1000);
        metrics.output_stored(24);
        let text = metrics.render();
        for line in [
            "kiln_agent_slots 4",
            "kiln_agent_running_stages 3",
            "kiln_agent_connected 1",
            "kiln_agent_output_bytes_total 1024",
            "kiln_agent_stage_prepare_seconds_count{executor=\"docker\"} 1",
            "kiln_agent_executor_start_seconds_bucket{executor=\"docker\",le=\"0.05\"} 1",
            "kiln_agent_executor_start_seconds_bucket{executor=\"docker\",le=\"0.025\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(text.contains("kiln_build_info{component=\"agent\",version=\""));
    }
}
