//! The read-only pages. Each gathers what it shows from the read path
//! (the [`Reader`](crate::read::Reader) and store reads on the blocking
//! pool, at the durable watermark) into a flat view struct of strings,
//! and a template lays it out.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use futures::StreamExt;
use kiln_common::ids::{EnvKey, RunId};
use kiln_proto::v1 as pb;
use pb::control_service_server::ControlService;
use serde::Deserialize;

use super::format::{self, Chrome, render, segment, short, status_page};
use super::live::{attempt_lines, current_stage};
use super::session::Signed;
use super::{Web, actions, ansi, chart, dag};
use crate::error::ApiError;
use crate::store::{EnvironmentRecord, PipelineRecord, ReleaseRecord, ReleaseState, Store};

/// Runs on one page of `/runs`.
const RUNS_PER_PAGE: usize = 50;
/// Runs read per batch while filtering, and batches at most per page: a
/// filter that matches nothing costs a bounded scan, then offers "older".
const SCAN_BATCH: usize = 200;
const SCAN_BATCHES: usize = 10;
/// Marks shown per branch on the pipelines page.
const MARKS_PER_BRANCH: usize = 12;
/// Runs the pipelines page looks at.
const RECENT_RUNS: usize = 500;
/// Lines a stage page renders; the whole log is at `/log`.
const PAGE_LINES: usize = 20_000;

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

// ---------------------------------------------------------------- pipelines

struct Mark {
    href: String,
    state: &'static str,
    title: String,
}

struct BranchRow {
    branch: String,
    marks: Vec<Mark>,
}

struct PipelineRow {
    name: String,
    version: u32,
    repo: String,
    runs_href: String,
    branches: Vec<BranchRow>,
}

#[derive(Template)]
#[template(path = "pipelines.html")]
struct PipelinesPage {
    chrome: Chrome,
    pipelines: Vec<PipelineRow>,
}

pub(crate) async fn pipelines(State(web): State<Arc<Web>>, signed: Signed) -> Response {
    finish(pipelines_page(&web, &signed).await)
}

async fn pipelines_page(web: &Web, signed: &Signed) -> Page {
    let records: Vec<PipelineRecord> = blocking(web, |store| Ok(store.latest_pipelines()?))
        .await
        .map_err(fail(signed))?;
    let runs = web
        .reader
        .runs(None, RECENT_RUNS)
        .await
        .map_err(|e| fail(signed)(e.into()))?;
    let mut by_branch: BTreeMap<(String, String), Vec<Mark>> = BTreeMap::new();
    for run in &runs {
        let marks = by_branch
            .entry((run.pipeline.clone(), run.rev.clone()))
            .or_default();
        if marks.len() < MARKS_PER_BRANCH {
            marks.push(Mark {
                href: format!("/runs/{}", run.id),
                state: format::run_state(run.state),
                title: format!(
                    "run {} — {} — {}",
                    run.id,
                    format::run_state(run.state),
                    format::time(run.created_ms)
                ),
            });
        }
    }
    let pipelines = records
        .into_iter()
        .map(|record| {
            let branches = by_branch
                .iter_mut()
                .filter(|((pipeline, _), _)| *pipeline == record.name)
                .map(|((_, branch), marks)| BranchRow {
                    branch: branch.clone(),
                    marks: std::mem::take(marks),
                })
                .collect();
            PipelineRow {
                runs_href: format!("/runs?pipeline={}", segment(&record.name)),
                name: record.name,
                version: record.version,
                repo: record.repo,
                branches,
            }
        })
        .collect();
    Ok(render(&PipelinesPage {
        chrome: signed.chrome(),
        pipelines,
    }))
}

// ---------------------------------------------------------------- runs

#[derive(Deserialize, Default)]
pub(crate) struct RunsQuery {
    #[serde(default)]
    pipeline: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    branch: String,
    /// Show runs older than this id.
    before: Option<u64>,
}

