//! `AgentService`: turns each agent's bidirectional stream into engine
//! events. The protocol logic lives in the engine; this is plumbing.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use kiln_proto::v1 as pb;
use pb::agent_service_server::AgentService;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Principal;
use crate::engine::{AgentTx, ConnId, Event};

/// How long a new stream may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct AgentApi {
    events: mpsc::Sender<Event>,
    next_conn: AtomicU64,
    /// Agent names connected with each token, with their open streams:
    /// one leaked agent token can only bring up so many agents.
    connected: Arc<Mutex<Connected>>,
    max_agents_per_token: usize,
}

impl AgentApi {
    pub(crate) fn new(events: mpsc::Sender<Event>, max_agents_per_token: usize) -> Self {
        Self {
            events,
            next_conn: AtomicU64::new(1),
            connected: Arc::default(),
            max_agents_per_token,
        }
    }

    /// Counts `agent` against `token`; a reconnect of a name already
    /// connected does not count twice. A name belongs to the token that
    /// first brought it up: another token cannot take it over (its stages,
    /// its slots), whatever its hello says.
    fn admit(&self, token: &str, agent: &str) -> Result<(), Status> {
        let mut connected = self.connected.lock().expect("agent count poisoned");
        match connected.owners.get(agent) {
            Some(owner) if owner != token => {
                tracing::warn!(agent, token, owner = %owner, "refused an agent name that belongs to another token");
                return Err(Status::permission_denied(format!(
                    "agent name `{agent}` belongs to token `{owner}`; this connection uses token `{token}`: give this agent its own name"
                )));
            }
            Some(_) => {}
            None => {
                connected.owners.insert(agent.to_owned(), token.to_owned());
            }
        }
        let names = connected.streams.entry(token.to_owned()).or_default();
        if !names.contains_key(agent) && names.len() >= self.max_agents_per_token {
            return Err(Status::resource_exhausted(format!(
                "token `{token}` already has {} agents connected, the limit; create another agent token",
                names.len()
            )));
        }
        *names.entry(agent.to_owned()).or_default() += 1;
        Ok(())
    }
}

/// Per token, per agent name, the streams open: a reconnect opens the new
/// stream before the old one ends, and the name must stay counted until
/// its last stream is gone.
#[derive(Default)]
struct Connected {
    streams: HashMap<String, BTreeMap<String, usize>>,
    /// Which token each agent name belongs to (for as long as this
    /// coordinator runs).
    owners: HashMap<String, String>,
}

/// Releases an agent's place under its token when its stream ends.
struct Admitted {
    connected: Arc<Mutex<Connected>>,
    token: String,
    agent: String,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut connected = self.connected.lock().expect("agent count poisoned");
        if let Some(names) = connected.streams.get_mut(&self.token)
            && let Some(streams) = names.get_mut(&self.agent)
        {
            *streams -= 1;
            if *streams == 0 {
                names.remove(&self.agent);
            }
        }
    }
}

type OutboundStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type ConnectStream = OutboundStream;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let token = Principal::of(&request)?.name;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10s of connecting"))??;
        let Some(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message on Connect must be a hello",
            ));
        };
        validate_hello(&hello)?;
        let agent = hello.name.clone();
        self.admit(&token, &agent)?;
        let admitted = Admitted {
            connected: self.connected.clone(),
            token,
            agent: agent.clone(),
        };
        let conn = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = AgentTx::channel();
        let events = self.events.clone();
        events
            .send(Event::AgentHello { hello, conn, tx })
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        // Ends when the agent closes its side or the connection breaks.
        tokio::spawn(async move {
            let _admitted = admitted;
            loop {
                match inbound.message().await {
                    Ok(Some(pb::AgentMessage { msg: Some(msg) })) => {
                        let event = Event::AgentMessage {
                            agent: agent.clone(),
                            conn,
                            msg,
                        };
                        if events.send(event).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(agent = %agent, %status, "agent stream broke");
                        break;
                    }
                }
            }
            let _ = events.send(Event::AgentGone { agent, conn }).await;
        });
        Ok(Response::new(Box::pin(rx.into_stream())))
    }
}

fn validate_hello(hello: &pb::Hello) -> Result<(), Status> {
    let name_ok = !hello.name.is_empty()
        && hello.name.len() <= 64
        && hello
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        return Err(Status::invalid_argument(format!(
            "agent name `{}` is invalid; use 1-64 letters, digits, `-`, `_` or `.`",
            hello.name
        )));
    }
    if hello.capacity == 0 {
        return Err(Status::invalid_argument(
            "agent capacity must be at least 1",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(api: &AgentApi, token: &str, agent: &str) -> Result<Admitted, Status> {
        api.admit(token, agent)?;
        Ok(Admitted {
            connected: api.connected.clone(),
            token: token.to_owned(),
            agent: agent.to_owned(),
        })
    }

    #[test]
    fn a_replaced_stream_ending_keeps_its_name_counted() {
        let (events, _rx) = mpsc::channel(1);
        let api = AgentApi::new(events, 2);
        let first = admitted(&api, "t", "same").unwrap();
        let _again = admitted(&api, "t", "same").unwrap();
        drop(first);
        let _other = admitted(&api, "t", "other").unwrap();
        let refused = admitted(&api, "t", "third").err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        // Another token has its own allowance.
        assert!(admitted(&api, "u", "fourth").is_ok());
    }

    #[test]
    fn an_agent_name_belongs_to_the_token_that_brought_it_up() {
        let (events, _rx) = mpsc::channel(1);
        let api = AgentApi::new(events, 4);
        let builder = admitted(&api, "build-token", "builder").unwrap();
        let refused = admitted(&api, "other-token", "builder").err().unwrap();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.message().contains("belongs to token `build-token`"));
        // Still refused once the owner is gone: its lease may hold stages.
        drop(builder);
        assert!(admitted(&api, "other-token", "builder").is_err());
        // The owner reconnects (and replaces its old stream) as before.
        assert!(admitted(&api, "build-token", "builder").is_ok());
    }

    #[test]
    fn a_place_is_freed_when_the_last_stream_of_a_name_ends() {
        let (events, _rx) = mpsc::channel(1);
        let api = AgentApi::new(events, 1);
        let only = admitted(&api, "t", "a").unwrap();
        assert!(admitted(&api, "t", "b").is_err());
        drop(only);
        assert!(admitted(&api, "t", "b").is_ok());
    }
}
