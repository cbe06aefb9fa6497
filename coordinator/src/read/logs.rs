//! `StreamLogs`: stored lines in bounded pages from the blocking pool, then
//! (when following) live lines from the engine.
//!
//! Memory is bounded everywhere: a page holds at most [`PAGE_LINES`] lines,
//! the stream to the client at most [`OUT_LINES`] entries (a slow client
//! only slows its own task), and the live tap at most
//! [`LIVE_LINES_PER_FOLLOWER`]. A follower whose tap overflows is dropped:
//! the committer never waits for it, and its stream ends with `ABORTED`
//! and a message saying where to resume — the CLI resumes by itself with
//! the cursors of [`pb::StreamLogsRequest::resume`], so no line is missed
//! or sent twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kiln_common::ids::{RunId, StageKey};
use kiln_proto::v1 as pb;
use tokio::sync::{Notify, mpsc, oneshot};
use tonic::Status;

use super::Reader;
use crate::engine::Event;
use crate::error::ApiError;
use crate::views;

/// Live lines buffered for one follower before it counts as fallen behind.
pub(crate) const LIVE_LINES_PER_FOLLOWER: usize = 4096;
/// Lines read from the store at a time.
const PAGE_LINES: usize = 1000;
/// Entries buffered towards one client.
const OUT_LINES: usize = 256;

/// What a client asked for.
pub(crate) struct LogRequest {
    pub(crate) run: RunId,
    pub(crate) stage: Option<String>,
    pub(crate) follow: bool,
    pub(crate) resume: Vec<pb::LogCursor>,
}

/// One stage to send: every attempt up to `attempt`, the last one below
/// `below` (lines from `below` on come live, or do not exist yet).
#[derive(Clone, Debug)]
pub(crate) struct StagePlan {
    pub(crate) key: StageKey,
    pub(crate) name: String,
    pub(crate) attempt: u32,
    pub(crate) below: u64,
}

/// Set by the committer's effect when a follower's tap is full.
#[derive(Default)]
pub(crate) struct Lag {
    behind: AtomicBool,
    notify: Notify,
}

impl Lag {
    pub(crate) fn mark(&self) {
        self.behind.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    pub(crate) fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Acquire)
    }
}

/// The engine's half of a follower.
pub(crate) struct Tap {
    pub(crate) tx: mpsc::Sender<pb::LogEntry>,
    pub(crate) lag: Arc<Lag>,
}

/// A `StreamLogs --follow` client, as the engine keeps it.
pub(crate) struct Follower {
    /// `None` follows every stage of the run.
    pub(crate) stage: Option<u32>,
    pub(crate) tap: Tap,
}

/// What the engine answers a follow request with: the plan of an unfinished
/// run, and whether it keeps the tap (some wanted stage is still running).
pub(crate) struct Followed {
    pub(crate) plans: Vec<StagePlan>,
    pub(crate) live: bool,
}

type Out = mpsc::Sender<Result<pb::LogEntry, Status>>;

/// Starts streaming the lines `request` asks for.
pub(crate) async fn stream_logs(
    reader: &Reader,
    events: &mpsc::Sender<Event>,
    request: LogRequest,
) -> Result<mpsc::Receiver<Result<pb::LogEntry, Status>>, ApiError> {
    let (live_tx, live_rx) = mpsc::channel(LIVE_LINES_PER_FOLLOWER);
    let lag = Arc::new(Lag::default());
    let mut tap = None;
    let mut plans = None;
    if request.follow {
        let (reply, answer) = oneshot::channel();
        let event = Event::FollowLogs {
            run: request.run,
            stage: request.stage.clone(),
            tap: Tap {
                tx: live_tx,
                lag: lag.clone(),
            },
            reply,
        };
        events
            .send(event)
            .await
            .map_err(|_| ApiError::ShuttingDown)?;
        // Answered after a commit: every line below each plan's bound is
        // durable by now.
        if let Some(followed) = answer.await.map_err(|_| ApiError::ShuttingDown)?? {
            if followed.live {
                tap = Some((live_rx, lag));
            }
            plans = Some(followed.plans);
        }
    }
    let plans = match plans {
        Some(plans) => plans,
        None => reader.log_plan(request.run, request.stage.clone()).await?,
    };
    let (out, receiver) = mpsc::channel(OUT_LINES);
    let reader = reader.clone();
    let sent = Sent::from_cursors(&request.resume);
    tokio::spawn(async move {
        let mut sent = sent;
        if let Err(status) = send_all(&reader, &plans, tap, &mut sent, &out).await {
            let _ = out.send(Err(status)).await;
        }
    });
    Ok(receiver)
}

async fn send_all(
    reader: &Reader,
    plans: &[StagePlan],
    tap: Option<(mpsc::Receiver<pb::LogEntry>, Arc<Lag>)>,
    sent: &mut Sent,
    out: &Out,
) -> Result<(), Status> {
    for plan in plans {
        if !send_stored(reader, plan, sent, out).await? {
            return Ok(());
        }
    }
    let Some((mut live, lag)) = tap else {
        return Ok(());
    };
    loop {
        tokio::select! {
            biased;
            entry = live.recv() => match entry {
                Some(entry) => {
                    if sent.is_new(&entry) && out.send(Ok(entry)).await.is_err() {
                        return Ok(());
                    }
                }
                // The stage (or run) ended; its last line was sent first.
                None => return Ok(()),
            },
            () = lag.notify.notified() => {
                if lag.is_behind() {
                    return Err(Status::aborted(format!(
                        "log follower fell behind ({}); resume from the last line received{}",
                        sent.describe(),
                        " (`kiln logs -f` does this by itself)"
                    )));
                }
            }
        }
    }
}

