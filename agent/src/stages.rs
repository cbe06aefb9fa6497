//! Every stage attempt the agent holds: running, or finished and waiting for
//! the coordinator's `Ack(finished)`.
//!
//! The table applies the coordinator's `Welcome`, `Ack` and `Cancel` to the
//! attempts' outboxes and stop signals, and says what to send next. It does no
//! I/O (the supervisor sends what [`StageTable::outgoing`] returns), so the
//! resume and fencing rules are tested without a network.

use std::collections::{BTreeMap, BTreeSet};

use kiln_proto::v1::agent_message::Msg;
use kiln_proto::v1::{Ack, AgentMessage, LogLine, Outcome, StageRef, Welcome};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::attempt::{AttemptKey, Report};
use crate::executor::contract::{Stop, StopSender, StopSignal, stop_signal};
use crate::outbox::Outbox;

/// What a newly started attempt's task listens to.
pub(crate) struct TaskSignals {
    pub(crate) stop: StopSignal,
    /// True while too many of the attempt's lines wait for an ack: the
    /// task's output readers pause. Closed when the attempt is forgotten.
    pub(crate) paused: watch::Receiver<bool>,
}

/// The table's grip on a running attempt's task.
struct TaskControl {
    /// Tells this task's events from those of an earlier task with the same
    /// key that was forgotten but is still winding down.
    task_id: u64,
    /// The first reason sent wins (see [`StopSender::stop`]).
    stop: StopSender,
    paused: watch::Sender<bool>,
}

struct Entry {
    outbox: Outbox,
    /// Present while the attempt's task runs.
    task: Option<TaskControl>,
}

pub(crate) struct StageTable {
    /// Ordered so messages go out in a stable order.
    entries: BTreeMap<AttemptKey, Entry>,
    /// Unacknowledged lines at which an attempt's output stops being read:
    /// the agent's memory stays bounded when the coordinator falls behind.
    max_unacked: usize,
}

