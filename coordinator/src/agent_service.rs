//! `AgentService`: turns each agent's bidirectional stream into engine
//! events. The protocol logic lives in the engine; this is plumbing.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use kiln_proto::v1 as pb;
use pb::agent_service_server::AgentService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Principal;
use crate::engine::{ConnId, Event};

/// How long a new stream may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct AgentApi {
    events: mpsc::Sender<Event>,
    next_conn: AtomicU64,
    /// Agent names connected with each token: one leaked agent token can
    /// only bring up so many agents.
    connected: Arc<Mutex<HashMap<String, BTreeSet<String>>>>,
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
    /// connected does not count twice.
    fn admit(&self, token: &str, agent: &str) -> Result<(), Status> {
        let mut connected = self.connected.lock().expect("agent count poisoned");
        let names = connected.entry(token.to_owned()).or_default();
        if !names.contains(agent) && names.len() >= self.max_agents_per_token {
            return Err(Status::resource_exhausted(format!(
                "token `{token}` already has {} agents connected, the limit; create another agent token",
                names.len()
            )));
        }
        names.insert(agent.to_owned());
        Ok(())
    }
}

/// Releases an agent's place under its token when its stream ends.
struct Admitted {
    connected: Arc<Mutex<HashMap<String, BTreeSet<String>>>>,
    token: String,
    agent: String,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut connected = self.connected.lock().expect("agent count poisoned");
        if let Some(names) = connected.get_mut(&self.token) {
            names.remove(&self.agent);
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
        let (tx, rx) = mpsc::unbounded_channel();
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
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
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
