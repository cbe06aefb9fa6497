//! Following a coordinator's stream across its restarts.
//!
//! `kiln logs -f` and `kiln run --wait` hold one server stream open for as
//! long as a run takes. When that stream breaks because the connection went
//! away (the coordinator crashed, restarted or is briefly unreachable) or
//! because the coordinator dropped a follower that fell behind, the command
//! opens it again after a pause — 100 ms, doubling up to 2 s — and gives up
//! with exit code 3 only when the coordinator stays away longer than the
//! `--reconnect-for` patience. The user sees one short note on stderr per
//! outage, never the transport's own words.
//!
//! What to ask for after a reconnect, and what to drop so nothing is printed
//! twice, is each command's business (`commands::logs`, `commands::watch`).

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use tonic::{Code, Status};

use crate::error::{self, CliError};
use crate::timefmt;

/// The first pause after a broken stream.
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// Pauses double up to this.
const MAX_DELAY: Duration = Duration::from_secs(2);
/// How long a command keeps trying when `--reconnect-for` is not given.
pub(crate) const DEFAULT_PATIENCE: Duration = Duration::from_secs(120);

/// Whether a stream that ended with `status` should be opened again: the
/// connection was lost, or the coordinator dropped this follower for being
/// slow (`ABORTED`). Anything else is the coordinator's answer to the
/// request and ends the command.
pub(crate) fn is_resumable(status: &Status) -> bool {
    status.code() == Code::Aborted || error::connection_lost(status)
}

/// The pauses between attempts (backon's exponential schedule, cut off at
/// the patience): a pure schedule, so it is tested without waiting.
#[derive(Debug)]
struct Backoff {
    /// Give up once the coordinator has been away this long.
    patience: Duration,
    /// The pauses of the current outage.
    delays: ExponentialBackoff,
    /// When the current outage began; `None` while connected.
    lost_at: Option<Instant>,
}

fn schedule() -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(FIRST_DELAY)
        .with_max_delay(MAX_DELAY)
        .without_max_times()
        .build()
}

impl Backoff {
    fn new(patience: Duration) -> Self {
        Self {
            patience,
            delays: schedule(),
            lost_at: None,
        }
    }

    /// The pause before the next attempt, or `None` once the outage that
    /// began at the first call since [`Backoff::reset`] has lasted
    /// `patience`.
    fn next_delay(&mut self, now: Instant) -> Option<Duration> {
        let lost_at = *self.lost_at.get_or_insert(now);
        let away = now.saturating_duration_since(lost_at);
        let left = self
            .patience
            .checked_sub(away)
            .filter(|left| !left.is_zero())?;
        Some(self.delays.next().unwrap_or(MAX_DELAY).min(left))
    }

    /// The coordinator answered again: the next outage starts afresh.
    fn reset(&mut self) {
        self.delays = schedule();
        self.lost_at = None;
    }
}

/// One command's reconnection state: the backoff, and whether the user
/// has been told about the current outage.
#[derive(Debug)]
pub(crate) struct Reconnect {
    backoff: Backoff,
    /// The coordinator's URL as the user gave it, for the final error.
    url: String,
    /// The note for this outage is out; one per outage is enough.
    noted: bool,
}

impl Reconnect {
    pub(crate) fn new(url: &str, patience: Duration) -> Self {
        Self {
            backoff: Backoff::new(patience),
            url: url.to_owned(),
            noted: false,
        }
    }

    /// The stream delivered something: the connection is back.
    pub(crate) fn recovered(&mut self) {
        self.backoff.reset();
        self.noted = false;
    }

    /// After the stream broke with a resumable `status`: says so once, then
    /// waits before the next attempt. Past the patience it returns the
    /// error to exit with (unreachable, exit code 3).
    pub(crate) async fn pause(&mut self, status: &Status) -> Result<(), CliError> {
        if !self.noted {
            self.noted = true;
            eprintln!("kiln: coordinator connection lost; reconnecting…");
        }
        tracing::debug!(code = ?status.code(), message = status.message(), "stream broke");
        match self.backoff.next_delay(Instant::now()) {
            Some(delay) => {
                tokio::time::sleep(delay).await;
                Ok(())
            }
            None => Err(self.gave_up(status)),
        }
    }

    fn gave_up(&self, status: &Status) -> CliError {
        let patience = timefmt::duration(self.backoff.patience.as_millis() as u64);
        let last = match CliError::from_status(status.clone(), &self.url) {
            CliError::Unreachable { reason, .. } => reason,
            other => other.to_string(),
        };
        CliError::Unreachable {
            url: self.url.clone(),
            reason: format!(
                "lost the connection and could not get it back within {patience} ({last})"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_two_seconds_and_stop_at_the_patience() {
        let start = Instant::now();
        let mut backoff = Backoff::new(Duration::from_secs(10));
        let mut now = start;
        let mut pauses = Vec::new();
        while let Some(pause) = backoff.next_delay(now) {
            // backon multiplies in floating point: round to the millisecond.
            pauses.push((pause.as_secs_f64() * 1000.0).round() as u64);
            now += pause;
        }
        assert_eq!(
            pauses,
            [100, 200, 400, 800, 1600, 2000, 2000, 2000, 900],
            "the last pause ends exactly at the patience"
        );
        assert_eq!(now - start, Duration::from_secs(10));
    }

    #[test]
    fn a_recovered_connection_starts_the_next_outage_afresh() {
        let start = Instant::now();
        let mut backoff = Backoff::new(Duration::from_secs(1));
        assert_eq!(backoff.next_delay(start), Some(FIRST_DELAY));
        assert_eq!(
            backoff.next_delay(start + Duration::from_millis(999)),
            Some(Duration::from_millis(1))
        );
        assert_eq!(backoff.next_delay(start + Duration::from_secs(1)), None);
        backoff.reset();
        let later = start + Duration::from_secs(60);
        assert_eq!(backoff.next_delay(later), Some(FIRST_DELAY));
    }

    #[test]
    fn lost_connections_and_dropped_followers_resume_and_verdicts_do_not() {
        let resumable = [
            Status::unavailable("tcp connect error"),
            Status::aborted("log follower fell behind; follow again"),
            Status::unknown("h2 protocol error: error reading a body from connection"),
            Status::internal(
                "h2 protocol error: stream error received: unexpected internal error encountered",
            ),
            Status::internal("Unexpected EOF decoding stream."),
            Status::cancelled("operation was canceled"),
        ];
        for status in &resumable {
            assert!(is_resumable(status), "{status:?}");
        }
        let verdicts = [
            Status::not_found("run 9 does not exist"),
            Status::permission_denied("token `ci` (viewer) may not call StreamLogs"),
            Status::unauthenticated("no token"),
            Status::invalid_argument("bad"),
            Status::internal("store error: corrupted record r9"),
        ];
        for status in &verdicts {
            assert!(!is_resumable(status), "{status:?}");
        }
    }

    #[test]
    fn giving_up_is_unreachable_and_names_no_transport_internals() {
        let reconnect = Reconnect::new("http://127.0.0.1:7700", Duration::from_secs(120));
        let error = reconnect.gave_up(&Status::unknown(
            "h2 protocol error: error reading a body from connection: broken pipe",
        ));
        assert_eq!(error.exit_code(), error::EXIT_UNREACHABLE);
        let text = error.to_string();
        assert!(text.starts_with("cannot reach the coordinator at http://127.0.0.1:7700: lost the connection and could not get it back within 2m"), "{text}");
        assert!(
            !text.contains("h2") && !text.contains("broken pipe"),
            "{text}"
        );
    }
}
