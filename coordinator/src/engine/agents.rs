//! Agents and the run book: what the pool's connections, leases and
//! messages mean for stage attempts (fencing, completion, loss).
//!
//! An agent holds a lease that every message renews ([`super::pool`]).
//! When it lapses the agent's stages are re-queued as new attempts (or
//! failed with "agent lost" when no retries are left).
//! **Architecture Invariant:** a message about a stage attempt is accepted
//! only from the agent that holds that exact attempt; anything else is
//! rejected, and a repeated completion of the same attempt is acknowledged
//! again without changing anything.

use std::collections::BTreeSet;

use kiln_common::ids::{AttemptKey, StageKey};
use kiln_proto::v1 as pb;
use pb::agent_message::Msg;
use pb::coordinator_message::Msg as Out;

use super::Engine;
use super::checks::{Checked, OutputCheck};
use super::pool::{AgentTx, ConnId};
use super::runs::Cause;
use crate::error::ApiError;
use crate::store::{ArtifactRecord, StageState};

fn stage_ref(key: StageKey, attempt: u32) -> pb::StageRef {
    AttemptKey {
        stage: key,
        attempt,
    }
    .into()
}

/// Whether a message about an attempt comes from its rightful holder.
enum Fence {
    /// The attempt is current and this agent holds it.
    Current,
    /// Same attempt and agent, but the stage already ended (e.g. cancelled,
    /// or a repeated completion).
    Settled,
    /// Not this agent's attempt (anymore).
    Stale(String),
}

impl Engine {
    fn fence(&self, agent: &str, key: StageKey, attempt: u32) -> Fence {
        // A run that finished lately is still among the retired, so a
        // repeated completion of its last attempt is acknowledged again.
        let stage = self.stage(key).or_else(|| {
            self.retired
                .get(&key.run)
                .and_then(|run| run.stages.get(key.idx as usize))
        });
        let Some(stage) = stage else {
            // Long finished (or never existed): nothing to do for the agent
            // but to drop it.
            return Fence::Stale(format!("stage {key} is not part of an unfinished run"));
        };
        if stage.attempt != attempt || stage.agent.as_deref() != Some(agent) {
            return Fence::Stale(format!(
                "stale attempt {attempt} of stage {key}: it is now attempt {} on {}",
                stage.attempt,
                stage.agent.as_deref().unwrap_or("no agent")
            ));
        }
        // A `rolling_out` stage's attempt is over too: a repeated
        // completion must not settle it again.
        if stage.state.attempt_over() {
            Fence::Settled
        } else {
            Fence::Current
        }
    }

    /// After a restart, stages recorded as on an agent wait one lease for
    /// that agent to come back and claim them.
    pub(super) fn expect_agent(&mut self, name: &str, key: StageKey, now: u64) {
        let attempt = self.stage(key).map_or(0, |stage| stage.attempt);
        let reservation = self.reservation_of(key);
        self.pool.expect(
            name,
            AttemptKey {
                stage: key,
                attempt,
            },
            reservation,
            now,
        );
    }

    pub(super) fn agent_hello(&mut self, hello: pb::Hello, conn: ConnId, tx: AgentTx) {
        let now = self.clock.now_ms();
        let name = hello.name.clone();
        tracing::info!(agent = %name, capacity = hello.capacity, held = hello.held.len(), "agent connected");
        let before = self.pool.connect(&hello, conn, tx, now);
        let mut welcome = pb::Welcome {
            heartbeat_ms: self.config.heartbeat_interval.as_millis() as u32,
            resume: Vec::new(),
            drop: Vec::new(),
        };
        for held in &hello.held {
            let AttemptKey {
                stage: key,
                attempt,
            } = AttemptKey::from(held);
            match self.fence(&name, key, attempt) {
                Fence::Current => {
                    let next_log_seq = self.stage(key).map_or(0, |stage| stage.next_log_seq);
                    self.hold_attempt(&name, key, attempt);
                    welcome.resume.push(pb::ResumeStage {
                        stage: Some(*held),
                        next_log_seq,
                    });
                }
                Fence::Settled | Fence::Stale(_) => welcome.drop.push(*held),
            }
        }
        // What the agent held before but no longer mentions is lost.
        let kept: BTreeSet<AttemptKey> = self.pool.holds(&name);
        let lost: Vec<AttemptKey> = before.difference(&kept).copied().collect();
        for AttemptKey {
            stage: key,
            attempt,
        } in lost
        {
            self.hold_attempt(&name, key, attempt);
            // An assignment that never started may simply not have arrived;
            // re-sending it costs the stage no retry.
            let started = self
                .stage(key)
                .is_some_and(|stage| stage.state == StageState::Running);
            self.lose_stage(&name, key, attempt, "agent restarted without it", started);
        }
        self.send_after_commit(&name, Out::Welcome(welcome));
    }

