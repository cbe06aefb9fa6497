//! How output travels from a stage's task to the supervisor: a [`LogSink`]
//! per attempt that turns byte streams into [`LogLine`]s and hands them over
//! as [`StageEvent`]s, in order, with the attempt's end as the last event.
//!
//! Sequence numbers are not assigned here but in the attempt's outbox, so
//! lines from every source of one attempt share one numbering.

use std::time::{SystemTime, UNIX_EPOCH};

use kiln_proto::v1::{LogLine, LogStream};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};

use crate::stage::Report;
use crate::stages::AttemptKey;

/// Longest line kept as one; longer ones are split (nothing is lost).
pub(crate) const MAX_LINE_BYTES: usize = 64 * 1024;

/// What a stage task tells the supervisor.
#[derive(Debug)]
pub(crate) enum StageEvent {
    Line {
        key: AttemptKey,
        task_id: u64,
        line: LogLine,
    },
    /// Always the task's last event, after all of its lines.
    Done {
        key: AttemptKey,
        task_id: u64,
        report: Report,
    },
}

/// The supervisor forgot the attempt (or is gone): stop producing output.
#[derive(Debug)]
pub(crate) struct SinkClosed;

/// Where one attempt's output goes. Cloned for each output stream.
#[derive(Clone)]
pub(crate) struct LogSink {
    key: AttemptKey,
    task_id: u64,
    events: mpsc::Sender<StageEvent>,
    /// See `TaskSignals::paused`: command output waits while it is true.
    paused: watch::Receiver<bool>,
}

impl LogSink {
    pub(crate) fn new(
        key: AttemptKey,
        task_id: u64,
        events: mpsc::Sender<StageEvent>,
        paused: watch::Receiver<bool>,
    ) -> Self {
        LogSink {
            key,
            task_id,
            events,
            paused,
        }
    }

    /// Hands over a line of command output, first waiting while the
    /// attempt's unacknowledged lines are at their limit.
    pub(crate) async fn line(&mut self, stream: LogStream, text: String) -> Result<(), SinkClosed> {
        // `wait_for` only notices a dropped sender while it has to wait.
        if self.paused.has_changed().is_err() {
            return Err(SinkClosed);
        }
        self.paused
            .wait_for(|paused| !paused)
            .await
            .map_err(|_| SinkClosed)?;
        self.send(stream, text).await
    }

    /// Hands over a line written by Kiln itself. It never waits for acks:
    /// such lines are few, and they often announce a stop that must not wait.
    pub(crate) async fn system(&self, text: impl Into<String>) {
        let _ = self.send(LogStream::System, text.into()).await;
    }

    /// Reports the attempt's end, after every line handed over before.
    pub(crate) async fn done(self, report: Report) {
        let event = StageEvent::Done {
            key: self.key,
            task_id: self.task_id,
            report,
        };
        let _ = self.events.send(event).await;
    }

    async fn send(&self, stream: LogStream, text: String) -> Result<(), SinkClosed> {
        let line = LogLine {
            stream: stream as i32,
            text,
            at_ms: now_ms(),
        };
        let event = StageEvent::Line {
            key: self.key,
            task_id: self.task_id,
            line,
        };
        self.events.send(event).await.map_err(|_| SinkClosed)
    }
}

fn now_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    since_epoch.as_millis() as u64
}

/// Reads `reader` to its end and hands every line to `sink`. Stops early when
/// the sink closes; a read error ends the stream like EOF (the process's exit
/// status says what happened).
pub(crate) async fn forward_lines(
    mut reader: impl AsyncRead + Unpin,
    stream: LogStream,
    mut sink: LogSink,
) {
    let mut splitter = LineSplitter::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut lines = Vec::new();
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        splitter.feed(&buf[..n], &mut lines);
        for line in lines.drain(..) {
            if sink.line(stream, line).await.is_err() {
                return;
            }
        }
    }
    if let Some(line) = splitter.finish() {
        let _ = sink.line(stream, line).await;
    }
}

