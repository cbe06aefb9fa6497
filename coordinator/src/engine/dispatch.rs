//! Dispatch: ready stages, oldest first, go to a connected agent whose
//! labels match and that has a free slot — the one with the most free slots,
//! so work spreads across the farm. Assignments are pushed down the agent's
//! stream after the commit that records them.

use std::collections::VecDeque;

use kiln_common::spec;
use kiln_proto::v1 as pb;
use pb::coordinator_message::Msg as Out;

use kiln_common::ids::{AttemptKey, StageKey};

use super::Engine;
use super::placement::{Need, Reservation};
use super::pool::Placement;
use crate::store::{RunState, StageState};
use crate::views;

impl Engine {
    pub(super) fn dispatch(&mut self) {
        let mut waiting = VecDeque::new();
        while let Some(key) = self.ready.pop_front() {
            // Gates and frozen environments need no agent; deciding them may
            // make more stages ready, which this loop then sees.
            if self.settle_agentless(key) {
                self.ready_since.remove(&key);
                continue;
            }
            if !self.pool.has_free_slot() {
                // No slot anywhere: keep the order, but still decide the
                // gates and frozen stages further back, which need none.
                waiting.push_back(key);
                while let Some(rest) = self.ready.pop_front() {
                    if self.settle_agentless(rest) {
                        self.ready_since.remove(&rest);
                    } else {
                        waiting.push_back(rest);
                    }
                }
                break;
            }
            let Some(active) = self.runs.get(&key.run) else {
                self.ready_since.remove(&key);
                continue;
            };
            let Some(stage) = active.stages.get(key.idx as usize) else {
                continue;
            };
            if stage.state != StageState::Ready {
                // Cancelled or re-queued since it was queued.
                self.ready_since.remove(&key);
                continue;
            }
            let spec = active.spec.clone();
            let stage_spec = &spec.parsed.stages[key.idx as usize];
            let need = Need::of(stage_spec);
            let (name, reservation) = match self.pool.place(&stage_spec.agent_labels, &need) {
                Placement::At(name, reservation) => (name, reservation),
                Placement::Busy => {
                    waiting.push_back(key);
                    continue;
                }
                Placement::Nowhere(reason) => {
                    self.note_waiting(key, reason);
                    waiting.push_back(key);
                    continue;
                }
            };
            if !self.move_stage(key, StageState::Assigned) {
                continue;
            }
            let Some(stage) = self.stage_mut(key) else {
                continue;
            };
            stage.agent = Some(name.clone());
            stage.gpus = reservation.gpus.clone();
            if stage.message.starts_with(WAITING) {
                stage.message.clear();
            }
            let attempt = stage.attempt;
            let stage_spec = &spec.parsed.stages[key.idx as usize];
            let assign = pb::Assign {
                stage: Some(Self::assign_ref(key, attempt)),
                pipeline: spec.record.name.clone(),
                stage_name: stage_spec.name.clone(),
                commands: stage_spec.commands.clone(),
                env: self.runs[&key.run]
                    .record
                    .stage_env(stage_spec)
                    .into_iter()
                    .chain(endpoints(&spec.parsed, key.idx as usize))
                    .chain(self.traffic_env(key))
                    .collect(),
                timeout_ms: stage_spec.timeout.as_millis() as u64,
                source: Some(pb::Source {
                    repo: spec.record.repo.clone(),
                    commit: self.runs[&key.run].record.commit.clone(),
                    subdir: spec.record.subdir.clone(),
                    snapshot: self.runs[&key.run]
                        .record
                        .source_digest
                        .clone()
                        .unwrap_or_default(),
                }),
                image: self.image_for(key, stage_spec),
                docker: Some(docker_options(&stage_spec.container)),
                inputs: self
                    .inputs_of_stage(key)
                    .iter()
                    .map(|input| views::artifact(&input.stage, &input.artifact))
                    .chain(self.datasets_of(key))
                    .collect(),
                output_paths: output_paths(stage_spec),
                outputs_always: stage_spec.artifacts_always,
                secrets: Default::default(),
                gpus: reservation.gpus.clone(),
                services: stage_spec.services.iter().map(service).collect(),
                cache: stage_spec.cache.as_ref().map(|cache| pb::StageCache {
                    key: cache.key.as_str().to_owned(),
                    paths: cache.paths.clone(),
                    shared: cache.shared,
                }),
            };
            let secret_names = stage_spec.secrets.clone();
            self.pool.hold(
                &name,
                AttemptKey {
                    stage: key,
                    attempt,
                },
                reservation,
            );
            if let Some(since) = self.ready_since.remove(&key) {
                let pipeline = self
                    .runs
                    .get(&key.run)
                    .map_or("", |run| run.record.pipeline.as_str());
                self.metrics
                    .observe_dispatch_latency(pipeline, since.elapsed());
            }
            tracing::debug!(stage = %key, attempt, agent = %name, "assigned");
            self.save_stage(key);
            if let Some(active) = self.runs.get_mut(&key.run)
                && active.record.state == RunState::Queued
            {
                active.record.state = RunState::Running;
                self.save_run(key.run);
            }
            if secret_names.is_empty() {
                self.send_after_commit(&name, Out::Assign(assign));
            } else {
                // Opened off the loop; the Assign leaves with them.
                self.secrets_to_open.push(super::checks::SecretsToOpen {
                    agent: name,
                    key,
                    attempt,
                    names: secret_names,
                    assign,
                });
            }
        }
        waiting.append(&mut self.ready);
        self.ready = waiting;
    }
}

