//! The agent's one stream to the coordinator: dialing it (`Hello` out first,
//! `Welcome` back), what it delivers next, heartbeats, and the backoff
//! between attempts. What the messages mean is the supervisor's business.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::StreamExt;
use futures::future::BoxFuture;
use kiln_common::channel::{CoordinatorEndpoint, KilnChannel};
use kiln_proto::v1::agent_message::Msg;
use kiln_proto::v1::agent_service_client::AgentServiceClient;
use kiln_proto::v1::coordinator_message::Msg as CoordinatorMsg;
use kiln_proto::v1::{AgentMessage, CoordinatorMessage, Hello, Welcome};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior, sleep_until, timeout};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Streaming;

use crate::error::Error;

/// Dial plus `Welcome`: a coordinator that accepts the connection but never
/// answers counts as unreachable after this long.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Used until a `Welcome` says otherwise, and when it says 0.
pub(crate) const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// Floor for the heartbeat a `Welcome` asks for.
const MIN_HEARTBEAT: Duration = Duration::from_millis(50);

/// Floor for HTTP/2 pings, whatever the heartbeat.
const MIN_PING_INTERVAL: Duration = Duration::from_secs(1);

/// An open, welcomed stream.
pub(crate) struct Session {
    /// Unbounded because the stage outboxes already bound what can be in
    /// flight: each unacknowledged line is sent at most once per connection.
    outbound: mpsc::UnboundedSender<AgentMessage>,
    inbound: Streaming<CoordinatorMessage>,
    heartbeat: Interval,
    /// Owns the HTTP/2 connection the stream runs on.
    _client: AgentServiceClient<KilnChannel>,
}

impl Session {
    /// Queues a message. A closed stream is noticed on the inbound side.
    pub(crate) fn send(&self, msg: Msg) {
        self.send_message(AgentMessage { msg: Some(msg) });
    }

    pub(crate) fn send_message(&self, message: AgentMessage) {
        let _ = self.outbound.send(message);
    }
}

/// The state of the stream.
pub(crate) enum Link {
    /// Disconnected; the next attempt starts at `retry_at`.
    Down {
        retry_at: Instant,
    },
    /// Dialing, `Hello` queued, waiting for `Welcome`.
    Opening(BoxFuture<'static, Result<(Box<Session>, Welcome), Error>>),
    Up(Box<Session>),
}

/// What happened on the link.
pub(crate) enum LinkEvent {
    RetryDue,
    Opened(Result<(Box<Session>, Welcome), Error>),
    Message(Box<CoordinatorMessage>),
    /// The stream ended or failed, with why.
    Lost(String),
    HeartbeatDue,
}

impl Link {
    /// Waits for the next event. Cancel-safe: dropping the future loses
    /// nothing, so it can sit in a `select!`.
    pub(crate) async fn next_event(&mut self) -> LinkEvent {
        match self {
            Link::Down { retry_at } => {
                sleep_until(*retry_at).await;
                LinkEvent::RetryDue
            }
            Link::Opening(opening) => LinkEvent::Opened(opening.as_mut().await),
            Link::Up(session) => tokio::select! {
                message = session.inbound.next() => match message {
                    Some(Ok(message)) => LinkEvent::Message(Box::new(message)),
                    Some(Err(status)) => LinkEvent::Lost(describe_status(&status)),
                    None => LinkEvent::Lost("the coordinator closed the stream".into()),
                },
                _ = session.heartbeat.tick() => LinkEvent::HeartbeatDue,
            },
        }
    }

    pub(crate) fn session(&self) -> Option<&Session> {
        match self {
            Link::Up(session) => Some(session),
            _ => None,
        }
    }
}

/// Starts dialing: the returned future resolves once the coordinator's
/// `Welcome` arrived, or fails after [`OPEN_TIMEOUT`].
///
/// HTTP/2 pings every heartbeat interval (from the last `Welcome`, at least
/// [`MIN_PING_INTERVAL`]) with a timeout of two intervals detect a dead
/// stream within three heartbeats, even while the coordinator has nothing to
/// say.
pub(crate) fn open(
    endpoint: CoordinatorEndpoint,
    hello: Hello,
    heartbeat: Duration,
) -> BoxFuture<'static, Result<(Box<Session>, Welcome), Error>> {
    let ping = heartbeat.max(MIN_PING_INTERVAL);
    let endpoint = endpoint.map_endpoint(|endpoint| {
        endpoint
            .http2_keep_alive_interval(ping)
            .keep_alive_timeout(ping * 2)
            .keep_alive_while_idle(true)
    });
    let address = endpoint.uri().to_string();
    Box::pin(async move {
        match timeout(OPEN_TIMEOUT, dial(endpoint, hello)).await {
            Ok(opened) => opened,
            Err(_) => Err(Error::Connect {
                address,
                detail: format!("no Welcome within {}s", OPEN_TIMEOUT.as_secs()),
            }),
        }
    })
}

