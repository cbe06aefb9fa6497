//! The agent pool: connections, slots, leases and placement.
//!
//! It knows agents and the stage attempts they hold, nothing about runs:
//! the engine asks it where a stage may go, tells it who holds what, and
//! hears back which attempts a lapsed lease takes with it. Fencing (is this
//! attempt still that agent's?) needs the stage records and lives with the
//! run book in `agents.rs`.
//!
//! **Architecture Invariant:** only messages on an agent's current
//! connection renew its lease; a replaced connection's late messages and
//! its "gone" change nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kiln_common::ids::AttemptKey;

use super::placement::{Machine, Need, Reservation};
use kiln_common::labels;
use kiln_proto::v1 as pb;
use tokio::sync::{Notify, mpsc};

/// Messages queued towards one agent before it counts as not reading.
const AGENT_QUEUE: usize = 1024;

type Outbound = Result<pb::CoordinatorMessage, tonic::Status>;

/// The outbound half of an agent's stream: bounded. An agent that lets
/// [`AGENT_QUEUE`] messages pile up is cut off (its stream ends with
/// `RESOURCE_EXHAUSTED`); it reconnects, and its hello settles what the
/// lost messages said (acks are re-earned, lost assignments re-queued, a
/// lost cancel becomes a `drop`).
#[derive(Clone)]
pub(crate) struct AgentTx {
    tx: mpsc::Sender<Outbound>,
    cut_off: Arc<CutOff>,
}

#[derive(Default)]
struct CutOff {
    flag: AtomicBool,
    notify: Notify,
}

/// The receiving half, served as the agent's `Connect` response stream.
pub(crate) struct AgentRx {
    rx: mpsc::Receiver<Outbound>,
    cut_off: Arc<CutOff>,
}

impl AgentTx {
    pub(crate) fn channel() -> (Self, AgentRx) {
        let (tx, rx) = mpsc::channel(AGENT_QUEUE);
        let cut_off = Arc::new(CutOff::default());
        let rx = AgentRx {
            rx,
            cut_off: cut_off.clone(),
        };
        (Self { tx, cut_off }, rx)
    }

    /// Queues `msg` without waiting (the commit thread calls this).
    pub(crate) fn send(&self, msg: pb::coordinator_message::Msg) {
        let message = Ok(pb::CoordinatorMessage { msg: Some(msg) });
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(message) {
            if !self.cut_off.flag.swap(true, Ordering::AcqRel) {
                tracing::warn!("an agent is not reading its stream; cutting it off");
            }
            self.cut_off.notify.notify_one();
        }
    }
}

impl AgentRx {
    /// The messages, ending with an error if the agent was cut off.
    pub(crate) fn into_stream(self) -> impl futures::Stream<Item = Outbound> + Send {
        futures::stream::unfold(Some(self), |state| async move {
            let mut this = state?;
            if this.cut_off.flag.load(Ordering::Acquire) {
                let status = tonic::Status::resource_exhausted(
                    "this agent did not read its stream and was cut off; reconnect",
                );
                return Some((Err(status), None));
            }
            tokio::select! {
                biased;
                () = this.cut_off.notify.notified() => {
                    let status = tonic::Status::resource_exhausted(
                        "this agent did not read its stream and was cut off; reconnect",
                    );
                    Some((Err(status), None))
                }
                message = this.rx.recv() => message.map(|message| (message, Some(this))),
            }
        })
    }

    /// The next queued message, if any (tests drive the engine without a
    /// runtime).
    #[cfg(test)]
    pub(crate) fn try_recv(&mut self) -> Option<Outbound> {
        self.rx.try_recv().ok()
    }
}

/// Distinguishes successive connections of one agent, so a late "gone" from
/// an old connection does not cut off the new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConnId(pub(crate) u64);

struct AgentState {
    name: String,
    labels: BTreeMap<String, String>,
    capacity: u32,
    version: String,
    /// Current connection, if any.
    conn: Option<(ConnId, AgentTx)>,
    /// Takes no new stages; outlives reconnects (only an operator or the
    /// agent itself sets it).
    draining: bool,
    /// The agent loses its stages when the clock passes this.
    lease_deadline_ms: u64,
    last_seen_ms: u64,
    /// What the machine declared (CPUs, memory, GPUs).
    machine: Machine,
    /// Stage attempts on the agent, whatever their recorded state (a
    /// cancelled stage occupies its slot until the agent reports it ended),
    /// with the resources each reserves.
    held: BTreeMap<AttemptKey, Reservation>,
}

impl AgentState {
    fn free_slots(&self) -> u32 {
        self.capacity.saturating_sub(self.held.len() as u32)
    }

    fn takes_work(&self) -> bool {
        self.conn.is_some() && !self.draining && self.free_slots() > 0
    }

