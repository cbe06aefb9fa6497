//! A [`Draft`] to a [`Pipeline`]: `needs` resolved to stage indices, checked
//! to form a DAG, and `defaults` applied.

use std::collections::HashMap;

use super::schema::{Defaults, Draft, StageDraft};
use super::suggest::did_you_mean;
use super::{DEFAULT_RETRIES, DEFAULT_TIMEOUT, EXECUTOR_LABEL, Pipeline, Problem, Stage};

/// Builds the pipeline, failing on the first bad `needs` entry or cycle.
pub(super) fn pipeline(draft: Draft) -> Result<Pipeline, Problem> {
    let stages = expand_matrices(draft.stages)?;
    let needs = resolve_needs(&stages)?;
    if let Some(cycle) = find_cycle(&needs) {
        return Err(cycle_problem(&stages, &cycle));
    }
    for stage in &stages {
        check_services(stage, &draft.defaults)?;
    }
    check_retrain_has_a_champion_gate(&stages)?;
    let stages = stages
        .into_iter()
        .zip(needs)
        .map(|(mut stage, needs)| {
            // The pipeline's `env:` under each stage's own.
            let mut env = draft.env.clone();
            env.append(&mut stage.env);
            stage.env = env;
            with_defaults(stage, needs, &draft.defaults)
        })
        .collect();
    Ok(Pipeline {
        name: draft.name,
        stages,
        triggers: draft.triggers,
        timeout: draft.timeout,
        retention: draft.retention,
        params: draft.params,
        env: draft.env,
    })
}

/// Every stage with a `matrix:` replaced by its cells, in place.
fn expand_matrices(stages: Vec<StageDraft>) -> Result<Vec<StageDraft>, Problem> {
    let mut expanded = Vec::with_capacity(stages.len());
    for stage in stages {
        match stage.matrix.clone() {
            Some(matrix) => expanded.extend(super::matrix::expand(stage, &matrix)?),
            None => expanded.push(stage),
        }
    }
    if expanded.len() > super::MAX_STAGES {
        return Err(Problem::new(
            super::Position { line: 1, column: 1 },
            format!(
                "the pipeline has {} stages once its matrices are expanded; at most {} are \
                 accepted",
                expanded.len(),
                super::MAX_STAGES
            ),
        ));
    }
    Ok(expanded)
}

/// Each stage's `needs` as indices into `stages`, in the order written; a
/// need that names a matrix stage means every one of its cells.
fn resolve_needs(stages: &[StageDraft]) -> Result<Vec<Vec<usize>>, Problem> {
    // Names are unique here: the schema rejects repeated stage keys, and
    // cells are named after their (unique) values.
    let mut idx_by_name: HashMap<&str, Vec<usize>> = HashMap::new();
    for (idx, stage) in stages.iter().enumerate() {
        let name = stage.cell_of.as_deref().unwrap_or(&stage.name);
        idx_by_name.entry(name).or_default().push(idx);
    }
    let mut all_needs = Vec::with_capacity(stages.len());
    for (stage_idx, stage) in stages.iter().enumerate() {
        let mut needs = Vec::with_capacity(stage.needs.len());
        for need in &stage.needs {
            let Some(need_idxs) = idx_by_name.get(need.name.as_str()) else {
                let names = idx_by_name.keys().copied();
                return Err(Problem::new(
                    need.position,
                    format!(
                        "stage `{}` needs `{}`, which is not a stage of this pipeline; name one \
                         of the stages under `stages:`{}",
                        stage.name,
                        need.name,
                        did_you_mean(&need.name, names)
                    ),
                ));
            };
            for &need_idx in need_idxs {
                if need_idx == stage_idx || stage.cell_of.as_deref() == Some(&need.name) {
                    return Err(Problem::new(
                        need.position,
                        format!(
                            "stage `{}` needs itself; remove `{}` from its `needs`",
                            stage.name, need.name
                        ),
                    ));
                }
                if needs.contains(&need_idx) {
                    return Err(Problem::new(
                        need.position,
                        format!(
                            "stage `{}` lists `{}` twice in `needs`; remove one",
                            stage.name, need.name
                        ),
                    ));
                }
                needs.push(need_idx);
            }
        }
        all_needs.push(needs);
    }
    Ok(all_needs)
}