struct RunRow {
    id: u64,
    href: String,
    pipeline: String,
    state: &'static str,
    branch: String,
    commit: String,
    trigger: &'static str,
    triggered_by: String,
    created: String,
    duration: String,
}

#[derive(Template)]
#[template(path = "runs.html")]
struct RunsPage {
    chrome: Chrome,
    runs: Vec<RunRow>,
    pipelines: Vec<String>,
    states: Vec<&'static str>,
    pipeline: String,
    state: String,
    branch: String,
    older_href: String,
}

fn run_row(run: &pb::Run) -> RunRow {
    let end = if run.finished_ms == 0 {
        now_ms()
    } else {
        run.finished_ms
    };
    RunRow {
        id: run.id,
        href: format!("/runs/{}", run.id),
        pipeline: run.pipeline.clone(),
        state: format::run_state(run.state),
        branch: run.rev.clone(),
        commit: short(&run.commit),
        trigger: format::trigger_kind(run),
        triggered_by: run.triggered_by.clone(),
        created: format::time(run.created_ms),
        duration: format::duration(run.created_ms, end),
    }
}

fn now_ms() -> u64 {
    use crate::clock::Clock;
    crate::clock::SystemClock.now_ms()
}

pub(crate) async fn runs(
    State(web): State<Arc<Web>>,
    signed: Signed,
    Query(query): Query<RunsQuery>,
) -> Response {
    finish(runs_page(&web, &signed, query).await)
}

async fn runs_page(web: &Web, signed: &Signed, query: RunsQuery) -> Page {
    let pipeline = Some(query.pipeline.clone()).filter(|p| !p.is_empty());
    let mut before = query.before.map(RunId);
    let mut shown = Vec::new();
    let mut more = false;
    for _ in 0..SCAN_BATCHES {
        let up_to = match before {
            Some(RunId(0)) => break,
            Some(RunId(id)) => Some(RunId(id - 1)),
            None => None,
        };
        let batch = web
            .reader
            .runs_up_to(pipeline.clone(), up_to, SCAN_BATCH)
            .await
            .map_err(|e| fail(signed)(e.into()))?;
        let full = batch.len() == SCAN_BATCH;
        for run in &batch {
            before = Some(RunId(run.id));
            let state_ok = query.state.is_empty() || format::run_state(run.state) == query.state;
            let branch_ok = query.branch.is_empty() || run.rev == query.branch;
            if state_ok && branch_ok {
                shown.push(run_row(run));
                if shown.len() == RUNS_PER_PAGE {
                    break;
                }
            }
        }
        more = full || shown.len() == RUNS_PER_PAGE;
        if shown.len() == RUNS_PER_PAGE || !full {
            break;
        }
    }
    let last = before.map_or(0, |id| id.0);
    let older_href = if more && last > 1 {
        format!(
            "/runs?pipeline={}&state={}&branch={}&before={last}",
            segment(&query.pipeline),
            segment(&query.state),
            segment(&query.branch)
        )
    } else {
        String::new()
    };
    let pipelines = blocking(web, |store| {
        Ok(store
            .latest_pipelines()?
            .into_iter()
            .map(|record| record.name)
            .collect())
    })
    .await
    .map_err(fail(signed))?;
    Ok(render(&RunsPage {
        chrome: signed.chrome(),
        runs: shown,
        pipelines,
        states: vec!["queued", "running", "succeeded", "failed", "cancelled"],
        pipeline: query.pipeline,
        state: query.state,
        branch: query.branch,
        older_href,
    }))
}

// ---------------------------------------------------------------- run

struct StageRow {
    name: String,
    href: String,
    kind: &'static str,
    state: &'static str,
    attempt: u32,
    agent: String,
    started: String,
    duration: String,
    message: String,
}

#[derive(Template)]
#[template(path = "run.html")]
struct RunPage {
    chrome: Chrome,
    run: RunRow,
    version: u32,
    commit: String,
    rollback: String,
    datasets: Vec<String>,
    dag: String,
    stages: Vec<StageRow>,
    active: bool,
    can_cancel: bool,
    /// Gates waiting for a person, with their approve/reject URLs.
    waiting: Vec<(String, String)>,
    can_decide: bool,
}