impl Engine {
    /// An assigned stage's secrets were opened (or could not be): its
    /// `Assign` goes out with them, or the stage fails before any agent
    /// sees it. Nothing happens if the attempt is no longer assigned there.
    pub(super) fn secrets_opened(
        &mut self,
        agent: &str,
        key: StageKey,
        attempt: u32,
        mut assign: pb::Assign,
        opened: Result<std::collections::BTreeMap<String, String>, String>,
    ) {
        let still_assigned = self.stage(key).is_some_and(|stage| {
            stage.attempt == attempt
                && stage.agent.as_deref() == Some(agent)
                && stage.state == StageState::Assigned
        });
        if !still_assigned {
            return;
        }
        match opened {
            Ok(values) => {
                // The values just opened also build the masker for this
                // stage's logs, so they are not decrypted a second time.
                if let Some(active) = self.runs.get_mut(&key.run) {
                    let masker = kiln_common::masking::Masker::new(values.values());
                    active
                        .maskers
                        .insert(key.idx, Ok(std::sync::Arc::new(masker)));
                }
                assign.secrets = values.into_iter().collect();
                self.send_after_commit(agent, Out::Assign(assign));
            }
            Err(problem) => {
                // It never reached the agent: the record says so.
                self.pool.release(
                    agent,
                    AttemptKey {
                        stage: key,
                        attempt,
                    },
                );
                if let Some(stage) = self.stage_mut(key) {
                    stage.agent = None;
                }
                self.settle_stage(key, StageState::Failed, None, problem);
            }
        }
    }

    /// The run's dataset snapshots, unpacked into every stage's workspace
    /// like artifacts (rollback runs re-deploy fixed inputs only).
    fn datasets_of(&self, key: StageKey) -> Vec<pb::Artifact> {
        let Some(active) = self.runs.get(&key.run) else {
            return Vec::new();
        };
        if active.record.rollback.is_some() || active.record.promote.is_some() {
            return Vec::new();
        }
        active
            .record
            .datasets
            .iter()
            .map(|dataset| pb::Artifact {
                path: dataset.path.clone(),
                digest: dataset.digest.clone(),
                size: 0,
                stage: "dataset".to_owned(),
            })
            .collect()
    }

    /// The values of a stage's secrets; the error says which is missing
    /// and never carries a value.
    pub(super) fn reveal_secrets(
        &self,
        names: &[String],
    ) -> Result<std::collections::BTreeMap<String, String>, String> {
        if names.is_empty() {
            return Ok(Default::default());
        }
        let Some(secrets) = &self.secrets else {
            return Err("this coordinator has no secrets store".to_owned());
        };
        secrets.reveal(names).map_err(|error| error.to_string())
    }

    /// Decides a ready stage that needs no agent: a gate is evaluated here,
    /// and an environment stage of a frozen environment fails. Returns
    /// whether `key` was handled (or is no longer ready).
    fn settle_agentless(&mut self, key: StageKey) -> bool {
        if !self
            .stage(key)
            .is_some_and(|stage| stage.state == StageState::Ready)
        {
            return false;
        }
        let Some(stage_spec) = self.stage_spec(key) else {
            return false;
        };
        let is_gate = stage_spec.gate.is_some();
        let frozen = stage_spec
            .environment
            .as_deref()
            .and_then(|env| self.frozen_reason(key.run, env));
        if is_gate {
            // Gates are the delivery controller's to decide.
            self.delivery_events
                .push(super::delivery::DeliveryEvent::GateReady(key));
            return true;
        }
        let rolling_out = stage_spec
            .environment
            .as_deref()
            .and_then(|env| self.rollout_blocks(key, env));
        if let Some(reason) = rolling_out {
            self.settle_stage(key, StageState::Failed, None, reason);
            return true;
        }
        if let Some(reason) = frozen {
            let message =
                format!("environment is frozen ({reason}); unfreeze it with `kiln env unfreeze`");
            self.settle_stage(key, StageState::Failed, None, message);
            return true;
        }
        false
    }
}

/// How the message of a stage that waits for a capable agent starts.
const WAITING: &str = "waiting for an agent";

