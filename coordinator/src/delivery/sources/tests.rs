//! Sources against stub exporters and a real Prometheus server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::routing::get;

use super::*;
use crate::delivery::http_client;
use crate::delivery::testing::{HttpStub, free_port, start_prometheus};

const TIMEOUT: Duration = Duration::from_secs(5);

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

fn scrape_source(url: String, metric: &str, pairs: &[(&str, &str)]) -> MetricSource {
    MetricSource::Scrape {
        url,
        metric: metric.to_owned(),
        labels: labels(pairs),
    }
}

/// An exporter serving `text` at `/metrics`.
async fn exporter(text: &'static str) -> HttpStub {
    HttpStub::serve(Router::new().route("/metrics", get(move || async move { text }))).await
}

const EXPOSITION: &str = r#"# HELP model_requests_total Requests served.
# TYPE model_requests_total counter
model_requests_total{release="r1",code="200"} 1027 1700000000000
model_requests_total{release="r1",code="500"} 3
model_requests_total{release="r2",code="200"} 12
  model_error_ratio{release="r2", path="C:\\models\\new \"fast\"\nline2",} 0.25
model_latency_seconds_sum NaN
model_latency_seconds_bucket{le="+Inf"} +Inf
model_drift -Inf
model_loaded 1 # {trace_id="abc"} 1
"#;

#[test]
fn exposition_parses_labels_escapes_and_special_values() {
    let series = parse_exposition(EXPOSITION).expect("valid exposition");
    assert_eq!(series.len(), 8);
    assert_eq!(
        series[0],
        Series {
            name: "model_requests_total".into(),
            labels: labels(&[("release", "r1"), ("code", "200")]),
            value: 1027.0,
        }
    );
    assert_eq!(
        series[3].labels,
        labels(&[
            ("release", "r2"),
            ("path", "C:\\models\\new \"fast\"\nline2")
        ])
    );
    assert_eq!(series[3].value, 0.25);
    assert!(series[4].value.is_nan());
    assert_eq!(series[5].value, f64::INFINITY);
    assert_eq!(series[6].value, f64::NEG_INFINITY);
    assert_eq!(series[7].value, 1.0);
}

#[test]
fn exposition_errors_name_the_line_and_the_problem() {
    for (text, line, reason) in [
        (
            "ok 1\nbad{a=1} 2\n",
            2,
            "expected =\" after the label name a",
        ),
        (
            "x{a=\"1\" 2\n",
            1,
            "expected , or } after the value of label a",
        ),
        ("x{a=\"1\\t\"} 2\n", 1, "unknown escape \\t"),
        ("x{a=\"1\"} \n", 1, "x has no value"),
        ("x{a=\"1\"} twelve\n", 1, "not a number"),
        ("x 1 2 3\n", 1, "unexpected \"3\" after the timestamp"),
        ("x{a=\"1\",a=\"2\"} 1\n", 1, "label a appears twice"),
        ("{a=\"1\"} 1\n", 1, "expected a metric name"),
    ] {
        let (at, message) = parse_exposition(text).expect_err(text);
        assert_eq!(at, line, "{text:?}: {message}");
        assert!(message.contains(reason), "{text:?}: {message}");
    }
}

#[tokio::test]
async fn scrape_picks_the_one_series_carrying_the_labels() {
    let exporter = exporter(EXPOSITION).await;
    let http = http_client();
    let url = exporter.url("/metrics");
    let check = |metric: &'static str, pairs: &'static [(&str, &str)]| {
        let source = scrape_source(url.clone(), metric, pairs);
        let http = http.clone();
        async move { sample(&http, &source, TIMEOUT).await }
    };

    let value = check(
        "model_requests_total",
        &[("release", "r1"), ("code", "500")],
    )
    .await;
    assert_eq!(value.unwrap(), Sample::Value(3.0));
    let value = check("model_requests_total", &[("release", "r2")]).await;
    assert_eq!(value.unwrap(), Sample::Value(12.0));
    let value = check("model_error_ratio", &[]).await;
    assert_eq!(value.unwrap(), Sample::Value(0.25));
    let value = check("model_latency_seconds_sum", &[]).await.unwrap();
    assert!(matches!(value, Sample::Value(v) if v.is_nan()), "{value:?}");
    let value = check("model_requests_total", &[("release", "r3")]).await;
    assert_eq!(value.unwrap(), Sample::Empty);
    let value = check("model_missing", &[]).await;
    assert_eq!(value.unwrap(), Sample::Empty);

    let error = check("model_requests_total", &[("release", "r1")])
        .await
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("2 series at http://"), "{error}");
    assert!(
        error.contains(r#"model_requests_total{code="200",release="r1"}, model_requests_total{code="500",release="r1"}"#),
        "{error}"
    );
    assert!(error.contains("add labels to the monitor"), "{error}");
    exporter.stop().await;
}