/// Cuts a byte stream into lines: `\n` ends a line (a `\r` before it is
/// dropped), invalid UTF-8 becomes U+FFFD, and a line longer than
/// [`MAX_LINE_BYTES`] is split at a character boundary.
#[derive(Default)]
pub(crate) struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    pub(crate) fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<String>) {
        while let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            self.extend(&bytes[..newline], out);
            out.push(decode(std::mem::take(&mut self.partial)));
            bytes = &bytes[newline + 1..];
        }
        self.extend(bytes, out);
    }

    /// The unterminated last line, if any.
    pub(crate) fn finish(self) -> Option<String> {
        (!self.partial.is_empty()).then(|| decode(self.partial))
    }

    fn extend(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        self.partial.extend_from_slice(bytes);
        while self.partial.len() > MAX_LINE_BYTES {
            let cut = char_boundary(&self.partial, MAX_LINE_BYTES);
            let rest = self.partial.split_off(cut);
            out.push(decode(std::mem::replace(&mut self.partial, rest)));
        }
    }
}

/// The largest index `<= at` (looking back at most 3 bytes) that does not
/// fall inside a UTF-8 character of `bytes`; `at` when there is none.
fn char_boundary(bytes: &[u8], at: usize) -> usize {
    let is_continuation = |i: usize| bytes.get(i).is_some_and(|b| b & 0xC0 == 0x80);
    (at.saturating_sub(3)..=at)
        .rev()
        .find(|&i| i > 0 && !is_continuation(i))
        .unwrap_or(at)
}

fn decode(mut bytes: Vec<u8>) -> String {
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => String::from_utf8_lossy(err.as_bytes()).into_owned(),
    }
}

/// A sink whose events tests read back.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub(crate) struct Capture {
        events: mpsc::Receiver<StageEvent>,
        /// Kept so the sink never looks closed.
        _paused: watch::Sender<bool>,
    }

    pub(crate) fn sink() -> (LogSink, Capture) {
        let (events_tx, events) = mpsc::channel(4096);
        let (paused, paused_rx) = watch::channel(false);
        let key = AttemptKey {
            run_id: 1,
            stage_idx: 0,
            attempt: 1,
        };
        let sink = LogSink::new(key, 1, events_tx, paused_rx);
        let capture = Capture {
            events,
            _paused: paused,
        };
        (sink, capture)
    }

    impl Capture {
        /// Waits for the next line.
        pub(crate) async fn next_line(&mut self) -> Option<LogLine> {
            loop {
                match self.events.recv().await? {
                    StageEvent::Line { line, .. } => return Some(line),
                    StageEvent::Done { .. } => continue,
                }
            }
        }

        /// Every line handed over so far, as `stream: text`.
        pub(crate) fn lines(&mut self) -> Vec<String> {
            let mut lines = Vec::new();
            while let Ok(event) = self.events.try_recv() {
                if let StageEvent::Line { line, .. } = event {
                    let stream = LogStream::try_from(line.stream).unwrap_or(LogStream::Unspecified);
                    lines.push(format!("{}: {}", stream.as_str_name(), line.text));
                }
            }
            lines
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut splitter = LineSplitter::default();
        let mut out = Vec::new();
        for chunk in chunks {
            splitter.feed(chunk, &mut out);
        }
        out.extend(splitter.finish());
        out
    }

    #[test]
    fn splits_on_newlines_across_chunks() {
        assert_eq!(split(&[b"a\nb", b"c\r\n\nd"]), ["a", "bc", "", "d"]);
        assert!(split(&[b""]).is_empty());
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(split(&[b"ok \xff\n"]), ["ok \u{fffd}"]);
    }

    #[test]
    fn long_lines_are_split_at_the_cap_on_a_char_boundary() {
        let mut long = vec![b'x'; MAX_LINE_BYTES - 1];
        long.extend_from_slice("é".as_bytes()); // straddles the cap
        long.extend_from_slice(b"tail\n");
        let lines = split(&[&long]);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE_BYTES - 1);
        assert_eq!(lines[1], "étail");
        assert_eq!(split(&[&vec![b'y'; MAX_LINE_BYTES]]).len(), 1);
    }

    #[tokio::test]
    async fn forwards_lines_and_the_unterminated_tail() {
        let (sink, mut capture) = testing::sink();
        forward_lines(&b"one\ntwo"[..], LogStream::Stderr, sink).await;
        assert_eq!(
            capture.lines(),
            ["LOG_STREAM_STDERR: one", "LOG_STREAM_STDERR: two"]
        );
    }
}
