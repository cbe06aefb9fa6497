//! The alerter against a real Alertmanager and stub webhook receivers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::*;
use crate::delivery::testing::{HttpStub, start_alertmanager};

/// Fast retries so failure paths take milliseconds.
const FAST_RETRY: RetryPolicy = RetryPolicy {
    attempts: 3,
    first_delay: Duration::from_millis(50),
    max_delay: Duration::from_millis(400),
};

fn rollback_alert(run: &str) -> Alert {
    Alert {
        name: "KilnRollback".into(),
        severity: "critical".into(),
        labels: [
            ("environment", "production"),
            ("pipeline", "customer-behavior"),
            ("release", "7"),
            ("run", run),
            ("unset", ""),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect(),
        summary: "production rolled back to release 6".into(),
        description: "error_ratio 0.31 > 0.1 for 3 samples".into(),
        starts_at: SystemTime::now(),
        ends_at: None,
    }
}

fn config() -> AlertConfig {
    AlertConfig {
        retry: FAST_RETRY,
        ..AlertConfig::new("http://kiln.example:7701/".into())
    }
}

/// The value of the sample `series` in the rendered metrics.
fn count(metrics: &Metrics, series: &str) -> f64 {
    let text = metrics.render();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Signals stop and waits for the alerter, which must end within its grace.
async fn stop_alerter(stop: watch::Sender<bool>, task: JoinHandle<()>) {
    // Without destinations the alerter has already ended and dropped `stop`.
    let _ = stop.send(true);
    tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(3), task)
        .await
        .expect("the alerter stops within its shutdown grace")
        .expect("the alerter does not panic");
}

/// A receiver (any path) answering each request with the next of
/// `statuses` (the last one repeats) and reporting what it received.
async fn receiver(
    statuses: &'static [StatusCode],
) -> (
    HttpStub,
    mpsc::UnboundedReceiver<(Instant, HeaderMap, Bytes)>,
) {
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    let router = Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
        let call = calls.fetch_add(1, Ordering::SeqCst);
        let _ = seen_tx.send((Instant::now(), headers, body));
        async move { statuses[call.min(statuses.len() - 1)] }
    });
    (HttpStub::serve(router).await, seen_rx)
}

