//! Sampling a monitored metric, once, from where the `monitor:` block says:
//! a Prometheus exposition endpoint (`scrape`) or a Prometheus server's
//! instant-query API (`prometheus`).
//!
//! A sample is a number (NaN and ±Inf included: judging them is the
//! monitor's job), or [`Sample::Empty`] when the series is absent. Anything
//! else that goes wrong — unreachable, timeout, HTTP error, unparsable
//! answer, rejected query, more than one series — is a [`SourceError`];
//! the monitor counts both `Empty` and errors per its `on_missing`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use serde::Deserialize;

use self::exposition::{Series, parse_exposition, parse_value};
use super::HttpClient;

mod exposition;

/// Largest response body read from a source: a scrape of a busy exporter is
/// a few MiB at most; anything bigger is a misconfigured URL.
const MAX_BODY_BYTES: usize = 16 << 20;
/// How much of an unexpected response body an error quotes.
const QUOTED_BODY_CHARS: usize = 200;

/// Where a monitor reads its metric.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum MetricSource {
    /// A Prometheus text exposition endpoint (e.g. the model server's
    /// `/metrics`). `metric` is a sample name as it appears in the text
    /// (`requests_total`, `latency_seconds_bucket`), and exactly one series
    /// of that name may carry all of `labels` (others may carry more).
    Scrape {
        url: String,
        metric: String,
        labels: BTreeMap<String, String>,
    },
    /// A Prometheus server (`url` is its root, e.g. `http://prom:9090`) and
    /// a PromQL instant query that yields one series or a scalar.
    Prometheus { url: String, query: String },
}

/// One observation of a monitored metric.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Sample {
    Value(f64),
    /// No series matched: the metric is absent from the scrape, or the
    /// query's result vector is empty.
    Empty,
}

/// Why a source could not be sampled. Every message names the URL.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SourceError {
    #[error("cannot reach {url}: {reason}; check that the service is up and the URL is right")]
    Unreachable { url: String, reason: String },
    #[error("{url} did not answer within {timeout:?}; check the service or raise the timeout")]
    Timeout { url: String, timeout: Duration },
    #[error("{url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error(
        "the response of {url} is larger than {MAX_BODY_BYTES} bytes; point the monitor at a smaller endpoint"
    )]
    TooLarge { url: String },
    #[error("line {line} of the exposition at {url} is not valid Prometheus text: {reason}")]
    Exposition {
        url: String,
        line: usize,
        reason: String,
    },
    #[error(
        "{count} series at {url} match {metric}: {candidates}; add labels to the monitor to pick one"
    )]
    AmbiguousSeries {
        url: String,
        metric: String,
        count: usize,
        candidates: String,
    },
    #[error("prometheus at {url} rejected the query ({kind}): {message}")]
    QueryRejected {
        url: String,
        kind: String,
        message: String,
    },
    #[error(
        "the query `{query}` at {url} returned {count} series; aggregate it to one (e.g. with sum or max)"
    )]
    ManySeries {
        url: String,
        query: String,
        count: usize,
    },
    #[error(
        "the query `{query}` at {url} returned a {result_type}; use a query that yields an instant vector or a scalar"
    )]
    UnsupportedResult {
        url: String,
        query: String,
        result_type: String,
    },
    #[error(
        "{url} did not answer like a prometheus query API: {reason}; check that the URL is the server's root"
    )]
    BadResponse { url: String, reason: String },
}

/// Takes one sample from `source`, giving up after `timeout`.
pub(crate) async fn sample(
    http: &HttpClient,
    source: &MetricSource,
    timeout: Duration,
) -> Result<Sample, SourceError> {
    match source {
        MetricSource::Scrape {
            url,
            metric,
            labels,
        } => scrape(http, url, metric, labels, timeout).await,
        MetricSource::Prometheus { url, query } => {
            query_prometheus(http, url, query, timeout).await
        }
    }
}