/// Which stages of the run's pipeline version are gates or environment
/// stages (the run itself does not say).
async fn stage_kinds(web: &Web, run: &pb::Run) -> HashMap<String, dag::Kind> {
    let (name, version) = (run.pipeline.clone(), run.pipeline_version);
    let record = blocking(web, move |store| Ok(store.pipeline(&name, version)?)).await;
    let Ok(Some(record)) = record else {
        return HashMap::new();
    };
    let Ok(parsed) = web.reader.parsed().get(&record) else {
        return HashMap::new();
    };
    parsed
        .stages
        .iter()
        .map(|stage| {
            let kind = if stage.gate.is_some() {
                dag::Kind::Gate
            } else if stage.environment.is_some() {
                dag::Kind::Environment
            } else {
                dag::Kind::Stage
            };
            (stage.name.clone(), kind)
        })
        .collect()
}

fn kind_name(kind: dag::Kind) -> &'static str {
    match kind {
        dag::Kind::Stage => "stage",
        dag::Kind::Gate => "gate",
        dag::Kind::Environment => "environment",
    }
}

pub(crate) async fn run(
    State(web): State<Arc<Web>>,
    signed: Signed,
    Path(id): Path<u64>,
) -> Response {
    finish(run_page(&web, &signed, id).await)
}

async fn run_page(web: &Web, signed: &Signed, id: u64) -> Page {
    let run = web
        .reader
        .run(RunId(id))
        .await
        .map_err(|e| fail(signed)(e.into()))?;
    let kinds = stage_kinds(web, &run).await;
    let kind = |name: &str| kinds.get(name).copied().unwrap_or(dag::Kind::Stage);
    let href = |name: &str| format!("/runs/{id}/stages/{}", segment(name));
    let nodes: Vec<dag::Node<'_>> = run
        .stages
        .iter()
        .map(|stage| dag::Node {
            name: &stage.name,
            state: format::stage_state(stage.state),
            kind: kind(&stage.name),
            needs: &stage.needs,
            href: href(&stage.name),
        })
        .collect();
    let dag = dag::svg(&nodes);
    let now = now_ms();
    let stages = run
        .stages
        .iter()
        .map(|stage| StageRow {
            name: stage.name.clone(),
            href: href(&stage.name),
            kind: kind_name(kind(&stage.name)),
            state: format::stage_state(stage.state),
            attempt: stage.attempt,
            agent: stage.agent.clone(),
            started: format::time(stage.started_ms),
            duration: format::duration(
                stage.started_ms,
                if stage.finished_ms == 0 {
                    now
                } else {
                    stage.finished_ms
                },
            ),
            message: stage.message.clone(),
        })
        .collect();
    let waiting = run
        .stages
        .iter()
        .filter(|s| format::stage_state(s.state) == "awaiting_approval")
        .map(|s| (s.name.clone(), href(&s.name)))
        .collect();
    let active = format::run_is_active(run.state);
    Ok(render(&RunPage {
        chrome: signed.chrome(),
        version: run.pipeline_version,
        commit: run.commit.clone(),
        rollback: run
            .rollback
            .as_ref()
            .map(|plan| {
                format!(
                    "rolls {}/{} back from release {} to release {}: {}",
                    plan.pipeline,
                    plan.environment,
                    plan.from_release,
                    plan.to_release,
                    plan.reason
                )
            })
            .unwrap_or_default(),
        datasets: run
            .datasets
            .iter()
            .map(|d| format!("{} from {} ({})", d.path, d.source, short(&d.digest)))
            .collect(),
        dag,
        stages,
        active,
        can_cancel: active && signed.can("CancelRun"),
        waiting,
        can_decide: signed.can("ApproveStage"),
        run: run_row(&run),
    }))
}

// ---------------------------------------------------------------- stage