impl StageTable {
    pub(crate) fn new(max_unacked: usize) -> Self {
        StageTable {
            entries: BTreeMap::new(),
            max_unacked,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn contains(&self, key: AttemptKey) -> bool {
        self.entries.contains_key(&key)
    }

    /// Attempts whose task still runs.
    pub(crate) fn running(&self) -> usize {
        self.entries.values().filter(|e| e.task.is_some()).count()
    }

    /// What `Hello.held` reports: everything not yet forgotten.
    pub(crate) fn held(&self) -> Vec<StageRef> {
        self.entries
            .keys()
            .map(|&key| StageRef::from(key))
            .collect()
    }

    /// Registers an attempt whose task `task_id` is about to start.
    pub(crate) fn start(&mut self, stage: StageRef, task_id: u64) -> TaskSignals {
        let (stop_tx, stop_rx) = stop_signal();
        let (paused_tx, paused_rx) = watch::channel(false);
        let entry = Entry {
            outbox: Outbox::new(stage),
            task: Some(TaskControl {
                task_id,
                stop: stop_tx,
                paused: paused_tx,
            }),
        };
        self.entries.insert(AttemptKey::from(&stage), entry);
        TaskSignals {
            stop: stop_rx,
            paused: paused_rx,
        }
    }

    /// Registers an attempt that ends before it starts (the agent cannot take
    /// it); its `StageFinished` is kept until acknowledged like any other.
    pub(crate) fn refuse(&mut self, stage: StageRef, outcome: Outcome, message: String) {
        let mut outbox = Outbox::new(stage);
        outbox.finish(outcome, 0, message, String::new(), Vec::new());
        self.entries
            .insert(AttemptKey::from(&stage), Entry { outbox, task: None });
    }

    /// Adds a line of task `task_id`; returns how many lines of the attempt
    /// wait to be sent (0 when the line was not the table's to keep).
    pub(crate) fn push_line(&mut self, key: AttemptKey, task_id: u64, line: LogLine) -> usize {
        let max_unacked = self.max_unacked;
        let Some(entry) = self.entries.get_mut(&key) else {
            return 0;
        };
        let Some(task) = entry.task.as_ref().filter(|t| t.task_id == task_id) else {
            return 0;
        };
        entry.outbox.push(line);
        if entry.outbox.unacked() >= max_unacked {
            task.paused
                .send_if_modified(|paused| !std::mem::replace(paused, true));
        }
        entry.outbox.unsent()
    }

    /// Records how task `task_id` ended its attempt.
    pub(crate) fn finish(&mut self, key: AttemptKey, task_id: u64, report: Report) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        if entry.task.as_ref().is_none_or(|t| t.task_id != task_id) {
            return;
        }
        entry.task = None;
        entry.outbox.finish(
            report.outcome,
            report.exit_code,
            report.message,
            report.image_digest,
            report.outputs,
        );
    }

    /// Asks a running attempt to stop as cancelled; false when it does not run
    /// here.
    pub(crate) fn cancel(&mut self, key: AttemptKey, reason: String) -> bool {
        match self.entries.get(&key).and_then(|e| e.task.as_ref()) {
            Some(task) => {
                task.stop.stop(Stop::Cancel(reason));
                true
            }
            None => false,
        }
    }

    /// Asks every running attempt to stop and be handed back; returns how
    /// many were asked.
    pub(crate) fn hand_back_all(&mut self) -> usize {
        let tasks = self.entries.values().filter_map(|e| e.task.as_ref());
        tasks.map(|task| task.stop.stop(Stop::HandBack)).count()
    }

    /// Stops (if running) and drops an attempt; its task's later events are
    /// ignored and its output readers see a closed sink.
    pub(crate) fn forget(&mut self, key: AttemptKey) {
        if let Some(Entry {
            task: Some(task), ..
        }) = self.entries.remove(&key)
        {
            task.stop.stop(Stop::Forget);
        }
    }

    /// Forgets everything: the agent is exiting.
    pub(crate) fn forget_all(&mut self) {
        let keys: Vec<AttemptKey> = self.entries.keys().copied().collect();
        for key in keys {
            self.forget(key);
        }
    }

    /// The connection broke: everything sent on it is sent again after the
    /// next `Welcome`.
    pub(crate) fn on_disconnect(&mut self) {
        for entry in self.entries.values_mut() {
            entry.outbox.rewind();
        }
    }

    /// Applies a new connection's `Welcome`: drop what is no longer ours,
    /// resume the rest from the positions the coordinator names.
    pub(crate) fn on_welcome(&mut self, welcome: &Welcome) {
        let dropped: BTreeSet<AttemptKey> = welcome.drop.iter().map(AttemptKey::from).collect();
        for key in &dropped {
            if self.contains(*key) {
                info!(stage = %key, "coordinator dropped the stage; forgetting it");
                self.forget(*key);
            }
        }
        let mut resume = BTreeMap::new();
        for stage in &welcome.resume {
            match &stage.stage {
                Some(stage_ref) => {
                    resume.insert(AttemptKey::from(stage_ref), stage.next_log_seq);
                }
                None => warn!("coordinator resumed a stage without naming it; ignoring"),
            }
        }
        for (key, entry) in &mut self.entries {
            let from = match resume.remove(key) {
                Some(next_log_seq) => next_log_seq,
                None => {
                    warn!(stage = %key, "coordinator neither resumed nor dropped the stage; re-sending its unacknowledged lines");
                    entry.outbox.acked()
                }
            };
            let lost = entry.outbox.resume(from);
            if lost > 0 {
                warn!(stage = %key, lost, next_log_seq = from, "coordinator lacks log lines it acknowledged before; they cannot be re-sent");
            }
        }
        for key in resume.keys() {
            warn!(stage = %key, "coordinator resumed a stage this agent does not hold; it will report nothing for it");
        }
        self.update_pauses();
    }

    /// Applies an `Ack`: release stored lines, forget finished or rejected
    /// attempts.
    pub(crate) fn on_ack(&mut self, ack: &Ack) {
        let Some(stage) = &ack.stage else {
            warn!("coordinator sent an ack without a stage; ignoring it");
            return;
        };
        let key = AttemptKey::from(stage);
        let Some(entry) = self.entries.get_mut(&key) else {
            debug!(stage = %key, "ack for a stage this agent no longer holds");
            return;
        };
        if ack.rejected {
            info!(stage = %key, reason = %ack.reason, "coordinator rejected the stage; stopping and forgetting it");
            self.forget(key);
            return;
        }
        if ack.resend {
            // The coordinator refused a batch that would have left a gap:
            // everything from `next_log_seq` goes out again.
            let lost = entry.outbox.resume(ack.next_log_seq);
            warn!(stage = %key, next_log_seq = ack.next_log_seq, lost, "coordinator asked for log lines again");
        } else {
            entry.outbox.ack(ack.next_log_seq);
        }
        if ack.finished {
            if entry.task.is_some() {
                warn!(stage = %key, "coordinator recorded the stage as finished while it still runs here; stopping it");
            }
            self.forget(key);
            return;
        }
        self.update_pauses();
    }

    /// Everything ready to go out: unsent log batches of each attempt, then
    /// its `StageFinished` once all its lines went out.
    pub(crate) fn outgoing(&mut self, max_lines: usize, max_bytes: usize) -> Vec<AgentMessage> {
        let mut messages = Vec::new();
        for entry in self.entries.values_mut() {
            while let Some(batch) = entry.outbox.next_batch(max_lines, max_bytes) {
                messages.push(Msg::Logs(batch));
            }
            if let Some(finished) = entry.outbox.take_finished() {
                messages.push(Msg::Finished(finished));
            }
        }
        messages
            .into_iter()
            .map(|msg| AgentMessage { msg: Some(msg) })
            .collect()
    }

    /// Un-pauses attempts whose acknowledged lines made room again.
    fn update_pauses(&mut self) {
        for entry in self.entries.values() {
            if let Some(task) = &entry.task {
                let paused = entry.outbox.unacked() >= self.max_unacked;
                task.paused
                    .send_if_modified(|p| std::mem::replace(p, paused) != paused);
            }
        }
    }

    #[cfg(test)]
    fn outbox(&self, key: AttemptKey) -> Option<&Outbox> {
        self.entries.get(&key).map(|e| &e.outbox)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::{LogStream, ResumeStage};

    fn stage(idx: u32) -> StageRef {
        StageRef {
            run_id: 1,
            stage_idx: idx,
            attempt: 1,
        }
    }

    fn key(idx: u32) -> AttemptKey {
        AttemptKey::from(&stage(idx))
    }

    fn line(text: &str) -> LogLine {
        LogLine {
            stream: LogStream::Stdout as i32,
            text: text.into(),
            at_ms: 0,
        }
    }

    fn ack(idx: u32, next_log_seq: u64) -> Ack {
        Ack {
            stage: Some(stage(idx)),
            next_log_seq,
            ..Ack::default()
        }
    }

    fn report(outcome: Outcome) -> Report {
        Report {
            outcome,
            exit_code: 0,
            message: String::new(),
            image_digest: String::new(),
            outputs: Vec::new(),
        }
    }

    /// The outgoing messages, each as a short string: `logs 0+2`, `finished`.
    fn sent(table: &mut StageTable) -> Vec<String> {
        let messages = table.outgoing(256, usize::MAX);
        messages
            .into_iter()
            .map(|m| match m.msg.unwrap() {
                Msg::Logs(b) => format!(
                    "logs {}/{}+{}",
                    b.stage.unwrap().stage_idx,
                    b.first_seq,
                    b.lines.len()
                ),
                Msg::Finished(f) => {
                    format!("finished {}/{}", f.stage.unwrap().stage_idx, f.log_lines)
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn lines_then_finished_then_forgotten_on_ack() {
        let mut table = StageTable::new(100);
        let _signals = table.start(stage(0), 1);
        table.push_line(key(0), 1, line("a"));
        table.push_line(key(0), 1, line("b"));
        table.finish(key(0), 1, report(Outcome::Succeeded));
        assert_eq!(sent(&mut table), ["logs 0/0+2", "finished 0/2"]);
        assert_eq!(table.held().len(), 1, "held until Ack(finished)");
        assert_eq!(table.running(), 0);
        table.on_ack(&Ack {
            finished: true,
            ..ack(0, 2)
        });
        assert!(table.is_empty());
    }

    #[test]
    fn reconnect_resends_unacked_lines_and_finished() {
        let mut table = StageTable::new(100);
        let _signals = table.start(stage(0), 1);
        for text in ["a", "b", "c"] {
            table.push_line(key(0), 1, line(text));
        }
        table.finish(key(0), 1, report(Outcome::Failed));
        assert_eq!(sent(&mut table), ["logs 0/0+3", "finished 0/3"]);
        table.on_ack(&ack(0, 1));
        // The supervisor sends nothing between a disconnect and the next
        // Welcome, which says where to resume.
        table.on_disconnect();
        table.on_welcome(&Welcome {
            heartbeat_ms: 1000,
            resume: vec![ResumeStage {
                stage: Some(stage(0)),
                next_log_seq: 2,
            }],
            drop: vec![],
        });
        assert_eq!(sent(&mut table), ["logs 0/2+1", "finished 0/3"]);
    }

    #[test]
    fn a_resend_ack_sends_the_lines_again_from_where_it_says() {
        let mut table = StageTable::new(100);
        let _signals = table.start(stage(0), 1);
        for text in ["a", "b", "c", "d"] {
            table.push_line(key(0), 1, line(text));
        }
        assert_eq!(sent(&mut table), ["logs 0/0+4"]);
        table.on_ack(&Ack {
            resend: true,
            ..ack(0, 1)
        });
        assert_eq!(sent(&mut table), ["logs 0/1+3"]);
        // A plain ack behind what was sent changes nothing.
        table.on_ack(&ack(0, 2));
        assert!(sent(&mut table).is_empty());
    }

    #[test]
    fn welcome_drop_stops_and_forgets_a_running_attempt() {
        let mut table = StageTable::new(100);
        let signals = table.start(stage(0), 1);
        let _other = table.start(stage(1), 2);
        table.on_welcome(&Welcome {
            heartbeat_ms: 1000,
            resume: vec![ResumeStage {
                stage: Some(stage(1)),
                next_log_seq: 0,
            }],
            drop: vec![stage(0)],
        });
        assert!(!table.contains(key(0)));
        assert!(table.contains(key(1)));
        assert_eq!(signals.stop.requested(), Some(Stop::Forget));
        assert!(signals.paused.has_changed().is_err(), "its sink is closed");
        // Its task's late events are ignored.
        assert_eq!(table.push_line(key(0), 1, line("late")), 0);
        table.finish(key(0), 1, report(Outcome::Cancelled));
        assert_eq!(table.held(), [stage(1)]);
    }

    #[test]
    fn rejected_ack_forgets_and_unknown_acks_are_ignored() {
        let mut table = StageTable::new(100);
        let signals = table.start(stage(0), 1);
        table.on_ack(&ack(5, 3));
        table.on_ack(&Ack {
            rejected: true,
            reason: "attempt 2 runs elsewhere".into(),
            ..ack(0, 0)
        });
        assert!(table.is_empty());
        assert_eq!(signals.stop.requested(), Some(Stop::Forget));
    }

    #[test]
    fn events_of_a_replaced_task_are_ignored() {
        let mut table = StageTable::new(100);
        let _old = table.start(stage(0), 1);
        table.forget(key(0));
        let _new = table.start(stage(0), 2);
        assert_eq!(table.push_line(key(0), 1, line("old")), 0);
        table.finish(key(0), 1, report(Outcome::Cancelled));
        assert_eq!(table.running(), 1);
        assert_eq!(table.push_line(key(0), 2, line("new")), 1);
    }

    #[test]
    fn first_stop_reason_wins() {
        let mut table = StageTable::new(100);
        let signals = table.start(stage(0), 1);
        assert!(table.cancel(key(0), "user asked".into()));
        assert_eq!(table.hand_back_all(), 1);
        let reason = signals.stop.requested();
        assert_eq!(reason, Some(Stop::Cancel("user asked".into())));
        table.finish(key(0), 1, report(Outcome::Cancelled));
        assert!(!table.cancel(key(0), "again".into()), "no longer running");
    }

    #[test]
    fn output_pauses_at_the_unacked_limit_and_resumes_on_ack() {
        let mut table = StageTable::new(3);
        let signals = table.start(stage(0), 1);
        for text in ["a", "b"] {
            table.push_line(key(0), 1, line(text));
        }
        assert!(!*signals.paused.borrow());
        table.push_line(key(0), 1, line("c"));
        assert!(*signals.paused.borrow());
        sent(&mut table);
        table.on_ack(&ack(0, 1));
        assert!(!*signals.paused.borrow());
        assert_eq!(table.outbox(key(0)).unwrap().unacked(), 2);
    }

    #[test]
    fn refused_attempt_reports_finished_without_lines() {
        let mut table = StageTable::new(100);
        table.refuse(stage(3), Outcome::InfraError, "at capacity".into());
        assert_eq!(table.running(), 0);
        assert_eq!(sent(&mut table), ["finished 3/0"]);
    }
}