    pub(super) fn agent_message(&mut self, name: &str, conn: ConnId, msg: Msg) {
        let now = self.clock.now_ms();
        if !self.pool.renew(name, conn, now) {
            // A message from a connection that was replaced or expired.
            return;
        }
        match msg {
            Msg::Hello(_) => {
                tracing::warn!(agent = name, "ignoring a second hello on one stream");
            }
            Msg::Heartbeat(_) => {}
            Msg::Draining(_) => {
                tracing::info!(agent = name, "agent is draining");
                self.pool.drain(name);
            }
            Msg::Started(started) => {
                let Some(stage_ref) = started.stage else {
                    return;
                };
                let AttemptKey {
                    stage: key,
                    attempt,
                } = AttemptKey::from(&stage_ref);
                let assigned = self
                    .stage(key)
                    .is_some_and(|stage| stage.state == StageState::Assigned);
                if let Fence::Current = self.fence(name, key, attempt)
                    && assigned
                    && self.move_stage(key, StageState::Running)
                    && let Some(stage) = self.stage_mut(key)
                {
                    stage.started_ms = Some(now);
                }
            }
            Msg::Logs(batch) => self.store_logs(name, batch),
            Msg::Finished(finished) => self.stage_finished(name, finished),
        }
    }

    fn stage_finished(&mut self, name: &str, finished: pb::StageFinished) {
        let Some(stage_ref) = finished.stage else {
            return;
        };
        let AttemptKey {
            stage: key,
            attempt,
        } = AttemptKey::from(&stage_ref);
        if let Fence::Current = self.fence(name, key, attempt) {
            if self.checking.contains(&AttemptKey {
                stage: key,
                attempt,
            }) {
                // A repeat while its check is in flight: that check answers.
                return;
            }
            let succeeded = finished.outcome == pb::Outcome::Succeeded as i32;
            let metrics_path = self
                .stage_spec(key)
                .and_then(|stage| stage.metrics.clone())
                .filter(|_| succeeded);
            if finished.outputs.is_empty() && metrics_path.is_none() {
                self.complete(name, finished, Checked::nothing());
            } else {
                self.checking.insert(AttemptKey {
                    stage: key,
                    attempt,
                });
                self.checks.push(OutputCheck {
                    agent: name.to_owned(),
                    finished,
                    metrics_path,
                });
            }
            return;
        }
        self.complete(name, finished, Checked::nothing());
    }

    /// The blob store answered a completion's check.
    pub(super) fn outputs_checked(
        &mut self,
        name: &str,
        finished: pb::StageFinished,
        checked: Checked,
    ) {
        if let Some(stage_ref) = finished.stage {
            self.checking.remove(&AttemptKey::from(&stage_ref));
        }
        self.complete(name, finished, checked);
    }

    /// Settles a completion (fenced again: the attempt may have been lost
    /// while its outputs were checked) and acknowledges it.
    fn complete(&mut self, name: &str, finished: pb::StageFinished, checked: Checked) {
        let Some(stage_ref) = finished.stage else {
            return;
        };
        let AttemptKey {
            stage: key,
            attempt,
        } = AttemptKey::from(&stage_ref);
        let ack = match self.fence(name, key, attempt) {
            Fence::Stale(reason) => {
                tracing::warn!(agent = name, "rejected completion: {reason}");
                pb::Ack {
                    stage: Some(stage_ref),
                    rejected: true,
                    reason,
                    ..Default::default()
                }
            }
            Fence::Settled => pb::Ack {
                stage: Some(stage_ref),
                finished: true,
                ..Default::default()
            },
            Fence::Current => {
                if !finished.image_digest.is_empty()
                    && let Some(stage) = self.stage_mut(key)
                {
                    stage.image_digest = Some(finished.image_digest.clone());
                }
                let outcome = pb::Outcome::try_from(finished.outcome).unwrap_or_default();
                let mut message = match self.masker(key) {
                    Ok(masker) => masker.mask(&finished.message).into_owned(),
                    Err(problem) => {
                        self.fail_unmaskable(name, stage_ref, key, problem);
                        return;
                    }
                };
                let recorded = checked
                    .outputs
                    .and_then(|records| self.record_outputs(key, records))
                    .and_then(|()| {
                        let metrics = checked.metrics?;
                        if let Some(stage) = self.stage_mut(key) {
                            stage.metrics = metrics;
                        }
                        Ok(())
                    });
                let outcome = match recorded {
                    Ok(()) => outcome,
                    Err(problem) => {
                        message = problem;
                        if outcome == pb::Outcome::Succeeded {
                            pb::Outcome::Failed
                        } else {
                            outcome
                        }
                    }
                };
                let exit = Some(finished.exit_code);
                match outcome {
                    pb::Outcome::Succeeded => {
                        self.settle_stage(key, StageState::Succeeded, exit, message)
                    }
                    pb::Outcome::Failed => {
                        let message = if message.is_empty() {
                            format!("exited with code {}", finished.exit_code)
                        } else {
                            message
                        };
                        self.requeue(key, Some(Cause::Failed), exit, &message)
                    }
                    pb::Outcome::TimedOut => {
                        self.requeue(key, Some(Cause::Timeout), exit, &message)
                    }
                    pb::Outcome::Cancelled => {
                        self.settle_stage(key, StageState::Cancelled, exit, message)
                    }
                    pb::Outcome::HandedBack => {
                        self.requeue(key, None, None, &format!("handed back by {name}"))
                    }
                    pb::Outcome::InfraError | pb::Outcome::Unspecified => self.requeue(
                        key,
                        Some(Cause::InfraError),
                        None,
                        &format!("infrastructure error on {name}: {message}"),
                    ),
                }
                pb::Ack {
                    stage: Some(stage_ref),
                    finished: true,
                    ..Default::default()
                }
            }
        };
        self.pool.release(
            name,
            AttemptKey {
                stage: key,
                attempt,
            },
        );
        self.send_after_commit(name, Out::Ack(ack));
    }

