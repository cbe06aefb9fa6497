//! What every page shares: the frame, rendering, error pages, and how
//! times, durations and states are written.

use std::time::{Duration, UNIX_EPOCH};

use askama::Template;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use kiln_proto::v1 as pb;

/// The page frame's facts: who is signed in, and the CSRF token of their
/// forms (sign-out included).
#[derive(Default)]
pub(crate) struct Chrome {
    pub(crate) user: String,
    pub(crate) role: &'static str,
    pub(crate) csrf: String,
}

/// Renders a page, or a plain 500 naming the template error.
pub(crate) fn render(page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the page could not be rendered: {error}\n"),
        )
            .into_response(),
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    chrome: Chrome,
    status: u16,
    reason: String,
    message: String,
}

/// A page that says what went wrong, with `status`.
pub(crate) fn error_page(chrome: Option<Chrome>, status: StatusCode, message: &str) -> Response {
    let page = ErrorPage {
        chrome: chrome.unwrap_or_default(),
        status: status.as_u16(),
        reason: status.canonical_reason().unwrap_or("Error").to_owned(),
        message: message.to_owned(),
    };
    let mut response = render(&page);
    *response.status_mut() = status;
    response
}

/// A gRPC status as the page a browser gets.
pub(crate) fn status_page(chrome: Option<Chrome>, status: &tonic::Status) -> Response {
    error_page(chrome, http_status(status.code()), status.message())
}

/// The HTTP status that says the same as a gRPC code.
pub(crate) fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::Ok => StatusCode::OK,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `2026-12-04 22:47:11Z`, or "—" for an unset time.
pub(crate) fn time(ms: u64) -> String {
    if ms == 0 {
        return "—".into();
    }
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace('T', " ")
}

/// `1h 2m`, `3m 4s`, `5.2s`, or "—" when it has not started.
pub(crate) fn duration(from_ms: u64, to_ms: u64) -> String {
    if from_ms == 0 || to_ms < from_ms {
        return "—".into();
    }
    let ms = to_ms - from_ms;
    let s = ms / 1000;
    match s {
        0..60 => format!("{:.1}s", ms as f64 / 1000.0),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

pub(crate) fn run_state(state: i32) -> &'static str {
    match pb::RunState::try_from(state) {
        Ok(pb::RunState::Queued) => "queued",
        Ok(pb::RunState::Running) => "running",
        Ok(pb::RunState::Succeeded) => "succeeded",
        Ok(pb::RunState::Failed) => "failed",
        Ok(pb::RunState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

pub(crate) fn stage_state(state: i32) -> &'static str {
    match pb::StageState::try_from(state) {
        Ok(pb::StageState::Pending) => "pending",
        Ok(pb::StageState::Ready) => "ready",
        Ok(pb::StageState::Assigned) => "assigned",
        Ok(pb::StageState::Running) => "running",
        Ok(pb::StageState::Succeeded) => "succeeded",
        Ok(pb::StageState::Failed) => "failed",
        Ok(pb::StageState::TimedOut) => "timed_out",
        Ok(pb::StageState::Cancelled) => "cancelled",
        Ok(pb::StageState::Skipped) => "skipped",
        Ok(pb::StageState::AwaitingApproval) => "awaiting_approval",
        Ok(pb::StageState::RollingOut) => "rolling_out",
        _ => "unknown",
    }
}

/// Whether a stage is over: no more lines will come for its attempt.
pub(crate) fn stage_is_over(state: i32) -> bool {
    !matches!(
        pb::StageState::try_from(state),
        Ok(pb::StageState::Pending
            | pb::StageState::Ready
            | pb::StageState::Assigned
            | pb::StageState::Running
            | pb::StageState::AwaitingApproval)
    )
}

/// Whether a run can still change (cancel makes sense).
pub(crate) fn run_is_active(state: i32) -> bool {
    matches!(
        pb::RunState::try_from(state),
        Ok(pb::RunState::Queued | pb::RunState::Running)
    )
}

/// What started a run: `push`, `schedule`, `data`, `rollback`,
/// `rollout` (a step of a rollout, or its restore), `manual`, from its
/// `triggered_by` (`manual:alice`, `push:…`, …).
pub(crate) fn trigger_kind(run: &pb::Run) -> &'static str {
    if let Some(plan) = &run.rollback {
        return if plan.kind.starts_with("rollout") {
            "rollout"
        } else {
            "rollback"
        };
    }
    let by = run.triggered_by.as_str();
    for kind in ["push", "schedule", "data", "rollback", "manual"] {
        if by.starts_with(kind) {
            return kind;
        }
    }
    "manual"
}

/// The first 12 characters of a commit or digest.
pub(crate) fn short(id: &str) -> String {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    id.chars().take(12).collect()
}

/// Bytes as `1.5 MiB`.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A metric value with enough digits to compare against a threshold.
pub(crate) fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else {
        format!("{value:.4}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
    }
}

/// Escapes text for HTML (for markup built in Rust: the SVG and log lines;
/// templates escape on their own).
pub(crate) fn escape(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

/// Percent-encodes one URL path url_encode (stage names are plain, but a
/// link must not break on any name).
pub(crate) fn url_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_durations_and_numbers_read_well() {
        assert_eq!(time(0), "—");
        assert_eq!(time(1_000), "1970-01-01 00:00:01Z");
        assert_eq!(duration(1_000, 3_500), "2.5s");
        assert_eq!(duration(1_000, 126_000), "2m 5s");
        assert_eq!(duration(0, 5), "—");
        assert_eq!(number(0.9), "0.9");
        assert_eq!(number(1.0), "1");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(url_encode("deploy prod/x"), "deploy%20prod%2Fx");
    }
}
