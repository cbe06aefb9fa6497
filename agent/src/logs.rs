//! How output travels from a stage's task to the supervisor: a [`LogSink`]
//! per attempt that turns byte streams into [`LogLine`]s and hands them over
//! as [`StageEvent`]s, in order, with the attempt's end as the last event.
//!
//! Sequence numbers are not assigned here but in the attempt's outbox, so
//! lines from every source of one attempt share one numbering.
//!
//! Lines longer than `kiln_common::loglines::MAX_LINE_BYTES` are cut by the
//! rule the coordinator also applies, so they pass it unchanged.
//!
//! **Secrets never leave through here**: the sink masks the attempt's
//! secret values in command output while it is still a byte stream (before
//! it is cut into lines, so a secret written in two parts is masked), in
//! Kiln's own lines, and in the attempt's final message.

use std::time::{SystemTime, UNIX_EPOCH};

use kiln_common::loglines;
use kiln_common::masking::{MaskStream, Masker};
use kiln_proto::v1::{LogLine, LogStream};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};

use crate::attempt::{AttemptKey, Report};

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
    /// The attempt's secret values, masked in everything the sink hands over.
    masker: Masker,
}

impl LogSink {
    pub(crate) fn new(
        key: AttemptKey,
        task_id: u64,
        events: mpsc::Sender<StageEvent>,
        paused: watch::Receiver<bool>,
        masker: Masker,
    ) -> Self {
        LogSink {
            key,
            task_id,
            events,
            paused,
            masker,
        }
    }

    /// A masker for one output stream of the commands; what it emits goes
    /// to [`LogSink::line`].
    pub(crate) fn mask_stream(&self) -> MaskStream {
        self.masker.stream()
    }

    /// Hands over a line of command output, first waiting while the
    /// attempt's unacknowledged lines are at their limit. The line must have
    /// come through a [`LogSink::mask_stream`].
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
        let text = text.into();
        let text = match self.masker.mask(&text) {
            std::borrow::Cow::Borrowed(_) => text,
            std::borrow::Cow::Owned(masked) => masked,
        };
        let _ = self.send(LogStream::System, text).await;
    }

    /// Reports the attempt's end, after every line handed over before.
    pub(crate) async fn done(self, mut report: Report) {
        if let std::borrow::Cow::Owned(masked) = self.masker.mask(&report.message) {
            report.message = masked;
        }
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

/// Reads `reader` to its end and hands every line to `sink`, masked. Stops
/// early when the sink closes; a read error ends the stream like EOF (the
/// process's exit status says what happened).
pub(crate) async fn forward_lines(
    mut reader: impl AsyncRead + Unpin,
    stream: LogStream,
    mut sink: LogSink,
) {
    let mut output = OutputLines::new(&sink);
    let mut buf = vec![0u8; 16 * 1024];
    let mut lines = Vec::new();
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        output.feed(&buf[..n], &mut lines);
        for line in lines.drain(..) {
            if sink.line(stream, line).await.is_err() {
                return;
            }
        }
    }
    for line in output.finish() {
        if sink.line(stream, line).await.is_err() {
            return;
        }
    }
}

/// One output stream of the commands on its way to lines: masked first,
/// then cut.
pub(crate) struct OutputLines {
    masking: MaskStream,
    splitter: LineSplitter,
    /// Reused for the masked bytes of each chunk.
    masked: Vec<u8>,
}

impl OutputLines {
    pub(crate) fn new(sink: &LogSink) -> Self {
        OutputLines {
            masking: sink.mask_stream(),
            splitter: LineSplitter::default(),
            masked: Vec::new(),
        }
    }

    /// Appends the lines `bytes` completes to `out`.
    pub(crate) fn feed(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        self.masked.clear();
        self.masking.push(bytes, &mut self.masked);
        self.splitter.feed(&self.masked, out);
    }

    /// The lines that the held-back bytes and the unterminated tail make.
    pub(crate) fn finish(mut self) -> Vec<String> {
        let mut out = Vec::new();
        self.masked.clear();
        self.masking.finish(&mut self.masked);
        self.splitter.feed(&self.masked, &mut out);
        out.extend(self.splitter.finish());
        out
    }
}

/// Cuts a byte stream into lines: `\n` ends a line (a `\r` before it is
/// dropped), invalid UTF-8 becomes U+FFFD, and a line longer than
/// `loglines::MAX_LINE_BYTES` is cut and marked as `loglines` says. Only the
/// kept start of a long line is held in memory.
#[derive(Default)]
pub(crate) struct LineSplitter {
    partial: Vec<u8>,
    /// Bytes cut off the current line.
    dropped: usize,
}

