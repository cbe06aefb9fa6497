//! Log lines: stored with their stage, acknowledged once durable, pushed to
//! followers.
//!
//! Each attempt numbers its lines from 0. A batch may repeat lines the
//! coordinator already stored (the agent re-sends after a reconnect); those
//! are dropped by sequence number, so no line is stored twice. Storage is
//! capped per attempt so a chatty stage cannot grow the database without
//! bound: past the cap a single marker line is kept and the rest counted.

use std::sync::Arc;

use kiln_common::ids::{RunId, StageKey};
use kiln_common::masking::Masker;
use kiln_proto::v1 as pb;
use pb::coordinator_message::Msg as Out;

use super::{Engine, LogTx, Reply};
use crate::error::ApiError;
use crate::store::{LogLine, LogStream, Op, StageRecord, Store, StoredLog};
use crate::views;

/// Lines stored per stage attempt.
pub(crate) const MAX_LINES_PER_ATTEMPT: u64 = 100_000;
/// Bytes kept of one line.
const MAX_LINE_BYTES: usize = 16 * 1024;
/// Log text kept per stage attempt; the rest is dropped after a marker.
pub(crate) const MAX_LOG_BYTES_PER_ATTEMPT: u64 = 64 << 20;

/// A `StreamLogs --follow` client.
pub(super) struct Follower {
    /// `None` follows every stage of the run.
    stage: Option<u32>,
    tx: LogTx,
}

/// What a backfill reads: a stage up to (excluding) `bound` in its current
/// attempt. Lines from `bound` on reach followers live.
struct Backfill {
    key: StageKey,
    name: String,
    attempt: u32,
    bound: u64,
}

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
            let ack = pb::Ack {
                stage: Some(stage_ref),
                rejected: true,
                reason,
                ..Default::default()
            };
            self.send_after_commit(agent, Out::Ack(ack));
            return;
        }
        let masker = self.masker(key);
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
            let text = truncate(masker.mask(&line.text).into_owned());
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
        // The new `next_log_seq` is written with the lines, atomically.
        self.dirty.stages.insert(key);
        let targets = self.follower_txs(key);
        for log in &stored {
            self.write(Op::Log(log.clone()));
        }
        if !targets.is_empty() && !stored.is_empty() {
            self.after_commit(move |_| {
                for log in stored {
                    let entry = views::log_entry(&name, &log);
                    for tx in &targets {
                        let _ = tx.send(Ok(entry.clone()));
                    }
                }
            });
        }
        let ack = pb::Ack {
            stage: Some(stage_ref),
            next_log_seq,
            ..Default::default()
        };
        self.send_after_commit(agent, Out::Ack(ack));
    }

    /// The masker of a stage's secrets, built on first use (after a
    /// restart the values are read again from the secrets store).
    pub(super) fn masker(&mut self, key: StageKey) -> Arc<Masker> {
        if let Some(masker) = self
            .runs
            .get(&key.run)
            .and_then(|run| run.maskers.get(&key.idx))
        {
            return masker.clone();
        }
        let names = self
            .runs
            .get(&key.run)
            .and_then(|run| run.spec.parsed.stages.get(key.idx as usize))
            .map(|stage| stage.secrets.clone())
            .unwrap_or_default();
        let values = match (&self.secrets, names.is_empty()) {
            (_, true) | (None, _) => Default::default(),
            (Some(secrets), false) => secrets.reveal(&names).unwrap_or_default(),
        };
        let masker = Arc::new(Masker::new(values.values()));
        if let Some(run) = self.runs.get_mut(&key.run) {
            run.maskers.insert(key.idx, masker.clone());
        }
        masker
    }

    fn follower_txs(&self, key: StageKey) -> Vec<LogTx> {
        self.runs.get(&key.run).map_or_else(Vec::new, |run| {
            run.followers
                .iter()
                .filter(|follower| follower.stage.is_none_or(|idx| idx == key.idx))
                .map(|follower| follower.tx.clone())
                .collect()
        })
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
            self.after_commit(move |_| drop(ended));
        }
    }

    pub(super) fn logs(
        &mut self,
        run: RunId,
        stage: Option<String>,
        follow: bool,
        tx: LogTx,
        reply: Reply<()>,
    ) {
        let Some(active) = self.runs.get_mut(&run) else {
            // A finished run: everything is in the store by the time the
            // effect runs.
            self.after_commit(move |store| {
                let result = finished_backfill(store, run, stage.as_deref(), &tx);
                let _ = reply.send(result);
            });
            return;
        };
        let wanted: Vec<&StageRecord> = match &stage {
            Some(name) => match active.stages.iter().find(|s| &s.name == name) {
                Some(found) => vec![found],
                None => {
                    let error = ApiError::NotFound(format!("run {run} has no stage `{name}`"));
                    self.reply(reply, Err(error));
                    return;
                }
            },
            None => active.stages.iter().collect(),
        };
        let backfills: Vec<Backfill> = wanted
            .iter()
            .map(|stage| Backfill {
                key: stage.key,
                name: stage.name.clone(),
                attempt: stage.attempt,
                bound: stage.next_log_seq,
            })
            .collect();
        let still_running = wanted.iter().any(|stage| !stage.state.is_terminal());
        if follow && still_running {
            let idx = stage.as_ref().and(wanted.first().map(|s| s.key.idx));
            active.followers.push(Follower {
                stage: idx,
                tx: tx.clone(),
            });
        }
        self.after_commit(move |store| {
            let result = backfills.iter().try_for_each(|backfill| {
                send_stored(
                    store,
                    &backfill.name,
                    backfill.key,
                    backfill.attempt,
                    backfill.bound,
                    &tx,
                )
            });
            let _ = reply.send(result.map_err(ApiError::from));
        });
    }
}

fn finished_backfill(
    store: &dyn Store,
    run: RunId,
    stage: Option<&str>,
    tx: &LogTx,
) -> Result<(), ApiError> {
    store
        .run(run)?
        .ok_or_else(|| ApiError::NotFound(format!("run {run} does not exist")))?;
    let stages = store.stages(run)?;
    if let Some(name) = stage
        && !stages.iter().any(|s| s.name == name)
    {
        return Err(ApiError::NotFound(format!(
            "run {run} has no stage `{name}`"
        )));
    }
    for record in stages
        .iter()
        .filter(|s| stage.is_none_or(|name| s.name == name))
    {
        send_stored(
            store,
            &record.name,
            record.key,
            record.attempt,
            u64::MAX,
            tx,
        )?;
    }
    Ok(())
}

/// Sends every stored line of every attempt up to `attempt`, the last one
/// only below `bound`.
fn send_stored(
    store: &dyn Store,
    name: &str,
    key: StageKey,
    attempt: u32,
    bound: u64,
    tx: &LogTx,
) -> Result<(), crate::store::StoreError> {
    for number in 1..=attempt {
        for log in store.logs(key, number, 0)? {
            if number == attempt && log.seq >= bound {
                break;
            }
            let _ = tx.send(Ok(views::log_entry(name, &log)));
        }
    }
    Ok(())
}

fn from_pb_stream(stream: i32) -> LogStream {
    match pb::LogStream::try_from(stream) {
        Ok(pb::LogStream::Stderr) => LogStream::Stderr,
        Ok(pb::LogStream::System) => LogStream::System,
        _ => LogStream::Stdout,
    }
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_LINE_BYTES {
        let mut cut = MAX_LINE_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(" [kiln: line truncated]");
    }
    text
}
