//! Log lines: stored with their stage, acknowledged once durable, pushed to
//! followers.
//!
//! Each attempt numbers its lines from 0. A batch may repeat lines the
//! coordinator already stored (the agent re-sends after a reconnect); those
//! are dropped by sequence number, so no line is stored twice. A batch that
//! starts above the next expected line would leave a gap: it is refused
//! with an ack that makes the agent re-send from the right place. Storage
//! is capped per attempt so a chatty stage cannot grow the database without
//! bound: past the cap a single marker line is kept and the rest counted.
//!
//! **Architecture Invariant:** no line is stored unmasked. A stage whose
//! secrets cannot be opened to build its masker fails, and its lines are
//! dropped.

use std::sync::Arc;

use kiln_common::ids::{AttemptKey, RunId, StageKey};
use kiln_common::loglines;
use kiln_common::masking::Masker;
use kiln_proto::v1 as pb;
use pb::coordinator_message::Msg as Out;

use super::Engine;
use crate::error::ApiError;
use crate::read::{Followed, Follower, StagePlan, Tap};
use crate::store::{LogLine, LogStream, Op, StageState, StoredLog};
use crate::views;

/// Lines stored per stage attempt.
pub(crate) const MAX_LINES_PER_ATTEMPT: u64 = 100_000;
/// Log text kept per stage attempt; the rest is dropped after a marker.
pub(crate) const MAX_LOG_BYTES_PER_ATTEMPT: u64 = 64 << 20;

impl Engine {
    pub(super) fn store_logs(&mut self, agent: &str, batch: pb::LogBatch) {
        let Some(stage_ref) = batch.stage else {
            return;
        };
        let key = StageKey {
            run: RunId(stage_ref.run_id),
            idx: stage_ref.stage_idx,
        };
        let current = self.stage(key).is_some_and(|stage| {
            stage.attempt == stage_ref.attempt && stage.agent.as_deref() == Some(agent)
        });
        if !current {
            let reason = format!(
                "logs for stage {key} attempt {} are not accepted from {agent}",
                stage_ref.attempt
            );
            self.reject(agent, stage_ref, reason);
            return;
        }
        let expected = self.stage(key).map_or(0, |stage| stage.next_log_seq);
        if batch.first_seq > expected {
            tracing::warn!(stage = %key, agent, first_seq = batch.first_seq, expected, "log batch would leave a gap; asking for the missing lines");
            let ack = pb::Ack {
                stage: Some(stage_ref),
                next_log_seq: expected,
                resend: true,
                ..Default::default()
            };
            self.send_after_commit(agent, Out::Ack(ack));
            return;
        }
        let masker = match self.masker(key) {
            Ok(masker) => masker,
            Err(problem) => {
                self.fail_unmaskable(agent, stage_ref, key, problem);
                return;
            }
        };
        let Some(stage) = self.stage_mut(key) else {
            return;
        };
        let mut stored = Vec::new();
        for (offset, line) in batch.lines.into_iter().enumerate() {
            let seq = batch.first_seq + offset as u64;
            if seq < stage.next_log_seq {
                continue;
            }
            stage.next_log_seq = seq + 1;
            // The agent masks already; this catches an agent that does not.
            let text = loglines::truncate_line(masker.mask(&line.text).into_owned());
            let fits = seq < MAX_LINES_PER_ATTEMPT
                && stage.log_bytes + text.len() as u64 <= MAX_LOG_BYTES_PER_ATTEMPT;
            let line = if fits && !stage.log_truncated {
                stage.log_bytes += text.len() as u64;
                LogLine {
                    stream: from_pb_stream(line.stream),
                    text,
                    at_ms: line.at_ms,
                }
            } else if !stage.log_truncated {
                stage.log_truncated = true;
                LogLine {
                    stream: LogStream::System,
                    text: format!(
                        "kiln: log truncated at {} lines and {} bytes (limits {MAX_LINES_PER_ATTEMPT} lines, {MAX_LOG_BYTES_PER_ATTEMPT} bytes); the stage keeps running",
                        seq, stage.log_bytes
                    ),
                    at_ms: line.at_ms,
                }
            } else {
                continue;
            };
            stored.push(StoredLog {
                key,
                attempt: stage_ref.attempt,
                seq,
                line,
            });
        }
        let next_log_seq = stage.next_log_seq;
        let name = stage.name.clone();
        // The new `next_log_seq` is written with the lines, atomically, and
        // readers learn it once it is durable.
        self.save_stage(key);
        let taps = self.live_taps(key);
        for log in &stored {
            self.write(Op::Log(log.clone()));
        }
        if !taps.is_empty() && !stored.is_empty() {
            self.after_commit(move || feed(&taps, &name, &stored));
        }
        let ack = pb::Ack {
            stage: Some(stage_ref),
            next_log_seq,
            ..Default::default()
        };
        self.send_after_commit(agent, Out::Ack(ack));
    }