/// Sends one stage's stored lines, page by page; false once the client is
/// gone.
async fn send_stored(
    reader: &Reader,
    plan: &StagePlan,
    sent: &mut Sent,
    out: &Out,
) -> Result<bool, Status> {
    for attempt in sent.first_attempt(&plan.name)..=plan.attempt {
        let below = if attempt == plan.attempt {
            plan.below
        } else {
            u64::MAX
        };
        let mut from = sent.first_seq(&plan.name, attempt);
        while from < below {
            let key = plan.key;
            let page = reader
                .blocking(move |store| Ok(store.log_page(key, attempt, from, below, PAGE_LINES)?))
                .await
                .map_err(Status::from)?;
            let full = page.len() == PAGE_LINES;
            for log in &page {
                from = log.seq + 1;
                let entry = views::log_entry(&plan.name, log);
                if sent.is_new(&entry) && out.send(Ok(entry)).await.is_err() {
                    return Ok(false);
                }
            }
            if !full {
                break;
            }
        }
    }
    Ok(true)
}

/// Per stage, the next line the client wants: from its resume cursors,
/// then from what this stream sent. Every entry passes here, so stored and
/// live lines never overlap.
struct Sent {
    next: HashMap<String, (u32, u64)>,
}

impl Sent {
    fn from_cursors(cursors: &[pb::LogCursor]) -> Self {
        let next = cursors
            .iter()
            .map(|cursor| (cursor.stage.clone(), (cursor.attempt, cursor.next_seq)))
            .collect();
        Self { next }
    }

    fn is_new(&mut self, entry: &pb::LogEntry) -> bool {
        let wanted = self.next.get(&entry.stage).copied().unwrap_or((0, 0));
        let fresh = (entry.attempt, entry.seq) >= wanted;
        if fresh {
            self.next
                .insert(entry.stage.clone(), (entry.attempt, entry.seq + 1));
        }
        fresh
    }

    fn first_attempt(&self, stage: &str) -> u32 {
        self.next
            .get(stage)
            .map_or(1, |&(attempt, _)| attempt.max(1))
    }

    fn first_seq(&self, stage: &str, attempt: u32) -> u64 {
        match self.next.get(stage) {
            Some(&(wanted, seq)) if wanted == attempt => seq,
            _ => 0,
        }
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .next
            .iter()
            .map(|(stage, (attempt, seq))| {
                format!("stage `{stage}` attempt {attempt} up to line {seq}")
            })
            .collect();
        parts.sort();
        if parts.is_empty() {
            "nothing sent yet".to_owned()
        } else {
            format!("sent {}", parts.join(", "))
        }
    }
}

impl Reader {
    /// The stages to send for a run that is not followed live: from the
    /// view for an unfinished run, from the store for a finished one.
    pub(crate) async fn log_plan(
        &self,
        run: RunId,
        stage: Option<String>,
    ) -> Result<Vec<StagePlan>, ApiError> {
        let plans = match self.view().active_plan(run) {
            Some(plans) => plans,
            None => {
                if run > self.view().last_run() {
                    return Err(super::not_found(run));
                }
                self.blocking(move |store| {
                    store.run(run)?.ok_or_else(|| super::not_found(run))?;
                    Ok(store
                        .stages(run)?
                        .into_iter()
                        .map(|record| StagePlan {
                            key: record.key,
                            name: record.name,
                            attempt: record.attempt,
                            below: u64::MAX,
                        })
                        .collect())
                })
                .await?
            }
        };
        select_stage(run, plans, stage.as_deref())
    }
}

/// Keeps the named stage's plan (all when `stage` is `None`).
pub(crate) fn select_stage(
    run: RunId,
    plans: Vec<StagePlan>,
    stage: Option<&str>,
) -> Result<Vec<StagePlan>, ApiError> {
    let Some(name) = stage else {
        return Ok(plans);
    };
    let chosen: Vec<StagePlan> = plans.into_iter().filter(|p| p.name == name).collect();
    if chosen.is_empty() {
        return Err(ApiError::NotFound(format!(
            "run {run} has no stage `{name}`"
        )));
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(stage: &str, attempt: u32, seq: u64) -> pb::LogEntry {
        pb::LogEntry {
            stage: stage.into(),
            attempt,
            seq,
            line: None,
        }
    }

    #[test]
    fn resume_cursors_skip_what_the_client_has() {
        let mut sent = Sent::from_cursors(&[pb::LogCursor {
            stage: "train".into(),
            attempt: 2,
            next_seq: 5,
        }]);
        assert_eq!(sent.first_attempt("train"), 2);
        assert_eq!(sent.first_seq("train", 2), 5);
        assert_eq!(sent.first_seq("train", 3), 0);
        assert!(!sent.is_new(&entry("train", 1, 900)), "an older attempt");
        assert!(!sent.is_new(&entry("train", 2, 4)), "below the cursor");
        assert!(sent.is_new(&entry("train", 2, 5)));
        assert!(!sent.is_new(&entry("train", 2, 5)), "sent twice");
        assert!(sent.is_new(&entry("train", 3, 0)), "a new attempt");
        assert!(sent.is_new(&entry("test", 1, 0)), "another stage");
    }
}