    fn view(&self) -> pb::Agent {
        pb::Agent {
            name: self.name.clone(),
            labels: self.labels.clone().into_iter().collect(),
            capacity: self.capacity,
            running: self.held.len() as u32,
            connected: self.conn.is_some(),
            draining: self.draining,
            version: self.version.clone(),
            last_seen_ms: self.last_seen_ms,
            resources: Some(self.machine.view()),
            reserved: Some(pb::Resources {
                cpus: self.held.values().map(|r| r.cpus).sum(),
                memory_bytes: self.held.values().map(|r| r.memory_bytes).sum(),
                gpus: self.held.values().flat_map(|r| r.gpus.clone()).collect(),
            }),
        }
    }
}

/// Where dispatch may send a stage.
#[derive(Debug, PartialEq)]
pub(super) enum Placement {
    /// To this agent, reserving this much of it.
    At(String, Reservation),
    /// Agents that could run it are all busy: wait.
    Busy,
    /// No connected agent could run it even idle: wait, and say why.
    Nowhere(String),
}

/// Every agent the coordinator knows of in this incarnation.
pub(crate) struct AgentPool {
    agents: BTreeMap<String, AgentState>,
    lease_ttl_ms: u64,
}

impl AgentPool {
    pub(super) fn new(lease_ttl: Duration) -> Self {
        Self {
            agents: BTreeMap::new(),
            lease_ttl_ms: lease_ttl.as_millis() as u64,
        }
    }

    /// After a restart: the agent recorded on a held stage gets one lease
    /// to come back and claim it.
    pub(super) fn expect(
        &mut self,
        name: &str,
        held: AttemptKey,
        reservation: Reservation,
        now: u64,
    ) {
        let lease = now + self.lease_ttl_ms;
        self.agents
            .entry(name.to_owned())
            .or_insert_with(|| AgentState {
                name: name.to_owned(),
                labels: BTreeMap::new(),
                capacity: 0,
                version: String::new(),
                conn: None,
                draining: false,
                lease_deadline_ms: lease,
                last_seen_ms: 0,
                machine: Machine::default(),
                held: BTreeMap::new(),
            })
            .held
            .insert(held, reservation);
    }

    /// A hello: the agent's new connection replaces any previous one, with
    /// nothing held yet (the caller re-adds what is still its own). Returns
    /// what it held before.
    pub(super) fn connect(
        &mut self,
        hello: &pb::Hello,
        conn: ConnId,
        tx: AgentTx,
        now: u64,
    ) -> BTreeSet<AttemptKey> {
        let previous = self.agents.remove(&hello.name);
        let draining = previous.as_ref().is_some_and(|agent| agent.draining);
        let before = previous
            .map(|agent| agent.held.into_keys().collect())
            .unwrap_or_default();
        let agent = AgentState {
            name: hello.name.clone(),
            labels: hello.labels.clone().into_iter().collect(),
            capacity: hello.capacity,
            version: hello.version.clone(),
            conn: Some((conn, tx)),
            draining,
            lease_deadline_ms: now + self.lease_ttl_ms,
            last_seen_ms: now,
            machine: Machine::from_hello(hello.resources.as_ref()),
            held: BTreeMap::new(),
        };
        self.agents.insert(hello.name.clone(), agent);
        before
    }

    /// Renews the lease of `name` if `conn` is its current connection;
    /// false for a message from a replaced or expired connection.
    pub(super) fn renew(&mut self, name: &str, conn: ConnId, now: u64) -> bool {
        let Some(agent) = self.agents.get_mut(name) else {
            return false;
        };
        if agent.conn.as_ref().map(|(id, _)| *id) != Some(conn) {
            return false;
        }
        agent.lease_deadline_ms = now + self.lease_ttl_ms;
        agent.last_seen_ms = now;
        true
    }

    /// The stream of `conn` ended; the lease still keeps the stages.
    pub(super) fn disconnect(&mut self, name: &str, conn: ConnId) -> bool {
        match self.agents.get_mut(name) {
            Some(agent) if agent.conn.as_ref().map(|(id, _)| *id) == Some(conn) => {
                agent.conn = None;
                true
            }
            _ => false,
        }
    }

    pub(super) fn hold(&mut self, name: &str, held: AttemptKey, reservation: Reservation) {
        if let Some(agent) = self.agents.get_mut(name) {
            agent.held.insert(held, reservation);
        }
    }

    pub(super) fn release(&mut self, name: &str, held: AttemptKey) {
        if let Some(agent) = self.agents.get_mut(name) {
            agent.held.remove(&held);
        }
    }