/// A cycle in the `needs` graph, as stage indices where each needs the next
/// and the last needs the first; it starts at its stage that comes first in
/// the file, so the message does not depend on where the search began.
///
/// Depth-first search with an explicit stack: a pipeline may be a long chain,
/// and recursion depth would then be the chain's length.
fn find_cycle(needs: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Unvisited,
        /// On the current search path.
        Open,
        Done,
    }
    let mut marks = vec![Mark::Unvisited; needs.len()];
    for start in 0..needs.len() {
        if marks[start] != Mark::Unvisited {
            continue;
        }
        // (stage, how many of its needs have been followed); it is the path.
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        marks[start] = Mark::Open;
        while let Some((stage, n_followed)) = path.last_mut() {
            let stage = *stage;
            let Some(&next) = needs[stage].get(*n_followed) else {
                marks[stage] = Mark::Done;
                path.pop();
                continue;
            };
            *n_followed += 1;
            match marks[next] {
                Mark::Unvisited => {
                    marks[next] = Mark::Open;
                    path.push((next, 0));
                }
                Mark::Open => {
                    let from = path
                        .iter()
                        .position(|(idx, _)| *idx == next)
                        .unwrap_or_default();
                    let mut cycle: Vec<usize> = path[from..].iter().map(|(idx, _)| *idx).collect();
                    let first = (0..cycle.len())
                        .min_by_key(|i| cycle[*i])
                        .unwrap_or_default();
                    cycle.rotate_left(first);
                    return Some(cycle);
                }
                Mark::Done => {}
            }
        }
    }
    None
}

/// A monitor that retrains after its rollback needs a gate comparing with
/// that environment's champion: otherwise the retrained candidate would go
/// live without having to beat the release just restored.
fn check_retrain_has_a_champion_gate(stages: &[StageDraft]) -> Result<(), Problem> {
    for stage in stages {
        let (Some((monitor, at)), Some(environment)) =
            (&stage.delivery.monitor, &stage.delivery.environment)
        else {
            continue;
        };
        let compared =
            stages.iter().any(|other| {
                other.delivery.gate.as_ref().is_some_and(|(gate, _)| {
                    gate.compare_to.as_deref() == Some(environment.as_str())
                })
            });
        if monitor.retrain && !compared {
            return Err(Problem::new(
                *at,
                format!(
                    "`on_breach: [rollback, retrain]` of stage `{}` needs a gate that compares \
                     the retrained model with the restored one; add `compare_to: {environment}` \
                     to a gate",
                    stage.name
                ),
            ));
        }
    }
    Ok(())
}

fn cycle_problem(stages: &[StageDraft], cycle: &[usize]) -> Problem {
    let names: Vec<&str> = cycle
        .iter()
        .chain(cycle.first())
        .map(|idx| stages[*idx].name.as_str())
        .collect();
    Problem::new(
        stages[cycle[0]].position,
        format!(
            "cycle in `needs`: {}; remove one of these dependencies",
            names.join(" -> ")
        ),
    )
}

fn with_defaults(stage: StageDraft, needs: Vec<usize>, defaults: &Defaults) -> Stage {
    Stage {
        name: stage.name,
        needs,
        commands: stage.commands,
        env: stage.env,
        secrets: stage.secrets.map(|(names, _)| names).unwrap_or_default(),
        timeout: stage
            .timeout
            .or(defaults.timeout)
            .unwrap_or(DEFAULT_TIMEOUT),
        retries: stage
            .retries
            .or(defaults.retries)
            .map_or(DEFAULT_RETRIES, |(max, _)| max),
        retry_when: stage
            .retries
            .or(defaults.retries)
            .and_then(|(_, when)| when)
            .unwrap_or_default(),
        allow_failure: stage.allow_failure,
        agent_labels: stage.agent_labels,
        image: stage.image.or_else(|| defaults.image.clone()),
        container: stage.container.or_defaults(&defaults.container),
        artifacts: stage.artifacts,
        artifacts_always: stage.artifacts_always,
        metrics: stage.delivery.metrics,
        environment: stage.delivery.environment,
        endpoint: stage.delivery.endpoint.map(|(url, _)| url),
        model: stage.delivery.model.map(|(name, _)| name),
        gate: stage.delivery.gate.map(|(gate, _)| gate),
        monitor: stage.delivery.monitor.map(|(monitor, _)| monitor),
        strategy: stage.delivery.strategy.map(|(strategy, _)| strategy),
        cell_of: stage.cell_of,
        services: stage
            .services
            .map(|(services, _)| services)
            .unwrap_or_default(),
        cache: stage.cache,
    }
}

/// Services start beside a container, on its network: only a docker stage
/// (one with an image, not `executor: process`) can have them.
fn check_services(stage: &StageDraft, defaults: &Defaults) -> Result<(), Problem> {
    let Some((_, at)) = &stage.services else {
        return Ok(());
    };
    let name = &stage.name;
    if stage.agent_labels.get(EXECUTOR_LABEL).map(String::as_str) == Some("process") {
        return Err(Problem::new(
            *at,
            format!(
                "stage `{name}` runs as a host process (`executor: process`), and `services` \
                 start only beside a docker stage; remove `services` or run the stage in an \
                 `image:`"
            ),
        ));
    }
    if stage.image.is_none() && defaults.image.is_none() {
        return Err(Problem::new(
            *at,
            format!(
                "stage `{name}` has `services` but no image, so it would run as a host process; \
                 services start only beside a docker stage: add `image:` to the stage or to \
                 `defaults`"
            ),
        ));
    }
    Ok(())
}
