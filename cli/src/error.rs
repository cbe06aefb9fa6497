//! Every way a `kiln` command can fail, and which exit code each one means.
//!
//! Scripts branch on the exit code, people read the one line on stderr, so
//! both are decided here and nowhere else.

use std::error::Error as _;
use std::fmt;
use std::io;

use tonic::Code;

/// The command did what was asked.
pub(crate) const EXIT_OK: u8 = 0;
/// A followed run ended, but not with `succeeded`.
pub(crate) const EXIT_RUN_NOT_SUCCEEDED: u8 = 1;
/// Bad flags or input, or the coordinator refused the request.
pub(crate) const EXIT_USAGE: u8 = 2;
/// No answer from the coordinator at all.
pub(crate) const EXIT_UNREACHABLE: u8 = 3;
/// `kiln verify` ran and the file did not verify: a bad signature, or a
/// file that is not among what the release released.
pub(crate) const EXIT_NOT_VERIFIED: u8 = 4;

/// How a command that did not fail ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    /// `run --wait` and `demo` followed a run that failed or was cancelled;
    /// the summary already said so, so nothing else is printed.
    RunNotSucceeded,
}

impl Outcome {
    pub(crate) fn exit_code(self) -> u8 {
        match self {
            Outcome::Ok => EXIT_OK,
            Outcome::RunNotSucceeded => EXIT_RUN_NOT_SUCCEEDED,
        }
    }
}

/// A failed command.
#[derive(Debug)]
pub(crate) enum CliError {
    /// Bad input caught before or without the coordinator: a kiln.yml
    /// error, a directory outside git, an unknown stage name...
    Input(String),
    /// The coordinator answered, with an error.
    Coordinator(String),
    /// The coordinator did not answer (refused, timed out, went away).
    Unreachable { url: String, reason: String },
    /// `kiln verify` checked and the answer is no: the signature does not
    /// hold, or the file is not what the release released.
    NotVerified(String),
    /// Writing to stdout failed; a closed pipe (`kiln logs 7 | head`) is
    /// not an error worth a message.
    Output(io::Error),
}

impl CliError {
    /// Sorts a gRPC status: a lost connection (see [`connection_lost`])
    /// means nobody answered, anything else is the coordinator's verdict on
    /// the request.
    pub(crate) fn from_status(status: tonic::Status, url: &str) -> Self {
        if connection_lost(&status) {
            return CliError::Unreachable {
                url: url.to_owned(),
                reason: lost_reason(&status),
            };
        }
        CliError::Coordinator(status_reason(&status))
    }

    /// A failed connection attempt; the innermost cause is the readable one
    /// ("Connection refused (os error 111)"), the outer ones only say
    /// "transport error".
    pub(crate) fn unreachable(url: &str, error: &(dyn std::error::Error + 'static)) -> Self {
        CliError::Unreachable {
            url: url.to_owned(),
            reason: innermost_message(error),
        }
    }

    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            CliError::Input(_) | CliError::Coordinator(_) => EXIT_USAGE,
            CliError::Unreachable { .. } => EXIT_UNREACHABLE,
            CliError::NotVerified(_) => EXIT_NOT_VERIFIED,
            CliError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe => EXIT_OK,
            CliError::Output(_) => EXIT_USAGE,
        }
    }

    /// False when the error should end the process without a message.
    pub(crate) fn should_print(&self) -> bool {
        !matches!(self, CliError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Input(message)
            | CliError::Coordinator(message)
            | CliError::NotVerified(message) => f.write_str(message),
            CliError::Unreachable { url, reason } => {
                write!(f, "cannot reach the coordinator at {url}: {reason}")
            }
            CliError::Output(e) => write!(f, "cannot write the output: {e}"),
        }
    }
}

impl From<io::Error> for CliError {
    fn from(e: io::Error) -> Self {
        CliError::Output(e)
    }
}

/// Whether `status` says the connection failed rather than that the
/// coordinator refused: `UNAVAILABLE` (nobody listens, or the coordinator
/// is shutting down), and what tonic makes of a connection that broke
/// mid-call — `UNKNOWN` or `CANCELLED`, or `INTERNAL` with an HTTP/2 or
/// framing error. The coordinator's own `INTERNAL` (a store error) is a
/// verdict.
pub(crate) fn connection_lost(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled => true,
        Code::Internal => is_transport_message(status.message()),
        _ => false,
    }
}