    pub(super) fn holds(&self, name: &str) -> BTreeSet<AttemptKey> {
        self.agents
            .get(name)
            .map(|agent| agent.held.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Stops giving `name` new stages.
    pub(super) fn drain(&mut self, name: &str) -> Option<pb::Agent> {
        let agent = self.agents.get_mut(name)?;
        agent.draining = true;
        Some(agent.view())
    }

    /// Agents whose lease lapsed: their connection is closed (a half-alive
    /// agent reconnects and learns what is no longer its own) and the
    /// attempts they held are handed back to the caller.
    pub(super) fn expire(&mut self, now: u64) -> Vec<(String, Vec<AttemptKey>)> {
        let mut expired = Vec::new();
        for agent in self.agents.values_mut() {
            let lapsed =
                agent.lease_deadline_ms < now && (agent.conn.is_some() || !agent.held.is_empty());
            if lapsed {
                tracing::warn!(agent = %agent.name, stages = agent.held.len(), "agent lease expired");
                agent.conn = None;
                let held = std::mem::take(&mut agent.held).into_keys().collect();
                expired.push((agent.name.clone(), held));
            }
        }
        expired
    }

    /// Whether any agent could take a stage now.
    pub(super) fn has_free_slot(&self) -> bool {
        self.agents.values().any(AgentState::takes_work)
    }

    /// Where a stage that wants `wanted` labels and `need` goes: of the
    /// agents that have a free slot and that much free, the one with the
    /// most free slots, so work spreads across the farm.
    pub(super) fn place(&self, wanted: &BTreeMap<String, String>, need: &Need) -> Placement {
        let best = self
            .agents
            .values()
            .filter(|agent| agent.takes_work() && labels::satisfies(&agent.labels, wanted))
            .filter(|agent| agent.machine.never(&agent.labels, need).is_none())
            .filter_map(|agent| {
                let reservation = agent.machine.reserve(need, agent.held.values())?;
                Some((agent, reservation))
            })
            .max_by_key(|(agent, _)| agent.free_slots());
        if let Some((agent, reservation)) = best {
            return Placement::At(agent.name.clone(), reservation);
        }
        let connected: Vec<&AgentState> =
            self.agents.values().filter(|a| a.conn.is_some()).collect();
        let could = connected.iter().any(|agent| {
            !agent.draining
                && labels::satisfies(&agent.labels, wanted)
                && agent.machine.never(&agent.labels, need).is_none()
        });
        if could {
            return Placement::Busy;
        }
        let why: Vec<String> = connected
            .iter()
            .map(|agent| {
                let reason = if agent.draining {
                    "is draining".to_owned()
                } else if !labels::satisfies(&agent.labels, wanted) {
                    "lacks the labels".to_owned()
                } else {
                    agent.machine.never(&agent.labels, need).unwrap_or_default()
                };
                format!("`{}` {reason}", agent.name)
            })
            .collect();
        let agents = if why.is_empty() {
            "no agent is connected".to_owned()
        } else {
            why.join("; ")
        };
        Placement::Nowhere(format!(
            "waiting for an agent that can run it: it needs {}; {agents}",
            need.describe(wanted)
        ))
    }

    /// The current connection of `name`.
    pub(super) fn sender(&self, name: &str) -> Option<AgentTx> {
        let (_, tx) = self.agents.get(name)?.conn.as_ref()?;
        Some(tx.clone())
    }

    pub(super) fn views(&self) -> Vec<pb::Agent> {
        self.agents.values().map(AgentState::view).collect()
    }

    pub(super) fn connected(&self) -> usize {
        self.agents
            .values()
            .filter(|agent| agent.conn.is_some())
            .count()
    }
}

#[cfg(test)]
mod tests {

    use kiln_common::spec::{EXECUTOR_LABEL, GpuRequest};

    use super::*;

    const TTL_MS: u64 = 1_000;

    fn pool() -> AgentPool {
        AgentPool::new(Duration::from_millis(TTL_MS))
    }

    fn hello(name: &str, capacity: u32, labels: &[(&str, &str)]) -> pb::Hello {
        pb::Hello {
            name: name.into(),
            capacity,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            ..Default::default()
        }
    }

    fn tx() -> AgentTx {
        AgentTx::channel().0
    }

    fn held(run: u64, idx: u32, attempt: u32) -> AttemptKey {
        AttemptKey::new(run, idx, attempt)
    }

    fn wants(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    /// Where a stage that asks for nothing but `labels` goes, if anywhere.
    fn place(pool: &AgentPool, labels: &[(&str, &str)]) -> Option<String> {
        match pool.place(&wants(labels), &Need::default()) {
            Placement::At(name, _) => Some(name),
            Placement::Busy | Placement::Nowhere(_) => None,
        }
    }

    #[test]
    fn placement_follows_labels_free_slots_and_drains() {
        let mut pool = pool();
        pool.connect(&hello("gpu", 1, &[("role", "train")]), ConnId(1), tx(), 0);
        pool.connect(&hello("wide", 3, &[]), ConnId(2), tx(), 0);
        assert_eq!(place(&pool, &[]), Some("wide".into()));
        assert_eq!(place(&pool, &[("role", "train")]), Some("gpu".into()));
        pool.hold("gpu", held(1, 0, 1), Reservation::default());
        assert_eq!(
            pool.place(&wants(&[("role", "train")]), &Need::default()),
            Placement::Busy,
            "full"
        );
        pool.drain("wide");
        assert_eq!(place(&pool, &[]), None, "draining takes nothing");
        assert!(!pool.has_free_slot());
        // A drain outlives a reconnect.
        pool.connect(&hello("wide", 3, &[]), ConnId(3), tx(), 10);
        assert!(pool.views().iter().any(|a| a.name == "wide" && a.draining));
    }

    #[test]
    fn a_stage_no_connected_agent_can_run_waits_with_the_reason() {
        let mut pool = pool();
        let docker = hello("boxes", 4, &[(EXECUTOR_LABEL, "docker")]);
        pool.connect(&docker, ConnId(1), tx(), 0);
        let mut two_cpus = hello("host", 4, &[(EXECUTOR_LABEL, "process")]);
        two_cpus.resources = Some(pb::Resources {
            cpus: 2.0,
            memory_bytes: 4 << 30,
            gpus: Vec::new(),
        });
        pool.connect(&two_cpus, ConnId(2), tx(), 0);
        let host_only = Need {
            host_only: true,
            cpus: 2.0,
            ..Need::default()
        };
        let Placement::At(name, first) = pool.place(&wants(&[]), &host_only) else {
            panic!("the process agent can run it");
        };
        assert_eq!(name, "host", "never the docker agent");
        pool.hold("host", held(1, 0, 1), first);
        assert_eq!(
            pool.place(&wants(&[]), &host_only),
            Placement::Busy,
            "two 2-cpu stages never share a 2-cpu agent"
        );
        let gpu = Need {
            gpus: GpuRequest::Count(1),
            ..Need::default()
        };
        let Placement::Nowhere(reason) = pool.place(&wants(&[]), &gpu) else {
            panic!("nobody declared a gpu");
        };
        assert!(reason.contains("it needs 1 gpus"), "{reason}");
        assert!(reason.contains("`host` has gpus []"), "{reason}");
        let views = pool.views();
        let host = views.iter().find(|a| a.name == "host").unwrap();
        assert_eq!(host.reserved.as_ref().unwrap().cpus, 2.0);
    }

    #[test]
    fn a_lapsed_lease_hands_back_what_the_agent_held_once() {
        let mut pool = pool();
        pool.connect(&hello("a", 2, &[]), ConnId(1), tx(), 0);
        pool.hold("a", held(1, 0, 1), Reservation::default());
        pool.hold("a", held(2, 3, 4), Reservation::default());
        assert!(pool.renew("a", ConnId(1), 500));
        assert!(pool.expire(1_400).is_empty(), "renewed at 500");
        let expired = pool.expire(1_501);
        assert_eq!(expired, [("a".into(), vec![held(1, 0, 1), held(2, 3, 4)])]);
        assert_eq!(pool.connected(), 0, "its connection is closed");
        assert!(pool.expire(5_000).is_empty(), "only once");
    }

    #[test]
    fn a_replaced_connection_neither_renews_nor_disconnects() {
        let mut pool = pool();
        pool.connect(&hello("a", 1, &[]), ConnId(1), tx(), 0);
        pool.hold("a", held(1, 0, 1), Reservation::default());
        let before = pool.connect(&hello("a", 1, &[]), ConnId(2), tx(), 100);
        assert_eq!(before, BTreeSet::from([held(1, 0, 1)]));
        assert!(!pool.renew("a", ConnId(1), 900), "the old stream is gone");
        assert!(!pool.disconnect("a", ConnId(1)));
        assert_eq!(pool.connected(), 1);
        assert!(pool.disconnect("a", ConnId(2)));
        assert_eq!(pool.connected(), 0);
    }

    #[tokio::test]
    async fn an_agent_that_does_not_read_is_cut_off_not_buffered_for() {
        use futures::StreamExt;
        let (tx, rx) = AgentTx::channel();
        for _ in 0..AGENT_QUEUE + 10 {
            tx.send(pb::coordinator_message::Msg::Ack(pb::Ack::default()));
        }
        let received: Vec<Outbound> = rx.into_stream().collect().await;
        assert_eq!(received.len(), 1, "the cut-off comes first, then the end");
        let status = received[0].as_ref().unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn an_expected_agent_has_one_lease_to_come_back() {
        let mut pool = pool();
        pool.expect("gone", held(7, 1, 2), Reservation::default(), 0);
        assert!(!pool.has_free_slot(), "not connected, no capacity");
        assert_eq!(
            pool.expire(TTL_MS + 1),
            [("gone".into(), vec![held(7, 1, 2)])]
        );
    }
}