#[tokio::test]
async fn scrape_reports_http_parse_unreachable_and_timeout_errors() {
    let stub = HttpStub::serve(
        Router::new()
            .route(
                "/broken",
                get(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "overloaded") }),
            )
            .route("/garbage", get(|| async { "<html>hello</html>" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late 1"
                }),
            ),
    )
    .await;
    let http = http_client();
    let error = |url: String, timeout: Duration| {
        let http = http.clone();
        async move {
            let source = scrape_source(url, "x", &[]);
            sample(&http, &source, timeout)
                .await
                .unwrap_err()
                .to_string()
        }
    };

    let url = stub.url("/broken");
    let message = error(url.clone(), TIMEOUT).await;
    assert_eq!(message, format!("{url} answered HTTP 503: overloaded"));

    let url = stub.url("/garbage");
    let message = error(url.clone(), TIMEOUT).await;
    assert!(
        message.starts_with(&format!(
            "line 1 of the exposition at {url} is not valid Prometheus text"
        )),
        "{message}"
    );

    let url = format!("http://127.0.0.1:{}/metrics", free_port());
    let message = error(url.clone(), TIMEOUT).await;
    assert!(
        message.starts_with(&format!("cannot reach {url}: ")),
        "{message}"
    );
    assert!(message.contains("refused"), "{message}");

    let url = stub.url("/slow");
    let message = error(url.clone(), Duration::from_millis(300)).await;
    assert_eq!(
        message,
        format!("{url} did not answer within 300ms; check the service or raise the timeout")
    );
    stub.stop().await;
}

#[tokio::test]
async fn scrape_reads_prometheus_own_exposition() {
    let Some(prometheus) = start_prometheus("scrape_reads_prometheus_own_exposition", &[]).await
    else {
        return;
    };
    // Prometheus's own /metrics is a large, real exposition (histograms,
    // summaries, escaped help): every line of it must parse.
    let source = scrape_source(
        format!("{}/metrics", prometheus.url),
        "prometheus_ready",
        &[],
    );
    let value = sample(&http_client(), &source, TIMEOUT).await.unwrap();
    assert_eq!(value, Sample::Value(1.0));
}

#[tokio::test]
async fn prometheus_queries_yield_values_empty_and_clear_errors() {
    let Some(prometheus) = start_prometheus(
        "prometheus_queries_yield_values_empty_and_clear_errors",
        &[],
    )
    .await
    else {
        return;
    };
    let http = http_client();
    let check = |query: &str| {
        let source = MetricSource::Prometheus {
            url: format!("{}/", prometheus.url),
            query: query.to_owned(),
        };
        let http = http.clone();
        async move { sample(&http, &source, TIMEOUT).await }
    };
    let endpoint = format!("{}/api/v1/query", prometheus.url);

    assert_eq!(check("vector(0.5)").await.unwrap(), Sample::Value(0.5));
    assert_eq!(
        check("scalar(vector(2))").await.unwrap(),
        Sample::Value(2.0)
    );
    assert_eq!(check("vector(1) > 2").await.unwrap(), Sample::Empty);
    let nan = check("vector(NaN)").await.unwrap();
    assert!(matches!(nan, Sample::Value(v) if v.is_nan()), "{nan:?}");
    assert_eq!(
        check("vector(+Inf)").await.unwrap(),
        Sample::Value(f64::INFINITY)
    );

    let two = r#"label_replace(vector(1), "a", "x", "", "") or label_replace(vector(2), "a", "y", "", "")"#;
    let message = check(two).await.unwrap_err().to_string();
    assert_eq!(
        message,
        format!(
            "the query `{two}` at {endpoint} returned 2 series; aggregate it to one (e.g. with sum or max)"
        )
    );

    let message = check("sum(").await.unwrap_err().to_string();
    assert!(
        message.starts_with(&format!(
            "prometheus at {endpoint} rejected the query (bad_data): "
        )),
        "{message}"
    );
    assert!(message.contains("parse error"), "{message}");

    let message = check("vector(1)[1m:10s]").await.unwrap_err().to_string();
    assert!(
        message.contains("returned a range vector (matrix)"),
        "{message}"
    );
    let message = check(r#""text""#).await.unwrap_err().to_string();
    assert!(message.contains("returned a string"), "{message}");

    // The exposition endpoint is not the query API.
    let source = MetricSource::Prometheus {
        url: format!("{}/metrics", prometheus.url),
        query: "vector(1)".to_owned(),
    };
    let message = sample(&http, &source, TIMEOUT)
        .await
        .unwrap_err()
        .to_string();
    assert!(message.contains("answered HTTP 404"), "{message}");
}

#[tokio::test]
async fn prometheus_query_follows_a_scraped_exporter() {
    // The value a model server would export, changed by the test.
    let ratio_millis = Arc::new(AtomicU64::new(250));
    let served = ratio_millis.clone();
    let exporter = HttpStub::serve(Router::new().route(
        "/metrics",
        get(move || {
            let millis = served.load(Ordering::SeqCst);
            async move {
                format!(
                    "# TYPE model_error_ratio gauge\nmodel_error_ratio{{release=\"r2\"}} {}\n",
                    millis as f64 / 1000.0
                )
            }
        }),
    ))
    .await;
    let Some(prometheus) = start_prometheus(
        "prometheus_query_follows_a_scraped_exporter",
        &[exporter.addr],
    )
    .await
    else {
        return;
    };
    let source = MetricSource::Prometheus {
        url: prometheus.url.clone(),
        query: r#"max(model_error_ratio{release="r2"})"#.to_owned(),
    };
    let http = http_client();
    let wait_for = |expected: f64| {
        let (http, source) = (http.clone(), source.clone());
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let seen = sample(&http, &source, TIMEOUT).await.unwrap();
                if seen == Sample::Value(expected) {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "prometheus still says {seen:?}, expected {expected}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    wait_for(0.25).await;
    ratio_millis.store(750, Ordering::SeqCst);
    wait_for(0.75).await;
    drop(prometheus);
    exporter.stop().await;
}
