//! The alerter: a background task that posts each [`Alert`] to a Prometheus
//! Alertmanager (`/api/v2/alerts`) and/or a generic webhook (JSON signed
//! with HMAC-SHA256), retrying with exponential backoff.
//!
//! The engine hands alerts over with [`AlertSender::send`], which never
//! waits: the queue is bounded, and a full queue drops the alert (logged and
//! counted in `kiln_alerts_dropped_total`) rather than stall the scheduler.
//! Alerts are delivered one at a time, in order; the two destinations of one
//! alert are tried concurrently. Delivery is at least once: an alert whose
//! delivery is cut short by shutdown is posted again in the shutdown grace
//! (Alertmanager merges identical alerts; webhook receivers may see a
//! repeat).

use backon::{BackoffBuilder, ExponentialBuilder};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::HttpClient;
use super::sources::error_chain;
use crate::metrics::Metrics;

/// Header carrying `sha256=<hex HMAC-SHA256(secret, body)>` on webhook posts.
pub(crate) const SIGNATURE_HEADER: &str = "x-kiln-signature";
/// On shutdown, what is still queued gets one attempt each within this.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How much of a rejecting response body a log line quotes.
const QUOTED_BODY_CHARS: usize = 200;

/// Where alerts go and how hard to try.
#[derive(Clone, Debug)]
pub(crate) struct AlertConfig {
    /// Alertmanager's root URL (e.g. `http://alertmanager:9093`).
    pub(crate) alertmanager_url: Option<String>,
    /// A URL that receives each alert as one JSON object.
    pub(crate) webhook_url: Option<String>,
    /// Signs webhook bodies so the receiver can tell Kiln sent them.
    pub(crate) webhook_secret: Option<String>,
    /// Where a human finds more (`generatorURL`), e.g. the coordinator's
    /// address; empty leaves it out.
    pub(crate) generator_url: String,
    /// Attempts and backoff per destination and alert.
    pub(crate) retry: RetryPolicy,
    /// Alerts waiting for delivery before new ones are dropped.
    pub(crate) queue_capacity: usize,
    /// One attempt's limit, connection included.
    pub(crate) request_timeout: Duration,
}