/// The words tonic and hyper use for a broken connection.
fn is_transport_message(message: &str) -> bool {
    const SIGNS: [&str; 6] = [
        "h2 protocol error",
        "unexpected eof",
        "transport error",
        "broken pipe",
        "connection reset",
        "connection closed",
    ];
    let message = message.to_ascii_lowercase();
    SIGNS.iter().any(|sign| message.contains(sign))
}

/// Why a connection failed, in words for people: the OS's reason when
/// there is one ("Connection refused"), never HTTP/2 internals.
fn lost_reason(status: &tonic::Status) -> String {
    let reason = status_reason(status);
    if status.code() == Code::Unavailable && !is_transport_message(&reason) {
        reason
    } else {
        "the connection was lost".to_owned()
    }
}

/// The status message, never a Debug dump; an empty message falls back to
/// the code's description so the line never ends in ": ".
fn status_reason(status: &tonic::Status) -> String {
    let message = status.message().trim();
    let mut reason = if message.is_empty() {
        status.code().description().to_owned()
    } else {
        message.to_owned()
    };
    if let Some(source) = status.source() {
        let inner = innermost_message(source);
        if !reason.contains(&inner) {
            reason = format!("{reason}: {inner}");
        }
    }
    reason
}

fn innermost_message(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://127.0.0.1:7700";

    #[test]
    fn refusals_are_usage_errors_and_silence_is_unreachable() {
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
        ] {
            let error = CliError::from_status(tonic::Status::new(code, "no run 9"), URL);
            assert_eq!(error.exit_code(), EXIT_USAGE, "{code:?}");
            assert_eq!(error.to_string(), "no run 9");
        }
        let error = CliError::from_status(tonic::Status::unavailable("tcp connect error"), URL);
        assert_eq!(error.exit_code(), EXIT_UNREACHABLE);
        assert_eq!(
            error.to_string(),
            "cannot reach the coordinator at http://127.0.0.1:7700: tcp connect error"
        );
    }

    #[test]
    fn a_connection_broken_mid_call_is_unreachable_in_plain_words() {
        for status in [
            tonic::Status::unknown(
                "h2 protocol error: error reading a body from connection: broken pipe",
            ),
            tonic::Status::internal("Unexpected EOF decoding stream."),
            tonic::Status::unavailable("connection reset"),
        ] {
            let error = CliError::from_status(status, URL);
            assert_eq!(error.exit_code(), EXIT_UNREACHABLE);
            assert_eq!(
                error.to_string(),
                "cannot reach the coordinator at http://127.0.0.1:7700: the connection was lost"
            );
        }
        let store = CliError::from_status(tonic::Status::internal("store error: bad record"), URL);
        assert_eq!(store.exit_code(), EXIT_USAGE);
    }

    #[test]
    fn an_empty_status_message_still_reads() {
        let error = CliError::from_status(tonic::Status::new(Code::Internal, ""), URL);
        assert_eq!(error.to_string(), "Internal error");
    }

    #[test]
    fn connection_errors_name_the_innermost_cause() {
        #[derive(Debug)]
        struct Outer(io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("transport error")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let outer = Outer(io::Error::new(io::ErrorKind::ConnectionRefused, "refused"));
        let error = CliError::unreachable(URL, &outer);
        assert_eq!(
            error.to_string(),
            format!("cannot reach the coordinator at {URL}: refused")
        );
        assert_eq!(error.exit_code(), EXIT_UNREACHABLE);
    }

    #[test]
    fn a_closed_pipe_ends_quietly() {
        let error = CliError::from(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(!error.should_print());
        assert_eq!(error.exit_code(), EXIT_OK);
        assert_eq!(Outcome::RunNotSucceeded.exit_code(), EXIT_RUN_NOT_SUCCEEDED);
    }

    #[test]
    fn a_failed_verification_has_its_own_code() {
        let error = CliError::NotVerified("bad signature".into());
        assert_eq!(error.exit_code(), EXIT_NOT_VERIFIED);
        assert_eq!(error.to_string(), "bad signature");
    }
}
