//! `/environments`, `/environments/PIPELINE/ENV` and `/releases/RELEASE`.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, State};
use axum::response::Response;
use kiln_common::ids::EnvKey;
use kiln_proto::v1 as pb;
use pb::control_service_server::ControlService;

use super::{ArtifactView, GateView, Page, Signed, Web, blocking, fail, finish, gate_view};
use crate::error::ApiError;
use crate::store::{EnvironmentRecord, ReleaseRecord, ReleaseState};
use crate::web::format::{self, Chrome, render, short};
use crate::web::{actions, chart};

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

pub(super) fn release_state(state: ReleaseState) -> &'static str {
    match state {
        ReleaseState::Live => "live",
        ReleaseState::Superseded => "superseded",
        ReleaseState::RolledBack => "rolled_back",
        ReleaseState::RollingOut => "rolling_out",
        ReleaseState::Aborted => "aborted",
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
    /// The monitor's samples of the newest watched release, as a chart.
    samples_chart: String,
    /// What that chart shows, for its caption.
    samples_caption: String,
    /// The rollout in progress (`strategy:`), if any.
    rollout: Option<RolloutView>,
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
    let (samples_chart, samples_caption) = samples_chart(web, &mine)
        .await
        .map_err(fail(signed))?
        .unwrap_or_default();
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
        samples_chart,
        samples_caption,
        rollout: env.rollout.as_ref().map(|rollout| {
            let run = mine
                .iter()
                .find(|release| release.id == rollout.candidate)
                .map(|release| release.run.0);
            rollout_view(rollout, run)
        }),
        rollback_href: format!("{href}/rollback"),
        unfreeze_href: format!("{href}/unfreeze"),
    }))
}

/// A rollout in progress, for people: where it is and the newest rounds.
struct RolloutView {
    kind: &'static str,
    candidate: u64,
    previous: u64,
    /// The run whose environment stage started it: it waits for the end.
    run: Option<u64>,
    /// `10% → [50%] → 100%`, the current step in brackets.
    steps: String,
    step: usize,
    n_steps: usize,
    weight: u32,
    phase: String,
    reason: String,
    rounds: Vec<RoundRow>,
}

struct RoundRow {
    step: usize,
    at: String,
    values: String,
    breached: bool,
}

/// Rounds the environment page shows (the newest).
const ROUNDS_SHOWN: usize = 20;

fn rollout_view(rollout: &crate::store::RolloutRecord, run: Option<u64>) -> RolloutView {
    use crate::store::{RolloutKind, RolloutPhase};
    let steps = kiln_common::spec::Strategy::steps_text(&rollout.steps, rollout.step);
    RolloutView {
        kind: match rollout.kind {
            RolloutKind::Canary => "canary",
            RolloutKind::Shadow => "shadow",
        },
        candidate: rollout.candidate,
        previous: rollout.previous,
        run,
        steps,
        step: rollout.step + 1,
        n_steps: rollout.steps.len(),
        weight: rollout.weight(),
        phase: match rollout.phase {
            RolloutPhase::Deploying => "deploying".to_owned(),
            RolloutPhase::Analysing { until_ms } => {
                format!("analysing until {}", format::time(until_ms))
            }
            RolloutPhase::Restoring => "restoring the previous release".to_owned(),
            RolloutPhase::Ended => "ended".to_owned(),
        },
        reason: rollout.reason.clone().unwrap_or_default(),
        rounds: rollout
            .rounds
            .iter()
            .rev()
            .take(ROUNDS_SHOWN)
            .map(|round| RoundRow {
                step: round.step + 1,
                at: format::time(round.at_ms),
                values: round
                    .values
                    .iter()
                    .map(|(metric, value)| match value {
                        Some(value) => format!("{metric}={value:.4}"),
                        None => format!("{metric}=missing"),
                    })
                    .chain(round.error.iter().map(|error| format!("error: {error}")))
                    .collect::<Vec<_>>()
                    .join(" "),
                breached: round.breached,
            })
            .collect(),
    }
}

/// Most samples one chart draws (the newest).
const MAX_SAMPLES: usize = 500;

/// The monitor's samples of the newest release that has any, over time,
/// with the `rollback_when` threshold of its first metric and the breaching
/// rounds marked; `None` when no release of the environment was watched.
async fn samples_chart(
    web: &Web,
    releases: &[ReleaseRecord],
) -> Result<Option<(String, String)>, tonic::Status> {
    let newest_first: Vec<ReleaseRecord> = releases.iter().rev().cloned().collect();
    let Some(environment) = newest_first.first().map(|r| r.environment.clone()) else {
        return Ok(None);
    };
    let parsed = web.reader.parsed().clone();
    blocking(web, move |store| {
        // The metric history `kiln metrics` reads: what the compactor kept.
        let (_, history) = crate::delivery::history::read(store, &environment, 0)?;
        for release in newest_first {
            let mut samples: Vec<_> = history
                .iter()
                .filter(|sample| sample.release == release.id)
                .cloned()
                .collect();
            if samples.is_empty() {
                continue;
            }
            samples.drain(..samples.len().saturating_sub(MAX_SAMPLES));
            let monitor = store
                .pipeline(&release.pipeline, release.pipeline_version)?
                .and_then(|record| parsed.get(&record).ok())
                .and_then(|spec| {
                    let idx = spec.stage_idx(&release.stage)?;
                    spec.stages[idx].monitor.clone()
                });
            let metrics: Vec<String> = samples
                .iter()
                .flat_map(|s| s.values.keys().cloned())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let threshold = monitor.as_ref().and_then(|monitor| {
                let first = metrics.first()?;
                Some(monitor.rollback_when.get(first)?.value)
            });
            let rule = monitor
                .as_ref()
                .and_then(|monitor| {
                    let first = metrics.first()?;
                    Some(format!("breach when {first} {}", monitor.rollback_when.get(first)?))
                })
                .unwrap_or_default();
            let svg = chart::svg(&chart::Chart {
                title: format!("monitor samples of release {}", release.id),
                labels: samples.iter().map(|s| format::time(s.at_ms)).collect(),
                series: metrics
                    .iter()
                    .map(|metric| chart::Series {
                        name: metric.clone(),
                        values: samples
                            .iter()
                            .map(|s| s.values.get(metric).copied().flatten())
                            .collect(),
                    })
                    .collect(),
                marked: samples
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.breached)
                    .map(|(i, _)| i)
                    .collect(),
                threshold,
            });
            let caption = format!(
                "The monitor's {} samples of release {} over time; the line is the threshold ({rule}), marked points breached.",
                samples.len(),
                release.id
            );
            return Ok(Some((svg, caption)));
        }
        Ok(None)
    })
    .await
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
            Some((named.stage.clone(), gate_view(gate)))
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