impl AlertConfig {
    /// No destinations yet, default retries, a queue of 1024, 10 s attempts.
    pub(crate) fn new(generator_url: String) -> Self {
        Self {
            alertmanager_url: None,
            webhook_url: None,
            webhook_secret: None,
            generator_url,
            retry: RetryPolicy::default(),
            queue_capacity: 1024,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// `attempts` tries, waiting `first_delay` after the first failure and
/// doubling up to `max_delay`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RetryPolicy {
    pub(crate) attempts: u32,
    pub(crate) first_delay: Duration,
    pub(crate) max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 5 tries over about 3 s (200, 400, 800, 1600 ms between them).
    fn default() -> Self {
        Self {
            attempts: 5,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// Something an operator should hear about: a failed gate, a breach, a
/// rollback or a failed rollback.
#[derive(Clone, Debug)]
pub(crate) struct Alert {
    /// The `alertname`, e.g. `KilnRollback`.
    pub(crate) name: String,
    /// `critical`, `warning`, `info`.
    pub(crate) severity: String,
    /// `environment`, `pipeline`, `release`, `run`; empty values are left
    /// out (Prometheus treats an empty label as absent).
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) summary: String,
    pub(crate) description: String,
    pub(crate) starts_at: SystemTime,
    /// When the condition ended; `None` lets Alertmanager resolve it after
    /// its `resolve_timeout`.
    pub(crate) ends_at: Option<SystemTime>,
}

/// The engine's handle on the alerter. Cloning is cheap; `send` never waits.
#[derive(Clone)]
pub(crate) struct AlertSender {
    /// `None` when no destination is configured: alerts are only logged.
    queue: Option<mpsc::Sender<Alert>>,
    metrics: Arc<Metrics>,
}

impl AlertSender {
    /// Queues `alert` for delivery, or drops it (logged and counted) if the
    /// queue is full or the alerter has stopped. Never blocks.
    pub(crate) fn send(&self, alert: Alert) {
        let Some(queue) = &self.queue else {
            tracing::debug!(
                alertname = %alert.name,
                "no alert destination configured; alert only logged"
            );
            return;
        };
        let (reason, alert) = match queue.try_send(alert) {
            Ok(()) => return,
            Err(TrySendError::Full(alert)) => ("the alert queue is full", alert),
            Err(TrySendError::Closed(alert)) => ("the alerter has stopped", alert),
        };
        tracing::warn!(
            alertname = %alert.name,
            summary = %alert.summary,
            "dropping an alert: {reason}"
        );
        self.metrics.alert_dropped();
    }
}

/// Starts the alerter. It runs until `stop` turns true (or its sender is
/// dropped), then gives what is still queued one attempt each within
/// [`SHUTDOWN_GRACE`]; await the handle after signalling stop.
pub(crate) fn start(
    config: AlertConfig,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> (AlertSender, JoinHandle<()>) {
    if config.alertmanager_url.is_none() && config.webhook_url.is_none() {
        tracing::info!("no alert destination configured; alerts are only logged");
        let sender = AlertSender {
            queue: None,
            metrics,
        };
        return (sender, tokio::spawn(async {}));
    }
    let (queue_tx, queue_rx) = mpsc::channel(config.queue_capacity.max(1));
    let alerter = Alerter {
        http: super::http_client(),
        config,
        metrics: metrics.clone(),
    };
    let task = tokio::spawn(alerter.run(queue_rx, stop));
    let sender = AlertSender {
        queue: Some(queue_tx),
        metrics,
    };
    (sender, task)
}

/// The task's state.
struct Alerter {
    http: HttpClient,
    config: AlertConfig,
    metrics: Arc<Metrics>,
}

impl Alerter {
    async fn run(self, mut queue: mpsc::Receiver<Alert>, mut stop: watch::Receiver<bool>) {
        let mut interrupted = None;
        loop {
            let alert = tokio::select! {
                biased;
                _ = stop.wait_for(|stopped| *stopped) => break,
                alert = queue.recv() => match alert {
                    Some(alert) => alert,
                    None => return, // Every sender is gone: nothing more can come.
                },
            };
            tokio::select! {
                biased;
                _ = stop.wait_for(|stopped| *stopped) => {
                    interrupted = Some(alert);
                    break;
                }
                () = self.deliver(&alert, self.config.retry) => {}
            }
        }
        queue.close();
        let once = RetryPolicy {
            attempts: 1,
            ..self.config.retry
        };
        let drain = async {
            if let Some(alert) = interrupted {
                self.deliver(&alert, once).await;
            }
            while let Some(alert) = queue.recv().await {
                self.deliver(&alert, once).await;
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            tracing::warn!(
                "alerter stopped with undelivered alerts after {SHUTDOWN_GRACE:?} of shutdown grace"
            );
        }
    }

    /// Posts `alert` to every configured destination, each with `retry`.
    async fn deliver(&self, alert: &Alert, retry: RetryPolicy) {
        let alertmanager = async {
            if let Some(url) = &self.config.alertmanager_url {
                let url = format!("{}/api/v2/alerts", url.trim_end_matches('/'));
                let body = alertmanager_body(alert, &self.config.generator_url);
                self.post("alertmanager", &url, body, None, alert, retry)
                    .await;
            }
        };
        let webhook = async {
            if let Some(url) = &self.config.webhook_url {
                let body = webhook_body(alert, &self.config.generator_url);
                let signature = self
                    .config
                    .webhook_secret
                    .as_deref()
                    .map(|secret| (SIGNATURE_HEADER, signature(secret.as_bytes(), &body)));
                self.post("webhook", url, body, signature, alert, retry)
                    .await;
            }
        };
        tokio::join!(alertmanager, webhook);
    }

    /// POSTs `body` until it is accepted, the receiver rejects it for good
    /// (a 4xx other than 408 and 429), or the attempts run out; counts the
    /// outcome.
    async fn post(
        &self,
        destination: &'static str,
        url: &str,
        body: Vec<u8>,
        header: Option<(&'static str, String)>,
        alert: &Alert,
        retry: RetryPolicy,
    ) {
        let mut delays = ExponentialBuilder::new()
            .with_min_delay(retry.first_delay)
            .with_max_delay(retry.max_delay)
            .without_max_times()
            .build();
        let mut attempt = 1;
        let failure = loop {
            let mut request = self
                .http
                .post(url)
                .header("content-type", "application/json")
                .timeout(self.config.request_timeout)
                .body(body.clone());
            if let Some((name, value)) = &header {
                request = request.header(*name, value);
            }
            let (failure, permanent) = match request.send().await {
                Ok(response) if response.status().is_success() => {
                    tracing::info!(
                        alertname = %alert.name,
                        destination,
                        attempt,
                        "alert delivered"
                    );
                    self.metrics.alert_delivered(destination, true);
                    return;
                }
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    let quoted: String = text.trim().chars().take(QUOTED_BODY_CHARS).collect();
                    let permanent = status.is_client_error()
                        && status != reqwest::StatusCode::REQUEST_TIMEOUT
                        && status != reqwest::StatusCode::TOO_MANY_REQUESTS;
                    (format!("HTTP {}: {quoted}", status.as_u16()), permanent)
                }
                Err(error) => (error_chain(&error), false),
            };
            if permanent || attempt >= retry.attempts {
                break failure;
            }
            let delay = delays.next().unwrap_or(retry.max_delay);
            tracing::debug!(
                alertname = %alert.name,
                destination,
                attempt,
                %failure,
                "alert delivery failed; retrying in {delay:?}"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        };
        tracing::warn!(
            alertname = %alert.name,
            destination,
            "giving up on an alert to {url} after {attempt} attempt(s): {failure}; \
             check that the {destination} is reachable and accepts it"
        );
        self.metrics.alert_delivered(destination, false);
    }
}

/// `[alert]` in Alertmanager's v2 API shape.
fn alertmanager_body(alert: &Alert, generator_url: &str) -> Vec<u8> {
    let mut labels: BTreeMap<&str, &str> = alert
        .labels
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    labels.insert("alertname", &alert.name);
    labels.insert("severity", &alert.severity);
    let mut posted = json!({
        "labels": labels,
        "annotations": { "summary": alert.summary, "description": alert.description },
        "startsAt": rfc3339(alert.starts_at),
    });
    if let Some(ends_at) = alert.ends_at {
        posted["endsAt"] = json!(rfc3339(ends_at));
    }
    if !generator_url.is_empty() {
        posted["generatorURL"] = json!(generator_url);
    }
    serde_json::to_vec(&json!([posted])).expect("JSON of strings")
}

/// One JSON object with every field of the alert; `status` is `resolved`
/// once `ends_at` has passed.
fn webhook_body(alert: &Alert, generator_url: &str) -> Vec<u8> {
    let resolved = alert.ends_at.is_some_and(|ends| ends <= SystemTime::now());
    serde_json::to_vec(&json!({
        "status": if resolved { "resolved" } else { "firing" },
        "name": alert.name,
        "severity": alert.severity,
        "labels": alert.labels,
        "summary": alert.summary,
        "description": alert.description,
        "startsAt": rfc3339(alert.starts_at),
        "endsAt": alert.ends_at.map(rfc3339),
        "generatorURL": generator_url,
    }))
    .expect("JSON of strings")
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub(crate) fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// UTC with milliseconds, e.g. `2025-01-31T12:00:00.123Z`.
fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests;