struct LineView {
    number: u64,
    html: String,
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

#[derive(Template)]
#[template(path = "stage.html")]
struct StagePage {
    chrome: Chrome,
    run_id: u64,
    run_href: String,
    name: String,
    href: String,
    state: &'static str,
    attempt: u32,
    attempts: Vec<u32>,
    agent: String,
    started: String,
    duration: String,
    exit_code: String,
    message: String,
    lines: Vec<LineView>,
    cut: bool,
    /// The live stream's URL while lines may still come, else empty.
    events: String,
    query: String,
    artifacts: Vec<ArtifactView>,
    metrics: Vec<(String, String)>,
    gate: Option<GateView>,
    can_retry: bool,
    can_decide: bool,
}

#[derive(Deserialize)]
pub(crate) struct StageQuery {
    attempt: Option<u32>,
    /// Show only lines containing this text.
    #[serde(default)]
    q: String,
}

pub(crate) async fn stage(
    State(web): State<Arc<Web>>,
    signed: Signed,
    Path((run, name)): Path<(u64, String)>,
    Query(query): Query<StageQuery>,
) -> Response {
    finish(stage_page(&web, &signed, run, &name, query).await)
}

async fn stage_page(
    web: &Web,
    signed: &Signed,
    run_id: u64,
    name: &str,
    query: StageQuery,
) -> Page {
    let (_, stage) = current_stage(web, run_id, name)
        .await
        .map_err(fail(signed))?;
    let attempt = query.attempt.unwrap_or(stage.attempt).max(1);
    let mut lines = Vec::new();
    let mut cut = false;
    let mut stream = attempt_lines(web, run_id, name, attempt, 0, false)
        .await
        .map_err(fail(signed))?;
    let mut next_seq = 0;
    while let Some(entry) = stream.next().await {
        let entry = entry.map_err(fail(signed))?;
        if entry.attempt != attempt {
            break;
        }
        if lines.len() == PAGE_LINES {
            cut = true;
            break;
        }
        next_seq = entry.seq + 1;
        let text = entry.line.map(|line| line.text).unwrap_or_default();
        if query.q.is_empty() || text.contains(&query.q) {
            lines.push(LineView {
                number: entry.seq + 1,
                html: ansi::to_html(&text),
            });
        }
    }
    let state = format::stage_state(stage.state);
    let href = format!("/runs/{run_id}/stages/{}", segment(name));
    let finished = !matches!(
        state,
        "pending" | "ready" | "assigned" | "running" | "awaiting_approval"
    );
    // Live lines only continue an unfiltered, complete current attempt.
    let events = if !finished && !cut && query.q.is_empty() && attempt == stage.attempt {
        format!("{href}/events?attempt={attempt}&from={next_seq}")
    } else {
        String::new()
    };
    let gate = stage.gate.as_ref().map(|gate| GateView {
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
    });
    let mut metrics: Vec<(String, String)> = stage
        .metrics
        .iter()
        .map(|(k, v)| (k.clone(), format::number(*v)))
        .collect();
    metrics.sort();
    let now = now_ms();
    Ok(render(&StagePage {
        chrome: signed.chrome(),
        run_id,
        run_href: format!("/runs/{run_id}"),
        name: name.to_owned(),
        href,
        state,
        attempt,
        attempts: (1..=stage.attempt).collect(),
        agent: stage.agent.clone(),
        started: format::time(stage.started_ms),
        duration: format::duration(
            stage.started_ms,
            if stage.finished_ms == 0 {
                now
            } else {
                stage.finished_ms
            },
        ),
        exit_code: if finished && stage.started_ms != 0 {
            stage.exit_code.to_string()
        } else {
            String::new()
        },
        message: stage.message.clone(),
        lines,
        cut,
        events,
        query: query.q,
        artifacts: stage
            .outputs
            .iter()
            .map(|a| ArtifactView {
                path: a.path.clone(),
                digest: short(&a.digest),
                size: format::bytes(a.size),
                href: format!("/blobs/{}", a.digest),
            })
            .collect(),
        metrics,
        gate,
        can_retry: signed.can("RetryStage") && finished,
        can_decide: state == "awaiting_approval" && signed.can("ApproveStage"),
    }))
}

// ---------------------------------------------------------------- environments

struct EnvRow {
    key: String,
    href: String,
    live: String,
    live_href: String,
    frozen: String,
    releases: usize,
    last_change: String,
}

#[derive(Template)]
#[template(path = "environments.html")]
struct EnvironmentsPage {
    chrome: Chrome,
    environments: Vec<EnvRow>,
}

async fn environments_and_releases(
    web: &Web,
) -> Result<(Vec<EnvironmentRecord>, Vec<ReleaseRecord>), tonic::Status> {
    blocking(web, |store| Ok((store.environments()?, store.releases()?))).await
}

pub(crate) async fn environments(State(web): State<Arc<Web>>, signed: Signed) -> Response {
    finish(environments_page(&web, &signed).await)
}

async fn environments_page(web: &Web, signed: &Signed) -> Page {
    let (envs, releases) = environments_and_releases(web).await.map_err(fail(signed))?;
    let environments = envs
        .iter()
        .map(|env| {
            let mine: Vec<&ReleaseRecord> = releases
                .iter()
                .filter(|r| r.environment == env.key)
                .collect();
            EnvRow {
                key: env.key.to_string(),
                href: actions::environment_page(env.key.pipeline(), &env.key.name),
                live: env
                    .live
                    .map(|id| format!("release {id}"))
                    .unwrap_or_default(),
                live_href: env
                    .live
                    .map(|id| format!("/releases/{id}"))
                    .unwrap_or_default(),
                frozen: env.frozen.clone().unwrap_or_default(),
                releases: mine.len(),
                last_change: mine
                    .iter()
                    .map(|r| r.created_ms)
                    .max()
                    .map(format::time)
                    .unwrap_or_default(),
            }
        })
        .collect();
    Ok(render(&EnvironmentsPage {
        chrome: signed.chrome(),
        environments,
    }))
}

struct ReleaseRow {
    id: u64,
    href: String,
    state: &'static str,
    run_href: String,
    run_id: u64,
    commit: String,
    created: String,
    triggered_by: String,
    reason: String,
    restored: bool,
    metrics: String,
}

fn release_state(state: ReleaseState) -> &'static str {
    match state {
        ReleaseState::Live => "live",
        ReleaseState::Superseded => "superseded",
        ReleaseState::RolledBack => "rolled_back",
    }
}

