//! `/` (pipelines), `/runs` and `/runs/RUN`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use kiln_common::ids::RunId;
use kiln_proto::v1 as pb;
use serde::Deserialize;

use super::{Page, RECENT_RUNS, Signed, Web, blocking, fail, finish, now_ms};
use crate::store::PipelineRecord;
use crate::web::dag;
use crate::web::format::{self, Chrome, render, short, url_encode};

/// Runs on one page of `/runs`.
const RUNS_PER_PAGE: usize = 50;
/// Runs read per batch while filtering, and batches at most per page: a
/// filter that matches nothing costs a bounded scan, then offers "older".
const SCAN_BATCH: usize = 200;
const SCAN_BATCHES: usize = 10;
/// Marks shown per branch on the pipelines page.
const MARKS_PER_BRANCH: usize = 12;

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
                runs_href: format!("/runs?pipeline={}", url_encode(&record.name)),
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
            url_encode(&query.pipeline),
            url_encode(&query.state),
            url_encode(&query.branch)
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
    /// What a run the coordinator started deploys (a rollback, a
    /// rollout's step or restore), under `rollback_label`.
    rollback: String,
    rollback_label: &'static str,
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
    let href = |name: &str| format!("/runs/{id}/stages/{}", url_encode(name));
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
            .map(|plan| match plan.kind.as_str() {
                "rollout_step" | "rollout_restore" => plan.summary.clone(),
                _ => format!(
                    "rolls {}/{} back from release {} to release {}: {}",
                    plan.pipeline,
                    plan.environment,
                    plan.from_release,
                    plan.to_release,
                    plan.reason
                ),
            })
            .unwrap_or_default(),
        rollback_label: match run.rollback.as_ref().map(|plan| plan.kind.as_str()) {
            Some("rollout_step") => "Rollout step",
            Some("rollout_restore") => "Rollout restore",
            _ => "Rollback",
        },
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