    /// Refuses a batch: the agent stops the attempt and forgets it, without
    /// a completion, so its slot (and resources) are free again here too.
    /// Without this a run cancelled (and retired) while its stage printed
    /// left the attempt held on the agent forever.
    fn reject(&mut self, agent: &str, stage_ref: pb::StageRef, reason: String) {
        self.pool.release(agent, AttemptKey::from(&stage_ref));
        let ack = pb::Ack {
            stage: Some(stage_ref),
            rejected: true,
            reason,
            ..Default::default()
        };
        self.send_after_commit(agent, Out::Ack(ack));
    }

    /// The stage's secrets cannot be opened, so its lines cannot be masked:
    /// none is stored, the stage fails and the agent stops it.
    pub(super) fn fail_unmaskable(
        &mut self,
        agent: &str,
        stage_ref: pb::StageRef,
        key: StageKey,
        problem: String,
    ) {
        let message = format!(
            "{problem}; the stage was stopped and its log lines dropped, because they could not be masked"
        );
        tracing::error!(stage = %key, agent, "{message}");
        self.send_cancel(agent, key, stage_ref.attempt, &message);
        self.pool.release(agent, AttemptKey::from(&stage_ref));
        self.settle_stage(key, StageState::Failed, None, message.clone());
        self.reject(agent, stage_ref, message);
    }

    /// The masker of a stage's secrets. Built when its secrets were opened
    /// (off the loop, for its `Assign`; or at start-up for a stage recovered
    /// on an agent), never here. Fails closed: a stage that lists secrets
    /// and has no masker gets an error naming why.
    pub(super) fn masker(&mut self, key: StageKey) -> Result<Arc<Masker>, String> {
        let Some(run) = self.runs.get(&key.run) else {
            return Err(format!("stage {key} is not part of an unfinished run"));
        };
        if let Some(masker) = run.maskers.get(&key.idx) {
            return masker.clone();
        }
        let lists_secrets = run
            .spec
            .parsed
            .stages
            .get(key.idx as usize)
            .is_some_and(|stage| !stage.secrets.is_empty());
        if lists_secrets {
            return Err(format!(
                "the secrets of stage {key} were never opened on this coordinator"
            ));
        }
        let masker = Arc::new(Masker::new(std::iter::empty::<&String>()));
        if let Some(run) = self.runs.get_mut(&key.run) {
            run.maskers.insert(key.idx, Ok(masker.clone()));
        }
        Ok(masker)
    }

    /// The taps that want this stage's lines; drops followers whose client
    /// went away or who fell behind.
    fn live_taps(&mut self, key: StageKey) -> Vec<Tap> {
        let Some(run) = self.runs.get_mut(&key.run) else {
            return Vec::new();
        };
        run.followers
            .retain(|follower| !follower.tap.tx.is_closed() && !follower.tap.lag.is_behind());
        run.followers
            .iter()
            .filter(|follower| follower.stage.is_none_or(|idx| idx == key.idx))
            .map(|follower| Tap {
                tx: follower.tap.tx.clone(),
                lag: follower.tap.lag.clone(),
            })
            .collect()
    }

    /// Ends the follow streams of one stage (after its last line is out).
    pub(super) fn end_followers(&mut self, key: StageKey) {
        let Some(run) = self.runs.get_mut(&key.run) else {
            return;
        };
        let (ended, kept) = std::mem::take(&mut run.followers)
            .into_iter()
            .partition(|follower| follower.stage == Some(key.idx));
        run.followers = kept;
        let ended: Vec<Follower> = ended;
        if !ended.is_empty() {
            self.after_commit(move || drop(ended));
        }
    }

    /// Registers a live tap on an unfinished run; the answer (after the
    /// commit) says where each stage's durable lines end.
    pub(super) fn follow_logs(
        &mut self,
        run: RunId,
        stage: Option<String>,
        tap: Tap,
    ) -> Result<Option<Followed>, ApiError> {
        let Some(active) = self.runs.get_mut(&run) else {
            return Ok(None);
        };
        let plans: Vec<StagePlan> = active
            .stages
            .iter()
            .map(|record| StagePlan {
                key: record.key,
                name: record.name.clone(),
                attempt: record.attempt,
                below: record.next_log_seq,
            })
            .collect();
        let plans = crate::read::select_stage(run, plans, stage.as_deref())?;
        let live = plans
            .iter()
            .any(|plan| !active.stages[plan.key.idx as usize].state.attempt_over());
        if live {
            let idx = stage.as_ref().and(plans.first().map(|plan| plan.key.idx));
            active.followers.push(Follower { stage: idx, tap });
        }
        Ok(Some(Followed { plans, live }))
    }
}

/// Hands durable lines to the taps that follow them; a full tap marks its
/// follower as fallen behind instead of waiting (runs on the commit thread,
/// which never blocks on a reader).
fn feed(taps: &[Tap], name: &str, stored: &[StoredLog]) {
    for tap in taps {
        if tap.lag.is_behind() {
            continue;
        }
        for log in stored {
            match tap.tx.try_send(views::log_entry(name, log)) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    tap.lag.mark();
                    break;
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    }
}

fn from_pb_stream(stream: i32) -> LogStream {
    match pb::LogStream::try_from(stream) {
        Ok(pb::LogStream::Stderr) => LogStream::Stderr,
        Ok(pb::LogStream::System) => LogStream::System,
        _ => LogStream::Stdout,
    }
}