fn release_row(release: &ReleaseRecord) -> ReleaseRow {
    ReleaseRow {
        id: release.id,
        href: format!("/releases/{}", release.id),
        state: release_state(release.state),
        run_href: format!("/runs/{}", release.run.0),
        run_id: release.run.0,
        commit: short(&release.commit),
        created: format::time(release.created_ms),
        triggered_by: release.triggered_by.clone(),
        reason: release.reason.clone().unwrap_or_default(),
        restored: release.restored_by_rollback,
        metrics: release
            .metrics
            .iter()
            .map(|(k, v)| format!("{k}={}", v.map_or("NaN".into(), format::number)))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

#[derive(Template)]
#[template(path = "environment.html")]
struct EnvironmentPage {
    chrome: Chrome,
    key: String,
    live: Option<ReleaseRow>,
    frozen: String,
    history: Vec<ReleaseRow>,
    chart: String,
    rollback_href: String,
    unfreeze_href: String,
    can_rollback: bool,
    can_unfreeze: bool,
}

pub(crate) async fn environment(
    State(web): State<Arc<Web>>,
    signed: Signed,
    Path((pipeline, name)): Path<(String, String)>,
) -> Response {
    finish(environment_page(&web, &signed, pipeline, name).await)
}

async fn environment_page(web: &Web, signed: &Signed, pipeline: String, name: String) -> Page {
    let key = EnvKey::of_pipeline(&pipeline, &name);
    let (envs, releases) = environments_and_releases(web).await.map_err(fail(signed))?;
    let env = envs.into_iter().find(|env| env.key == key).ok_or_else(|| {
        fail(signed)(tonic::Status::not_found(format!(
            "pipeline `{pipeline}` has no environment `{name}` with releases"
        )))
    })?;
    let mut mine: Vec<ReleaseRecord> = releases
        .into_iter()
        .filter(|r| r.environment == key)
        .collect();
    mine.sort_by_key(|r| r.id);
    // Oldest first on the chart: every metric any release carries.
    let names: Vec<String> = mine
        .iter()
        .flat_map(|r| r.metrics.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let chart = if names.is_empty() {
        String::new()
    } else {
        chart::svg(&chart::Chart {
            title: format!("metrics of each release of {key}"),
            labels: mine.iter().map(|r| format!("#{}", r.id)).collect(),
            series: names
                .iter()
                .map(|metric| chart::Series {
                    name: metric.clone(),
                    values: mine
                        .iter()
                        .map(|r| r.metrics.get(metric).copied().flatten())
                        .collect(),
                })
                .collect(),
            marked: mine
                .iter()
                .enumerate()
                .filter(|(_, r)| r.state == ReleaseState::RolledBack)
                .map(|(i, _)| i)
                .collect(),
            threshold: None,
        })
    };
    let live = env
        .live
        .and_then(|id| mine.iter().find(|r| r.id == id))
        .map(release_row);
    let history = mine.iter().rev().map(release_row).collect::<Vec<_>>();
    let href = actions::environment_page(&pipeline, &name);
    Ok(render(&EnvironmentPage {
        chrome: signed.chrome(),
        key: key.to_string(),
        can_rollback: signed.can("Rollback") && history.len() > 1,
        can_unfreeze: signed.can("UnfreezeEnvironment") && env.frozen.is_some(),
        frozen: env.frozen.unwrap_or_default(),
        live,
        history,
        chart,
        rollback_href: format!("{href}/rollback"),
        unfreeze_href: format!("{href}/unfreeze"),
    }))
}

// ---------------------------------------------------------------- release

#[derive(Template)]
#[template(path = "release.html")]
struct ReleasePage {
    chrome: Chrome,
    release: ReleaseRow,
    environment: String,
    environment_href: String,
    pipeline: String,
    version: u32,
    repo: String,
    commit: String,
    stage: String,
    image: String,
    source: String,
    datasets: Vec<(String, String)>,
    artifacts: Vec<ArtifactView>,
    gates: Vec<(String, GateView)>,
    signature: String,
    verified: bool,
    statement: String,
}

pub(crate) async fn release(
    State(web): State<Arc<Web>>,
    signed: Signed,
    Path(id): Path<u64>,
) -> Response {
    finish(release_page(&web, &signed, id).await)
}

async fn release_page(web: &Web, signed: &Signed, id: u64) -> Page {
    let record = blocking(web, move |store| {
        store
            .release(id)?
            .ok_or_else(|| ApiError::NotFound(format!("release {id} does not exist")))
    })
    .await
    .map_err(fail(signed))?;
    let mut request = tonic::Request::new(pb::GetReleaseRequest { release_id: id });
    request.extensions_mut().insert(signed.principal.clone());
    let view = web
        .control
        .get_release(request)
        .await
        .map_err(fail(signed))?
        .into_inner();
    let mut request = tonic::Request::new(pb::GetReleaseRequest { release_id: id });
    request.extensions_mut().insert(signed.principal.clone());
    let (signature, verified, statement) = match web.control.get_provenance(request).await {
        Ok(provenance) => {
            let provenance = provenance.into_inner();
            let key = kiln_common::provenance::load_public_key_pem(&web.provenance_key.public_pem);
            let checked = key.map_err(|e| e.to_string()).and_then(|key| {
                kiln_common::provenance::dsse::verify(&provenance.envelope_json, &key)
                    .map_err(|e| e.to_string())
            });
            let statement = serde_json::from_str::<serde_json::Value>(&provenance.statement_json)
                .and_then(|value| serde_json::to_string_pretty(&value))
                .unwrap_or(provenance.statement_json);
            match checked {
                Ok(_) => (
                    format!(
                        "the signature verifies with this coordinator's key {}",
                        provenance.key_id
                    ),
                    true,
                    statement,
                ),
                Err(error) => (
                    format!("the signature does NOT verify: {error}"),
                    false,
                    statement,
                ),
            }
        }
        Err(status) => (status.message().to_owned(), false, String::new()),
    };
    let gates = view
        .gates
        .iter()
        .filter_map(|named| {
            let gate = named.decision.as_ref()?;
            Some((
                named.stage.clone(),
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
                },
            ))
        })
        .collect();
    Ok(render(&ReleasePage {
        chrome: signed.chrome(),
        release: release_row(&record),
        environment: record.environment.to_string(),
        environment_href: actions::environment_page(
            record.environment.pipeline(),
            &record.environment.name,
        ),
        pipeline: view.pipeline.clone(),
        version: view.pipeline_version,
        repo: view.repo.clone(),
        commit: view.commit.clone(),
        stage: view.stage.clone(),
        image: view.image_digest.clone(),
        source: view.source_digest.clone(),
        datasets: view
            .datasets
            .iter()
            .map(|d| (d.path.clone(), d.digest.clone()))
            .collect(),
        artifacts: view
            .artifacts
            .iter()
            .map(|a| ArtifactView {
                path: format!("{}: {}", a.stage, a.path),
                digest: a.digest.clone(),
                size: format::bytes(a.size),
                href: format!("/blobs/{}", a.digest),
            })
            .collect(),
        gates,
        signature,
        verified,
        statement,
    }))
}

// ---------------------------------------------------------------- agents

struct AgentRow {
    name: String,
    state: &'static str,
    labels: String,
    capacity: u32,
    running: u32,
    stages: Vec<(String, String)>,
    version: String,
    last_seen: String,
}

#[derive(Template)]
#[template(path = "agents.html")]
struct AgentsPage {
    chrome: Chrome,
    agents: Vec<AgentRow>,
}

pub(crate) async fn agents(State(web): State<Arc<Web>>, signed: Signed) -> Response {
    finish(agents_page(&web, &signed).await)
}

async fn agents_page(web: &Web, signed: &Signed) -> Page {
    let mut request = tonic::Request::new(pb::ListAgentsRequest {});
    request.extensions_mut().insert(signed.principal.clone());
    let list = web
        .control
        .list_agents(request)
        .await
        .map_err(fail(signed))?
        .into_inner();
    // What each runs now: the assigned and running stages of recent runs.
    let runs = web
        .reader
        .runs(None, RECENT_RUNS)
        .await
        .map_err(|e| fail(signed)(e.into()))?;
    let mut running: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for run in runs.iter().filter(|run| format::run_is_active(run.state)) {
        for stage in &run.stages {
            if matches!(format::stage_state(stage.state), "assigned" | "running") {
                running.entry(stage.agent.clone()).or_default().push((
                    format!("run {} {}", run.id, stage.name),
                    format!("/runs/{}/stages/{}", run.id, segment(&stage.name)),
                ));
            }
        }
    }
    let agents = list
        .agents
        .into_iter()
        .map(|agent| {
            let mut labels: Vec<String> = agent
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            labels.sort();
            AgentRow {
                state: if !agent.connected {
                    "disconnected"
                } else if agent.draining {
                    "draining"
                } else {
                    "connected"
                },
                stages: running.remove(&agent.name).unwrap_or_default(),
                name: agent.name,
                labels: labels.join(", "),
                capacity: agent.capacity,
                running: agent.running,
                version: agent.version,
                last_seen: format::time(agent.last_seen_ms),
            }
        })
        .collect();
    Ok(render(&AgentsPage {
        chrome: signed.chrome(),
        agents,
    }))
}
