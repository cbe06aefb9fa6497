//! The outbox of one stage attempt: its log lines, numbered from 0 and kept
//! until the coordinator acknowledges them, then its `StageFinished`, kept
//! until the coordinator acknowledges that too.
//!
//! Plain data without I/O, so the rules "never duplicate a sequence number,
//! never skip one, lines before the finish" are tested without a network.
//! Lines are re-sent only after a reconnect, from the point the coordinator's
//! `Welcome` names.

use std::collections::VecDeque;

use kiln_proto::v1::{Artifact, LogBatch, LogLine, Outcome, StageFinished, StageRef};

/// Bytes a line costs in a batch on top of its text (tag, timestamp, length).
const LINE_OVERHEAD_BYTES: usize = 16;

pub(crate) struct Outbox {
    /// Put into every message about this attempt.
    stage: StageRef,
    /// Lines `acked .. next_seq()`, oldest first: all the coordinator has not
    /// confirmed yet.
    lines: VecDeque<LogLine>,
    /// Sequence number of `lines[0]`; every line below it is stored by the
    /// coordinator.
    acked: u64,
    /// Lines below this went out on the current connection
    /// (`acked <= sent <= next_seq()`).
    sent: u64,
    /// Set when the attempt has ended; its `log_lines` is final.
    finished: Option<StageFinished>,
    /// Whether `finished` went out on the current connection.
    finished_sent: bool,
}

impl Outbox {
    pub(crate) fn new(stage: StageRef) -> Self {
        Outbox {
            stage,
            lines: VecDeque::new(),
            acked: 0,
            sent: 0,
            finished: None,
            finished_sent: false,
        }
    }

    /// The sequence number the next line will get.
    pub(crate) fn next_seq(&self) -> u64 {
        self.acked + self.lines.len() as u64
    }

    /// Lines kept for the coordinator, sent or not.
    pub(crate) fn unacked(&self) -> usize {
        self.lines.len()
    }

    /// Lines not yet sent on the current connection.
    pub(crate) fn unsent(&self) -> usize {
        (self.next_seq() - self.sent) as usize
    }

    /// Numbers `line` and keeps it. Lines arriving after the finish are
    /// dropped: `log_lines` was already reported.
    pub(crate) fn push(&mut self, line: LogLine) {
        if self.finished.is_none() {
            self.lines.push_back(line);
        }
    }

    /// Records how the attempt ended; `log_lines` counts every line pushed.
    pub(crate) fn finish(
        &mut self,
        outcome: Outcome,
        exit_code: i32,
        message: String,
        image_digest: String,
        outputs: Vec<Artifact>,
    ) {
        if self.finished.is_none() {
            self.finished = Some(StageFinished {
                stage: Some(self.stage),
                outcome: outcome as i32,
                exit_code,
                message,
                log_lines: self.next_seq(),
                image_digest,
                outputs,
            });
        }
    }

    /// The next unsent lines, at most `max_lines` of them and (unless the
    /// first line alone is larger) at most `max_bytes`.
    pub(crate) fn next_batch(&mut self, max_lines: usize, max_bytes: usize) -> Option<LogBatch> {
        let first_seq = self.sent;
        let start = (first_seq - self.acked) as usize;
        let mut bytes = 0;
        let mut lines = Vec::new();
        for line in self.lines.range(start..).take(max_lines) {
            let cost = line.text.len() + LINE_OVERHEAD_BYTES;
            if !lines.is_empty() && bytes + cost > max_bytes {
                break;
            }
            bytes += cost;
            lines.push(line.clone());
        }
        if lines.is_empty() {
            return None;
        }
        self.sent += lines.len() as u64;
        Some(LogBatch {
            stage: Some(self.stage),
            first_seq,
            lines,
        })
    }

    /// The `StageFinished`, once, after every line went out.
    pub(crate) fn take_finished(&mut self) -> Option<StageFinished> {
        if self.finished_sent || self.unsent() > 0 {
            return None;
        }
        let finished = self.finished.clone()?;
        self.finished_sent = true;
        Some(finished)
    }

    /// The coordinator stored every line below `next_log_seq`. Returns how
    /// many lines that released.
    pub(crate) fn ack(&mut self, next_log_seq: u64) -> usize {
        let upto = next_log_seq.min(self.next_seq());
        if upto <= self.acked {
            return 0;
        }
        let released = (upto - self.acked) as usize;
        self.lines.drain(..released);
        self.acked = upto;
        self.sent = self.sent.max(upto);
        released
    }

    /// The connection is gone: whatever was sent on it may be lost.
    pub(crate) fn rewind(&mut self) {
        self.sent = self.acked;
        self.finished_sent = false;
    }

    /// A new connection's `Welcome` says the coordinator has every line below
    /// `next_log_seq`: drop those and send the rest (and the finish) again.
    /// Returns how many lines the coordinator lacks that this outbox no longer
    /// has (an earlier ack claimed them), which can only be reported.
    pub(crate) fn resume(&mut self, next_log_seq: u64) -> u64 {
        self.ack(next_log_seq);
        self.rewind();
        self.acked.saturating_sub(next_log_seq)
    }