    /// Records a stage's checked outputs, within the run's size limit
    /// (decided here, in memory, so two checks of one run cannot both
    /// pass a limit only one fits).
    fn record_outputs(
        &mut self,
        key: StageKey,
        records: Vec<ArtifactRecord>,
    ) -> Result<(), String> {
        let limit = self.config.max_run_artifact_bytes;
        let run_total: u64 = self
            .runs
            .get(&key.run)
            .map(|run| {
                run.stages
                    .iter()
                    .flat_map(|stage| &stage.outputs)
                    .map(|output| output.size)
                    .sum()
            })
            .unwrap_or_default();
        let added: u64 = records.iter().map(|record| record.size).sum();
        if run_total + added > limit {
            return Err(format!(
                "the run's artifacts would take {} bytes, over the per-run limit of {limit} bytes; upload less or raise --max-run-artifact-bytes",
                run_total + added
            ));
        }
        if let Some(stage) = self.stage_mut(key) {
            stage.outputs = records;
        }
        Ok(())
    }

    pub(super) fn agent_gone(&mut self, name: &str, conn: ConnId) {
        if self.pool.disconnect(name, conn) {
            tracing::info!(
                agent = name,
                "agent disconnected; its lease keeps its stages for now"
            );
        }
    }

    pub(super) fn expire_leases(&mut self) {
        let now = self.clock.now_ms();
        for (name, held) in self.pool.expire(now) {
            for AttemptKey {
                stage: key,
                attempt,
            } in held
            {
                self.lose_stage(&name, key, attempt, &format!("agent {name} lost"), true);
            }
        }
    }

    /// The attempt is gone with its agent: re-queue or fail the stage.
    fn lose_stage(&mut self, name: &str, key: StageKey, attempt: u32, why: &str, charge: bool) {
        self.pool.release(
            name,
            AttemptKey {
                stage: key,
                attempt,
            },
        );
        if let Fence::Current = self.fence(name, key, attempt) {
            self.requeue(key, charge.then_some(Cause::AgentLost), None, why);
        }
    }

    pub(super) fn drain_agent(&mut self, name: &str) -> Result<pb::Agent, ApiError> {
        let agent = self
            .pool
            .drain(name)
            .ok_or_else(|| ApiError::NotFound(format!("no agent named `{name}` has connected")))?;
        tracing::info!(agent = name, "agent drained by user");
        Ok(agent)
    }

    pub(super) fn send_cancel(&mut self, name: &str, key: StageKey, attempt: u32, reason: &str) {
        let msg = Out::Cancel(pb::Cancel {
            stage: Some(stage_ref(key, attempt)),
            reason: reason.to_owned(),
        });
        self.send_after_commit(name, msg);
    }

    /// Sends to the agent's current connection once the pending group is
    /// durable.
    pub(super) fn send_after_commit(&mut self, name: &str, msg: Out) {
        let Some(tx) = self.pool.sender(name) else {
            return;
        };
        self.after_commit(move || {
            tx.send(msg);
        });
    }

    pub(super) fn assign_ref(key: StageKey, attempt: u32) -> pb::StageRef {
        stage_ref(key, attempt)
    }
}