async fn scrape(
    http: &HttpClient,
    url: &str,
    metric: &str,
    labels: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<Sample, SourceError> {
    let request = http
        .get(url)
        .header("accept", "text/plain;version=0.0.4;q=1,*/*;q=0.1")
        .timeout(timeout);
    let (status, body) = fetch(request, url, timeout).await?;
    if !(200..300).contains(&status) {
        return Err(status_error(url, status, &body));
    }
    let text = String::from_utf8_lossy(&body);
    let series = parse_exposition(&text).map_err(|(line, reason)| SourceError::Exposition {
        url: url.to_owned(),
        line,
        reason,
    })?;
    let matching: Vec<&Series> = series
        .iter()
        .filter(|series| {
            series.name == metric
                && labels
                    .iter()
                    .all(|(name, value)| series.labels.get(name) == Some(value))
        })
        .collect();
    match matching.as_slice() {
        [] => Ok(Sample::Empty),
        [only] => Ok(Sample::Value(only.value)),
        many => Err(SourceError::AmbiguousSeries {
            url: url.to_owned(),
            metric: metric.to_owned(),
            count: many.len(),
            candidates: many
                .iter()
                .map(|series| series.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The parts of a `/api/v1/query` answer that matter here.
#[derive(Deserialize)]
struct QueryResponse {
    status: String,
    data: Option<QueryData>,
    #[serde(rename = "errorType")]
    error_type: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum QueryData {
    Vector(Vec<VectorSample>),
    /// `[unix_time, "value"]`.
    Scalar((f64, String)),
    Matrix(serde::de::IgnoredAny),
    String(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct VectorSample {
    /// `[unix_time, "value"]`; Prometheus sends values as strings so that
    /// NaN and ±Inf survive JSON.
    value: (f64, String),
}

async fn query_prometheus(
    http: &HttpClient,
    url: &str,
    query: &str,
    timeout: Duration,
) -> Result<Sample, SourceError> {
    let endpoint = format!("{}/api/v1/query", url.trim_end_matches('/'));
    let request = http
        .get(&endpoint)
        .query(&[("query", query)])
        .timeout(timeout);
    let (status, body) = fetch(request, &endpoint, timeout).await?;
    // Prometheus explains rejected queries (400, 422, 503) in the usual JSON
    // envelope; only a body that is not that envelope is an HTTP failure.
    let response: QueryResponse = match serde_json::from_slice(&body) {
        Ok(response) => response,
        Err(_) if !(200..300).contains(&status) => {
            return Err(status_error(&endpoint, status, &body));
        }
        Err(error) => {
            return Err(SourceError::BadResponse {
                url: endpoint,
                reason: error.to_string(),
            });
        }
    };
    if response.status != "success" {
        return Err(SourceError::QueryRejected {
            url: endpoint,
            kind: response.error_type.unwrap_or_else(|| "error".to_owned()),
            message: response
                .error
                .unwrap_or_else(|| format!("status {:?}", response.status)),
        });
    }
    let unsupported = |result_type: &str| SourceError::UnsupportedResult {
        url: endpoint.clone(),
        query: query.to_owned(),
        result_type: result_type.to_owned(),
    };
    let value = match response.data {
        Some(QueryData::Vector(mut samples)) => match (samples.pop(), samples.len()) {
            (None, _) => return Ok(Sample::Empty),
            (Some(only), 0) => only.value.1,
            (Some(_), others) => {
                return Err(SourceError::ManySeries {
                    url: endpoint,
                    query: query.to_owned(),
                    count: others + 1,
                });
            }
        },
        Some(QueryData::Scalar((_, value))) => value,
        Some(QueryData::Matrix(_)) => return Err(unsupported("range vector (matrix)")),
        Some(QueryData::String(_)) => return Err(unsupported("string")),
        None => {
            return Err(SourceError::BadResponse {
                url: endpoint,
                reason: "a successful answer without data".to_owned(),
            });
        }
    };
    parse_value(&value)
        .map(Sample::Value)
        .ok_or_else(|| SourceError::BadResponse {
            url: endpoint.clone(),
            reason: format!("the sample value {value:?} is not a number"),
        })
}

/// Sends `request` and reads the status and (bounded) body.
async fn fetch(
    request: reqwest::RequestBuilder,
    url: &str,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), SourceError> {
    let transport = |error: reqwest::Error| {
        if error.is_timeout() {
            SourceError::Timeout {
                url: url.to_owned(),
                timeout,
            }
        } else {
            SourceError::Unreachable {
                url: url.to_owned(),
                reason: error_chain(&error),
            }
        }
    };
    let mut response = request.send().await.map_err(transport)?;
    let status = response.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(SourceError::TooLarge {
                url: url.to_owned(),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, body))
}

fn status_error(url: &str, status: u16, body: &[u8]) -> SourceError {
    let text = String::from_utf8_lossy(body);
    let mut quoted: String = text.trim().chars().take(QUOTED_BODY_CHARS).collect();
    if text.trim().chars().count() > QUOTED_BODY_CHARS {
        quoted.push('…');
    }
    SourceError::Status {
        url: url.to_owned(),
        status,
        body: quoted,
    }
}

/// An error and its causes, "outer: inner: innermost" (reqwest's own
/// message hides the useful part, e.g. "connection refused").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let _ = write!(text, ": {inner}");
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests;
