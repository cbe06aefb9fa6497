//! `/agents`: the pool as the engine knows it, with what each agent runs.

use std::collections::HashMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::response::Response;
use kiln_proto::v1 as pb;
use pb::control_service_server::ControlService;

use super::{Page, RECENT_RUNS, Signed, Web, fail, finish};
use crate::web::format::{self, Chrome, render, url_encode};

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
                    format!("/runs/{}/stages/{}", run.id, url_encode(&stage.name)),
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