#[tokio::test]
async fn alert_arrives_at_alertmanager_with_labels_and_annotations() {
    let Some(alertmanager) =
        start_alertmanager("alert_arrives_at_alertmanager_with_labels_and_annotations").await
    else {
        return;
    };
    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = watch::channel(false);
    let config = AlertConfig {
        alertmanager_url: Some(format!("{}/", alertmanager.url)),
        ..config()
    };
    let (alerts, task) = start(config, metrics.clone(), stopped);
    alerts.send(rollback_alert("41"));

    let query = format!("{}/api/v2/alerts", alertmanager.url);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let found = loop {
        let listed: serde_json::Value = http
            .get(&query)
            .query(&[("filter", r#"run="41""#)])
            .send()
            .await
            .expect("alertmanager answers")
            .json()
            .await
            .expect("alertmanager JSON");
        if let Some(alert) = listed.as_array().and_then(|alerts| alerts.first()) {
            break alert.clone();
        }
        assert!(Instant::now() < deadline, "the alert never reached {query}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let labels = &found["labels"];
    assert_eq!(labels["alertname"], "KilnRollback");
    assert_eq!(labels["severity"], "critical");
    assert_eq!(labels["environment"], "production");
    assert_eq!(labels["pipeline"], "customer-behavior");
    assert_eq!(labels["release"], "7");
    assert!(labels.get("unset").is_none(), "{labels}");
    assert_eq!(
        found["annotations"]["summary"],
        "production rolled back to release 6"
    );
    assert_eq!(
        found["annotations"]["description"],
        "error_ratio 0.31 > 0.1 for 3 samples"
    );
    assert_eq!(found["generatorURL"], "http://kiln.example:7701/");
    assert_eq!(found["status"]["state"], "active");
    assert_eq!(
        count(
            &metrics,
            r#"kiln_alerts_total{destination="alertmanager",outcome="sent"}"#
        ),
        1.0
    );
    stop_alerter(stop, task).await;
}

#[tokio::test]
async fn webhook_body_is_signed_with_the_secret() {
    let (hook, mut seen) = receiver(&[StatusCode::NO_CONTENT]).await;
    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = watch::channel(false);
    let config = AlertConfig {
        webhook_url: Some(hook.url("/hook")),
        webhook_secret: Some("s3cret".into()),
        ..config()
    };
    let (alerts, task) = start(config, metrics.clone(), stopped);
    let mut alert = rollback_alert("42");
    alert.ends_at = Some(alert.starts_at);
    alerts.send(alert);

    let (_, headers, body) = seen.recv().await.expect("the webhook is called");
    let header = headers[SIGNATURE_HEADER].to_str().expect("ASCII header");
    let digest =
        hex::decode(header.strip_prefix("sha256=").expect("sha256= prefix")).expect("hex digest");
    let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").expect("key");
    mac.update(&body);
    mac.verify_slice(&digest)
        .expect("the signature verifies with the shared secret");
    let mut wrong = Hmac::<Sha256>::new_from_slice(b"other").expect("key");
    wrong.update(&body);
    assert!(wrong.verify_slice(&digest).is_err());

    let posted: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(posted["name"], "KilnRollback");
    assert_eq!(posted["status"], "resolved");
    assert_eq!(posted["labels"]["run"], "42");
    assert_eq!(posted["summary"], "production rolled back to release 6");
    let starts_at = posted["startsAt"].as_str().expect("startsAt");
    assert!(humantime::parse_rfc3339(starts_at).is_ok(), "{starts_at}");
    assert_eq!(posted["endsAt"], posted["startsAt"]);
    assert_eq!(headers["content-type"], "application/json");

    stop_alerter(stop, task).await;
    assert_eq!(
        count(
            &metrics,
            r#"kiln_alerts_total{destination="webhook",outcome="sent"}"#
        ),
        1.0
    );
    hook.stop().await;
}

#[tokio::test]
async fn webhook_is_retried_with_backoff_until_the_receiver_recovers() {
    let (hook, mut seen) = receiver(&[
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::BAD_GATEWAY,
        StatusCode::OK,
    ])
    .await;
    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = watch::channel(false);
    let config = AlertConfig {
        webhook_url: Some(hook.url("/hook")),
        ..config()
    };
    let (alerts, task) = start(config, metrics.clone(), stopped);
    alerts.send(rollback_alert("43"));

    let mut times = Vec::new();
    for _ in 0..3 {
        let (at, headers, _) = seen.recv().await.expect("another attempt");
        assert!(
            headers.get(SIGNATURE_HEADER).is_none(),
            "no secret, no signature"
        );
        times.push(at);
    }
    // 50 ms after the first failure, then 100 ms after the second.
    assert!(
        times[1] - times[0] >= Duration::from_millis(50),
        "{times:?}"
    );
    assert!(
        times[2] - times[1] >= Duration::from_millis(100),
        "{times:?}"
    );
    let sent = r#"kiln_alerts_total{destination="webhook",outcome="sent"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&metrics, sent) < 1.0 {
        assert!(Instant::now() < deadline, "the third attempt never counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_alerter(stop, task).await;
    assert!(seen.try_recv().is_err(), "no attempt after success");
    assert_eq!(
        count(
            &metrics,
            r#"kiln_alerts_total{destination="webhook",outcome="failed"}"#
        ),
        0.0
    );
    hook.stop().await;
}

#[tokio::test]
async fn delivery_gives_up_after_the_last_attempt_or_a_rejection() {
    let (failing, mut failing_seen) = receiver(&[StatusCode::INTERNAL_SERVER_ERROR]).await;
    let (rejecting, mut rejecting_seen) = receiver(&[StatusCode::BAD_REQUEST]).await;
    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = watch::channel(false);
    // The rejecting receiver plays Alertmanager: a 400 is final at once,
    // while the failing webhook's 500s are retried to the last attempt.
    let config = AlertConfig {
        alertmanager_url: Some(format!("http://{}", rejecting.addr)),
        webhook_url: Some(failing.url("/hook")),
        ..config()
    };
    let (alerts, task) = start(config, metrics.clone(), stopped);
    alerts.send(rollback_alert("44"));

    let failed = |destination: &str| {
        count(
            &metrics,
            &format!(r#"kiln_alerts_total{{destination="{destination}",outcome="failed"}}"#),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while failed("webhook") + failed("alertmanager") < 2.0 {
        assert!(Instant::now() < deadline, "the deliveries never gave up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_alerter(stop, task).await;
    let attempts = |seen: &mut mpsc::UnboundedReceiver<_>| {
        let mut attempts = 0;
        while seen.try_recv().is_ok() {
            attempts += 1;
        }
        attempts
    };
    assert_eq!(attempts(&mut failing_seen), FAST_RETRY.attempts);
    assert_eq!(attempts(&mut rejecting_seen), 1);
    failing.stop().await;
    rejecting.stop().await;
}

#[tokio::test]
async fn send_never_blocks_and_counts_drops_when_the_queue_is_full() {
    // A receiver that never answers holds the first alert in delivery.
    let hang = HttpStub::serve(Router::new().route(
        "/hook",
        post(|| async {
            std::future::pending::<()>().await;
        }),
    ))
    .await;
    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = watch::channel(false);
    let config = AlertConfig {
        webhook_url: Some(hang.url("/hook")),
        queue_capacity: 4,
        request_timeout: Duration::from_secs(60),
        ..config()
    };
    let (alerts, task) = start(config, metrics.clone(), stopped);

    let begun = Instant::now();
    for run in 0..200 {
        alerts.send(rollback_alert(&run.to_string()));
    }
    let spent = begun.elapsed();
    assert!(
        spent < Duration::from_millis(200),
        "200 sends took {spent:?}"
    );
    // At most the queue plus the one in delivery got through.
    let dropped = count(&metrics, "kiln_alerts_dropped_total");
    assert!((195.0..=196.0).contains(&dropped), "dropped {dropped}");

    // Stopping does not wait for the hung receiver beyond the grace.
    let begun = Instant::now();
    stop_alerter(stop, task).await;
    assert!(begun.elapsed() < SHUTDOWN_GRACE + Duration::from_secs(1));
    alerts.send(rollback_alert("after-stop"));
    assert_eq!(count(&metrics, "kiln_alerts_dropped_total"), dropped + 1.0);
    hang.stop().await;
}

#[tokio::test]
async fn without_destinations_alerts_are_only_logged() {
    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = watch::channel(false);
    let (alerts, task) = start(config(), metrics.clone(), stopped);
    alerts.send(rollback_alert("45"));
    stop_alerter(stop, task).await;
    assert_eq!(count(&metrics, "kiln_alerts_dropped_total"), 0.0);
}

#[test]
fn alertmanager_body_has_the_v2_shape() {
    let mut alert = rollback_alert("46");
    alert.starts_at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    alert.ends_at = Some(alert.starts_at + Duration::from_secs(60));
    let body: serde_json::Value =
        serde_json::from_slice(&alertmanager_body(&alert, "")).expect("JSON");
    assert_eq!(
        body,
        json!([{
            "labels": {
                "alertname": "KilnRollback",
                "severity": "critical",
                "environment": "production",
                "pipeline": "customer-behavior",
                "release": "7",
                "run": "46",
            },
            "annotations": {
                "summary": "production rolled back to release 6",
                "description": "error_ratio 0.31 > 0.1 for 3 samples",
            },
            "startsAt": "2023-11-14T22:13:20.123Z",
            "endsAt": "2023-11-14T22:14:20.123Z",
        }])
    );
}

#[test]
fn signature_is_hex_hmac_sha256() {
    // RFC 4231 test case 2.
    assert_eq!(
        signature(b"Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}