impl Engine {
    /// Says on the stage why it waits (once: the record is written only
    /// when the reason changes).
    fn note_waiting(&mut self, key: StageKey, reason: String) {
        debug_assert!(reason.starts_with(WAITING));
        let Some(stage) = self.stage_mut(key) else {
            return;
        };
        if stage.message != reason {
            tracing::info!(stage = %key, %reason, "stage waits");
            stage.message = reason;
            self.save_stage(key);
        }
    }

    /// Books attempt `attempt` of `key` on agent `name` with what its stage
    /// holds there (after a hello, or a lost assignment re-sent).
    pub(super) fn hold_attempt(&mut self, name: &str, key: StageKey, attempt: u32) {
        let reservation = self.reservation_of(key);
        self.pool.hold(
            name,
            AttemptKey {
                stage: key,
                attempt,
            },
            reservation,
        );
    }

    /// What an attempt of `key` holds of its agent: its `resources:` and
    /// the GPU devices it was given.
    pub(super) fn reservation_of(&self, key: StageKey) -> Reservation {
        let need = self.stage_spec(key).map(Need::of).unwrap_or_default();
        Reservation {
            cpus: need.cpus,
            memory_bytes: need.memory_bytes,
            gpus: self
                .stage(key)
                .map(|stage| stage.gpus.clone())
                .unwrap_or_default(),
        }
    }

    /// The stage's image; a rollback re-deploys in the exact image the
    /// restored release recorded (by digest), whatever its tag says now,
    /// and a promote in the image of the release it promotes.
    fn image_for(&self, key: StageKey, stage: &spec::Stage) -> String {
        let restored = self
            .runs
            .get(&key.run)
            .and_then(|run| {
                let record = &run.record;
                let promoted = record.promote.as_ref().map(|plan| plan.from_release);
                record.rollback.as_ref().map(|plan| plan.to).or(promoted)
            })
            .and_then(|id| self.delivery.release(id))
            .and_then(|release| release.image_digest.clone());
        restored.or_else(|| stage.image.clone()).unwrap_or_default()
    }
}

/// The stage's artifacts, plus its metrics file, which travels as one.
fn output_paths(stage: &spec::Stage) -> Vec<String> {
    let mut paths = stage.artifacts.clone();
    if let Some(metrics) = &stage.metrics
        && !paths.contains(metrics)
    {
        paths.push(metrics.clone());
    }
    paths
}

fn service(service: &spec::Service) -> pb::StageService {
    pb::StageService {
        name: service.name.clone(),
        image: service.image.clone(),
        env: service.env.clone().into_iter().collect(),
        command: service.command.clone(),
        health: service.health.clone().unwrap_or_default(),
        health_timeout_ms: service.health_timeout.as_millis() as u64,
    }
}

fn docker_options(container: &spec::ContainerSettings) -> pb::DockerOptions {
    pb::DockerOptions {
        pull: match container.pull {
            spec::PullPolicy::IfMissing => "if-missing",
            spec::PullPolicy::Always => "always",
            spec::PullPolicy::Never => "never",
        }
        .to_owned(),
        memory_bytes: container.memory_bytes.unwrap_or_default(),
        cpus: container.cpus.unwrap_or_default(),
        pids: container.pids.unwrap_or_default(),
        network: match container.network {
            spec::NetworkMode::None => "none",
            spec::NetworkMode::Bridge => "bridge",
        }
        .to_owned(),
    }
}

/// Where the releases a stage deals with are served: an environment stage
/// gets its own `endpoint:` as `KILN_ENDPOINT`; a stage that needs
/// environment stages gets each one's as `KILN_ENDPOINT_<ENVIRONMENT>`
/// (upper case, `-` as `_`), and as `KILN_ENDPOINT` when there is one, so
/// an acceptance stage can ask the model its run just deployed.
fn endpoints(spec: &spec::Pipeline, idx: usize) -> Vec<(String, String)> {
    let stage = &spec.stages[idx];
    if let Some(own) = &stage.endpoint {
        return vec![("KILN_ENDPOINT".to_owned(), own.clone())];
    }
    let needed: Vec<(&str, &str)> = stage
        .needs
        .iter()
        .filter_map(|&need| {
            let need = &spec.stages[need];
            Some((need.environment.as_deref()?, need.endpoint.as_deref()?))
        })
        .collect();
    let mut env: Vec<(String, String)> = needed
        .iter()
        .map(|(environment, url)| {
            let name = environment.to_ascii_uppercase().replace('-', "_");
            (format!("KILN_ENDPOINT_{name}"), (*url).to_owned())
        })
        .collect();
    if let [(_, url)] = needed.as_slice() {
        env.push(("KILN_ENDPOINT".to_owned(), (*url).to_owned()));
    }
    env
}