impl LineSplitter {
    pub(crate) fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<String>) {
        while let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            self.extend(&bytes[..newline]);
            out.push(self.take_line());
            bytes = &bytes[newline + 1..];
        }
        self.extend(bytes);
    }

    /// The unterminated last line, if any.
    pub(crate) fn finish(mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| self.take_line())
    }

    fn extend(&mut self, bytes: &[u8]) {
        if self.dropped > 0 {
            self.dropped += bytes.len();
            return;
        }
        self.partial.extend_from_slice(bytes);
        let kept = loglines::kept_len(&self.partial);
        if kept < self.partial.len() {
            self.dropped = self.partial.len() - kept;
            self.partial.truncate(kept);
        }
    }

    fn take_line(&mut self) -> String {
        let line = decode(std::mem::take(&mut self.partial));
        // Decoding may have made the kept start longer (U+FFFD is 3 bytes).
        loglines::mark_truncated(line, std::mem::take(&mut self.dropped))
    }
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
        /// The report of the `Done` event, once [`Capture::lines`] saw it.
        pub(crate) report: Option<Report>,
    }

    pub(crate) fn sink() -> (LogSink, Capture) {
        sink_with(Masker::default())
    }

    /// A sink that masks what `masker` masks, as the supervisor builds it.
    pub(crate) fn sink_with(masker: Masker) -> (LogSink, Capture) {
        let (events_tx, events) = mpsc::channel(4096);
        let (paused, paused_rx) = watch::channel(false);
        let key = AttemptKey::new(1, 0, 1);
        let sink = LogSink::new(key, 1, events_tx, paused_rx, masker);
        let capture = Capture {
            events,
            _paused: paused,
            report: None,
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
                match event {
                    StageEvent::Line { line, .. } => {
                        let stream =
                            LogStream::try_from(line.stream).unwrap_or(LogStream::Unspecified);
                        lines.push(format!("{}: {}", stream.as_str_name(), line.text));
                    }
                    StageEvent::Done { report, .. } => self.report = Some(report),
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
    fn a_long_line_of_invalid_utf8_still_fits() {
        let max = kiln_common::loglines::MAX_LINE_BYTES;
        let lines = split(&[&vec![0xff; 3 * max], b"\n"]);
        assert!(lines[0].len() <= max, "{}", lines[0].len());
        assert!(lines[0].ends_with(" bytes dropped]"));
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary_and_fit_with_their_marker() {
        use kiln_common::loglines::{MARKER_ROOM, MAX_LINE_BYTES, marker as truncation_marker};

        let kept = MAX_LINE_BYTES - MARKER_ROOM;
        let mut long = vec![b'x'; kept - 1];
        long.extend_from_slice("é".as_bytes()); // straddles the cut
        long.extend_from_slice(b"tail");
        // The rest of the line arrives later, in pieces.
        let lines = split(&[&long, &[b'z'; 100_000], b"zz\nnext\n"]);
        let dropped = 2 + 4 + 100_000 + 2;
        let expected = "x".repeat(kept - 1) + &truncation_marker(dropped);
        assert!(
            lines[0] == expected,
            "ends with {:?}",
            &lines[0][kept - 10..]
        );
        assert_eq!(lines[1], "next");
        assert_eq!(truncation_marker(usize::MAX).len(), 59);
        assert!(lines[0].len() <= MAX_LINE_BYTES);
        let exact = vec![b'y'; MAX_LINE_BYTES];
        assert_eq!(split(&[&exact]), [String::from_utf8(exact).unwrap()]);
        let unterminated = split(&[&vec![b'w'; MAX_LINE_BYTES + 1]]);
        assert!(unterminated[0].ends_with(&truncation_marker(MARKER_ROOM + 1)));
        assert!(unterminated[0].len() <= MAX_LINE_BYTES);
    }

    #[tokio::test]
    async fn secrets_are_masked_across_reads_and_in_kiln_lines() {
        let (sink, mut capture) = testing::sink_with(Masker::new(["hunter2secret"]));
        let (mut writer, reader) = tokio::io::duplex(64);
        let forwarding = tokio::spawn(forward_lines(reader, LogStream::Stdout, sink.clone()));
        for part in ["pw=hunter", "2secret ok\nhunter2sec", "ret"] {
            tokio::io::AsyncWriteExt::write_all(&mut writer, part.as_bytes())
                .await
                .unwrap();
            tokio::task::yield_now().await;
        }
        drop(writer);
        forwarding.await.unwrap();
        sink.system("cannot use hunter2secret").await;
        let report = Report {
            message: "failed: hunter2secret".into(),
            ..Report::new(kiln_proto::v1::Outcome::Failed, 1, "")
        };
        sink.done(report).await;
        assert_eq!(
            capture.lines(),
            [
                "LOG_STREAM_STDOUT: pw=*** ok",
                "LOG_STREAM_STDOUT: ***",
                "LOG_STREAM_SYSTEM: cannot use ***"
            ]
        );
        assert_eq!(capture.report.unwrap().message, "failed: ***");
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