async fn dial(
    endpoint: CoordinatorEndpoint,
    hello: Hello,
) -> Result<(Box<Session>, Welcome), Error> {
    let address = endpoint.uri().to_string();
    let connect_error = |detail: String| Error::Connect {
        address: address.clone(),
        detail,
    };
    // Hello goes in before the call: tonic returns from `connect` only once
    // the response headers arrive, and the coordinator sends them only after
    // it has read Hello.
    let (outbound, outbound_rx) = mpsc::unbounded_channel();
    let _ = outbound.send(AgentMessage {
        msg: Some(Msg::Hello(hello)),
    });
    let channel = endpoint
        .connect()
        .await
        .map_err(|err| connect_error(error_chain(&err)))?;
    let mut client = AgentServiceClient::new(channel);
    let refused_or_unreachable = |status: tonic::Status| match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => Error::TokenRefused {
            address: address.clone(),
            detail: describe_status(&status),
        },
        _ => connect_error(describe_status(&status)),
    };
    let response = client
        .connect(UnboundedReceiverStream::new(outbound_rx))
        .await
        .map_err(refused_or_unreachable)?;
    let mut inbound = response.into_inner();
    let welcome = match inbound.message().await {
        Ok(Some(CoordinatorMessage {
            msg: Some(CoordinatorMsg::Welcome(welcome)),
        })) => welcome,
        Ok(Some(other)) => {
            return Err(Error::Protocol(format!(
                "its first message was {other:?}, not Welcome"
            )));
        }
        Ok(None) => return Err(connect_error("the stream ended before Welcome".into())),
        Err(status) => return Err(refused_or_unreachable(status)),
    };
    let mut heartbeat = tokio::time::interval(heartbeat_interval(&welcome));
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let session = Box::new(Session {
        outbound,
        inbound,
        heartbeat,
        _client: client,
    });
    Ok((session, welcome))
}

/// The heartbeat interval a `Welcome` asks for.
pub(crate) fn heartbeat_interval(welcome: &Welcome) -> Duration {
    match welcome.heartbeat_ms {
        0 => DEFAULT_HEARTBEAT,
        ms => Duration::from_millis(ms.into()).max(MIN_HEARTBEAT),
    }
}

fn describe_status(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        text = format!("{text} ({})", error_chain(source));
    }
    text
}

/// An error and its sources, `: `-separated: tonic's transport errors say
/// little on their own. Sources that repeat what was said are skipped.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        let part = err.to_string();
        if !text.ends_with(&part) {
            text = format!("{text}: {part}");
        }
        source = err.source();
    }
    text
}

/// Delays between reconnect attempts: doubling from `first` to `max`
/// (backon's exponential backoff), each with a random jitter of up to its
/// own length so a farm of agents does not reconnect in step.
pub(crate) struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    /// Attempts since the last success, for logs.
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(first)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Backoff {
            builder,
            delays: builder.build(),
            failures: 0,
        }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.failures += 1;
        // Without a limit on attempts the iterator never ends.
        self.delays.next().unwrap_or_default()
    }

    /// How many attempts failed since the last success.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// A connection succeeded: the next failure starts from `first` again.
    pub(crate) fn reset(&mut self) {
        self.delays = self.builder.build();
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(5000));
        let bases = [100, 200, 400, 800, 1600, 3200, 5000, 5000];
        for base in bases {
            let delay = backoff.next_delay();
            assert!(
                delay >= ms(base) && delay < ms(base) * 2,
                "{delay:?} for {base}ms"
            );
        }
        assert_eq!(backoff.failures(), 8);
        backoff.reset();
        assert!(backoff.next_delay() < ms(200));
    }

    #[test]
    fn heartbeat_interval_defaults_and_floors() {
        let welcome = |heartbeat_ms| Welcome {
            heartbeat_ms,
            ..Welcome::default()
        };
        assert_eq!(heartbeat_interval(&welcome(0)), DEFAULT_HEARTBEAT);
        assert_eq!(heartbeat_interval(&welcome(1)), MIN_HEARTBEAT);
        assert_eq!(
            heartbeat_interval(&welcome(2500)),
            Duration::from_millis(2500)
        );
    }

    #[tokio::test]
    async fn dialing_nothing_fails_with_the_address() {
        // Port 1 on loopback: refused at once.
        let endpoint = CoordinatorEndpoint::new("http://127.0.0.1:1", &Default::default()).unwrap();
        let Err(err) = open(endpoint, Hello::default(), DEFAULT_HEARTBEAT).await else {
            panic!("dialing a closed port succeeded");
        };
        let text = err.to_string();
        assert!(text.contains("127.0.0.1:1"), "{text}");
    }
}