    /// Where a resume without a coordinator-given position starts.
    pub(crate) fn acked(&self) -> u64 {
        self.acked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::LogStream;

    fn stage() -> StageRef {
        StageRef {
            run_id: 7,
            stage_idx: 2,
            attempt: 1,
        }
    }

    fn line(n: u64) -> LogLine {
        LogLine {
            stream: LogStream::Stdout as i32,
            text: format!("line {n}"),
            at_ms: n,
        }
    }

    fn outbox_with(n_lines: u64) -> Outbox {
        let mut outbox = Outbox::new(stage());
        for n in 0..n_lines {
            outbox.push(line(n));
        }
        outbox
    }

    /// Every batch the outbox hands out, as (first_seq, texts).
    fn drain(outbox: &mut Outbox, max_lines: usize) -> Vec<(u64, Vec<String>)> {
        let mut batches = Vec::new();
        while let Some(batch) = outbox.next_batch(max_lines, usize::MAX) {
            let texts = batch.lines.into_iter().map(|l| l.text).collect();
            batches.push((batch.first_seq, texts));
        }
        batches
    }

    /// What a coordinator that stores batches in order ends up with.
    fn store(stored: &mut Vec<String>, batches: Vec<(u64, Vec<String>)>) {
        for (first_seq, texts) in batches {
            for (i, text) in texts.into_iter().enumerate() {
                let seq = first_seq as usize + i;
                assert!(seq <= stored.len(), "gap before seq {seq}");
                if seq == stored.len() {
                    stored.push(text);
                }
            }
        }
    }

    #[test]
    fn batches_number_lines_from_zero_without_gaps() {
        let mut outbox = outbox_with(5);
        let batches = drain(&mut outbox, 2);
        let firsts: Vec<u64> = batches.iter().map(|(first, _)| *first).collect();
        assert_eq!(firsts, [0, 2, 4]);
        assert_eq!(batches[2].1, ["line 4"]);
        assert_eq!(outbox.unsent(), 0);
        assert_eq!(outbox.unacked(), 5);
    }

    #[test]
    fn batches_respect_the_byte_limit_but_always_carry_one_line() {
        let mut outbox = outbox_with(3);
        let one_line = "line 0".len() + LINE_OVERHEAD_BYTES;
        let batch = outbox.next_batch(256, one_line * 2).unwrap();
        assert_eq!(batch.lines.len(), 2);
        let batch = outbox.next_batch(256, 1).unwrap();
        assert_eq!((batch.first_seq, batch.lines.len()), (2, 1));
    }

    #[test]
    fn ack_releases_lines_and_later_batches_continue() {
        let mut outbox = outbox_with(4);
        drain(&mut outbox, 256);
        assert_eq!(outbox.ack(3), 3);
        assert_eq!(outbox.unacked(), 1);
        assert_eq!(outbox.ack(2), 0, "an older ack releases nothing");
        outbox.push(line(4));
        assert_eq!(drain(&mut outbox, 256), [(4, vec!["line 4".to_owned()])]);
    }

    #[test]
    fn ack_beyond_what_exists_is_clamped() {
        let mut outbox = outbox_with(2);
        drain(&mut outbox, 256);
        assert_eq!(outbox.ack(10), 2);
        assert_eq!(outbox.next_seq(), 2);
        outbox.push(line(2));
        assert_eq!(drain(&mut outbox, 256)[0].0, 2);
    }

    #[test]
    fn resume_resends_from_the_coordinators_position_without_duplicates() {
        let mut stored = Vec::new();
        let mut outbox = outbox_with(10);
        // First connection: everything is sent, only 4 lines get stored
        // before it breaks.
        let batches = drain(&mut outbox, 3);
        store(&mut stored, batches.into_iter().take(1).collect());
        stored.push("line 3".into());
        outbox.ack(2);
        outbox.rewind();
        // Second connection: the coordinator says it has 4 lines.
        assert_eq!(outbox.resume(4), 0);
        let batches = drain(&mut outbox, 3);
        assert_eq!(batches[0].0, 4);
        store(&mut stored, batches);
        let expected: Vec<String> = (0..10).map(|n| format!("line {n}")).collect();
        assert_eq!(stored, expected);
    }

    #[test]
    fn resume_behind_the_acked_position_reports_the_lost_lines() {
        let mut outbox = outbox_with(5);
        drain(&mut outbox, 256);
        outbox.ack(4);
        assert_eq!(outbox.resume(1), 3);
        assert_eq!(drain(&mut outbox, 256), [(4, vec!["line 4".to_owned()])]);
    }

    #[test]
    fn finished_goes_out_after_the_last_line_and_again_after_a_reconnect() {
        let mut outbox = outbox_with(3);
        outbox.finish(
            Outcome::Succeeded,
            0,
            String::new(),
            "sha256:abc".into(),
            Vec::new(),
        );
        assert!(outbox.take_finished().is_none(), "lines are still unsent");
        drain(&mut outbox, 256);
        let finished = outbox.take_finished().unwrap();
        assert_eq!(finished.log_lines, 3);
        assert_eq!(finished.outcome, Outcome::Succeeded as i32);
        assert_eq!(finished.image_digest, "sha256:abc");
        assert!(outbox.take_finished().is_none(), "sent once per connection");

        outbox.resume(1);
        assert!(outbox.take_finished().is_none());
        assert_eq!(drain(&mut outbox, 256)[0].0, 1);
        assert_eq!(outbox.take_finished().unwrap().log_lines, 3);
    }

    #[test]
    fn lines_after_the_finish_are_dropped() {
        let mut outbox = outbox_with(1);
        outbox.finish(
            Outcome::Failed,
            1,
            "exited with code 1".into(),
            String::new(),
            Vec::new(),
        );
        outbox.push(line(1));
        assert_eq!(outbox.next_seq(), 1);
    }
}
