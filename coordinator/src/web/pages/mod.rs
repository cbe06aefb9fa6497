//! The read-only pages. Each gathers what it shows from the read path
//! (the [`Reader`](crate::read::Reader) and store reads on the blocking
//! pool, at the durable watermark) into a flat view struct of strings,
//! and a template lays it out.

mod agents;
mod delivery;
mod models;
mod runs;
mod stage;

use axum::response::Response;
use kiln_proto::v1 as pb;

pub(crate) use agents::agents;
pub(crate) use delivery::{environment, environments, release};
pub(crate) use models::{model, models_list};
pub(crate) use runs::{pipelines, run, runs};
pub(crate) use stage::stage;

use super::Web;
use super::format::{self, status_page};
use super::session::Signed;
use crate::error::ApiError;
use crate::store::Store;

/// Runs the pipelines page looks at.
const RECENT_RUNS: usize = 500;

type Page = Result<Response, Response>;

fn fail(signed: &Signed) -> impl Fn(tonic::Status) -> Response + '_ {
    move |status| status_page(Some(signed.chrome()), &status)
}

/// Runs `read` against the store on the blocking pool.
async fn blocking<T: Send + 'static>(
    web: &Web,
    read: impl FnOnce(&dyn Store) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, tonic::Status> {
    let store = web.reader.store().clone();
    tokio::task::spawn_blocking(move || read(&*store))
        .await
        .map_err(|error| tonic::Status::internal(format!("a read task failed: {error}")))?
        .map_err(tonic::Status::from)
}

fn finish(page: Page) -> Response {
    match page {
        Ok(response) | Err(response) => response,
    }
}

fn now_ms() -> u64 {
    use crate::clock::Clock;
    crate::clock::SystemClock.now_ms()
}

struct ArtifactView {
    path: String,
    digest: String,
    size: String,
    href: String,
}

struct CheckView {
    metric: String,
    rule: String,
    value: String,
    champion: String,
    passed: bool,
    note: String,
}

struct GateView {
    passed: bool,
    summary: String,
    decided_by: String,
    checks: Vec<CheckView>,
}

fn gate_view(gate: &pb::GateDecision) -> GateView {
    GateView {
        passed: gate.passed,
        summary: gate.summary.clone(),
        decided_by: gate.decided_by.clone(),
        checks: gate
            .checks
            .iter()
            .map(|check| CheckView {
                metric: check.metric.clone(),
                rule: check.rule.clone(),
                value: check.value.map_or("—".into(), format::number),
                champion: check.champion.map_or("—".into(), format::number),
                passed: check.passed,
                note: check.decided_by_on_missing.clone(),
            })
            .collect(),
    }
}
