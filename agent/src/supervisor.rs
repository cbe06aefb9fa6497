//! The agent's main loop: one task owns the stage table and the link and
//! reacts to whatever happens next — a coordinator message, a stage task's
//! output or end, a timer, or the shutdown signal. Stage tasks never touch
//! shared state; they talk to this loop through [`StageEvent`]s.
//!
//! Shutdown runs in phases: drain (no new work, running stages may finish),
//! hand back (stop what still runs), await the last acks, close.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use kiln_common::channel::CoordinatorEndpoint;
use kiln_common::duration;
use kiln_common::masking::Masker;
use kiln_proto::v1::agent_message::Msg;
use kiln_proto::v1::artifact_service_client::ArtifactServiceClient;
use kiln_proto::v1::coordinator_message::Msg as CoordinatorMsg;
use kiln_proto::v1::{
    Assign, CoordinatorMessage, Draining, Heartbeat, Hello, Outcome, StageStarted, Welcome,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, error, info, warn};

use crate::attempt::{AttemptKey, Report};
use crate::cache::Caches;
use crate::config::Config;
use crate::connection::{self, Backoff, Link, LinkEvent, Session};
use crate::error::Error;
use crate::executor::{self, KILL_GRACE};
use crate::logs::{LogSink, StageEvent};
use crate::metrics::Metrics;
use crate::stage::StageRunner;
use crate::stages::StageTable;
use crate::timer::sleep_until_some;
use crate::workspace::Workspaces;

/// Buffered lines go out at the latest this long after the first of them.
const FLUSH_DELAY: Duration = Duration::from_millis(20);
/// Lines per `LogBatch`; this many buffered lines go out at once.
const BATCH_LINES: usize = 256;
/// Bytes per `LogBatch`, well below gRPC's default 4 MiB message limit.
const BATCH_BYTES: usize = 1024 * 1024;
/// Unacknowledged lines per attempt before its output stops being read.
const MAX_UNACKED_LINES: usize = 100_000;
/// Stage events waiting for the loop; a full queue makes stage tasks wait.
const EVENT_QUEUE: usize = 1024;
/// How long the last acks may take once nothing runs any more.
const ACK_WAIT: Duration = Duration::from_secs(2);
/// How long handed-back stages may take to stop (SIGTERM, grace, SIGKILL).
const STOP_WAIT: Duration = Duration::from_secs(KILL_GRACE.as_secs() + 5);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Checks `config`, sets up the work dir and runs the loop until shutdown.
pub(crate) async fn run(
    mut config: Config,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    advertise_executor(&mut config)?;
    if config.name.trim().is_empty() {
        return Err(Error::Config("the agent needs a name (--name)".into()));
    }
    if config.capacity == 0 {
        return Err(Error::Config(
            "capacity must be at least 1 stage (--capacity)".into(),
        ));
    }
    let endpoint =
        CoordinatorEndpoint::new(&config.coordinator, &config.client)?.map_endpoint(|endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
        });
    let workspaces = Workspaces::open(&config.work_dir).await?;
    // Blob transfers get their own HTTP/2 connection, so a large artifact
    // never delays heartbeats and acks on the control stream.
    let artifacts =
        ArtifactServiceClient::new(endpoint.connect_lazy()).max_decoding_message_size(8 << 20);
    let caches = Caches::open(&config.work_dir, config.cache_max_bytes)
        .await
        .map_err(|error| {
            Error::Config(format!(
                "cannot open the stage cache under {}: {error}",
                config.work_dir.display()
            ))
        })?;
    let runner = StageRunner::new(
        workspaces,
        executor::build(&config).await?,
        artifacts,
        metrics.clone(),
        Arc::new(caches),
    );
    info!(
        name = %config.name,
        coordinator = %config.coordinator,
        executor = config.executor.label(),
        capacity = config.capacity,
        work_dir = %config.work_dir.display(),
        "agent starting"
    );
    Supervisor::new(config, endpoint, runner, metrics)
        .run(shutdown)
        .await;
    info!("agent stopped");
    Ok(())
}

/// Adds the label `executor=<kind>` that stages select executors by; an
/// operator's `--labels executor=...` may only repeat it.
fn advertise_executor(config: &mut Config) -> Result<(), Error> {
    let kind = config.executor.label();
    let label = kiln_common::spec::EXECUTOR_LABEL;
    match config.labels.get(label) {
        Some(value) if value != kind => Err(Error::Config(format!(
            "the label `{label}={value}` contradicts `--executor {kind}`; the agent sets \
             `{label}` itself, remove it from --labels"
        ))),
        _ => {
            config.labels.insert(label.to_owned(), kind.to_owned());
            Ok(())
        }
    }
}

/// Where shutdown stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Taking work.
    Serving,
    /// No new work; running stages may finish (and be acked) until `deadline`.
    Draining {
        deadline: Instant,
    },
    /// What still ran was told to stop and be handed back; waiting for those
    /// stages until `deadline`.
    HandingBack {
        deadline: Instant,
    },
    /// Nothing runs; waiting for the last acks until `deadline`.
    AwaitingAcks {
        deadline: Instant,
    },
    Done,
}

impl Phase {
    fn deadline(self) -> Option<Instant> {
        match self {
            Phase::Draining { deadline }
            | Phase::HandingBack { deadline }
            | Phase::AwaitingAcks { deadline } => Some(deadline),
            Phase::Serving | Phase::Done => None,
        }
    }
}

struct Supervisor {
    /// Identity and settings, sent in every `Hello`.
    config: Config,
    endpoint: CoordinatorEndpoint,
    runner: Arc<StageRunner>,
    stages: StageTable,
    link: Link,
    backoff: Backoff,
    /// The heartbeat interval of the last `Welcome`; sizes the next
    /// connection's HTTP/2 pings.
    heartbeat: Duration,
    /// Cloned into every stage task's sink.
    events_tx: mpsc::Sender<StageEvent>,
    events_rx: mpsc::Receiver<StageEvent>,
    tasks: JoinSet<()>,
    /// Which attempt each task runs, so a panicked task still ends its
    /// attempt.
    task_attempts: HashMap<tokio::task::Id, (AttemptKey, u64)>,
    next_task_id: u64,
    /// When buffered lines must go out; `None` when nothing waits.
    flush_at: Option<Instant>,
    phase: Phase,
    /// Slots, running stages and the link, refreshed after every event.
    metrics: Metrics,
}

impl Supervisor {
    fn new(
        config: Config,
        endpoint: CoordinatorEndpoint,
        runner: StageRunner,
        metrics: Metrics,
    ) -> Self {
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        Supervisor {
            config,
            endpoint,
            runner: Arc::new(runner),
            stages: StageTable::new(MAX_UNACKED_LINES),
            link: Link::Down {
                retry_at: Instant::now(),
            },
            backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_MAX),
            heartbeat: connection::DEFAULT_HEARTBEAT,
            events_tx,
            events_rx,
            tasks: JoinSet::new(),
            task_attempts: HashMap::new(),
            next_task_id: 0,
            flush_at: None,
            phase: Phase::Serving,
            metrics,
        }
    }

    async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = pin!(shutdown);
        let mut shutdown_requested = false;
        loop {
            self.advance_phase();
            self.metrics.set_state(
                self.config.capacity,
                self.stages.running(),
                self.link.session().is_some(),
            );
            if self.phase == Phase::Done {
                break;
            }
            tokio::select! {
                Some(event) = self.events_rx.recv() => self.on_stage_event(event),
                event = self.link.next_event() => self.on_link_event(event),
                () = sleep_until_some(self.flush_at) => self.flush(),
                () = &mut shutdown, if !shutdown_requested => {
                    shutdown_requested = true;
                    self.begin_drain();
                }
                () = sleep_until_some(self.phase.deadline()) => self.on_phase_deadline(),
                Some(joined) = self.tasks.join_next_with_id() => self.on_task_joined(joined),
            }
        }
        self.close().await;
    }

    fn on_stage_event(&mut self, event: StageEvent) {
        match event {
            StageEvent::Line { key, task_id, line } => {
                let unsent = self.stages.push_line(key, task_id, line);
                if unsent >= BATCH_LINES {
                    self.flush();
                } else if unsent > 0 && self.flush_at.is_none() {
                    self.flush_at = Some(Instant::now() + FLUSH_DELAY);
                }
            }
            StageEvent::Done {
                key,
                task_id,
                report,
            } => {
                info!(stage = %key, outcome = ?report.outcome, message = %report.message, "stage finished");
                self.stages.finish(key, task_id, report);
                self.flush();
            }
        }
    }

    fn on_link_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::RetryDue => {
                let hello = self.hello();
                let opening = connection::open(self.endpoint.clone(), hello, self.heartbeat);
                self.link = Link::Opening(opening);
            }
            LinkEvent::Opened(Ok((session, welcome))) => self.on_welcome(session, welcome),
            LinkEvent::Opened(Err(err)) => {
                let delay = self.backoff.next_delay();
                let failures = self.backoff.failures();
                if matches!(err, Error::TokenRefused { .. }) {
                    warn!(%err, failures, retry_in = ?delay, "the coordinator refused this agent's token");
                } else {
                    warn!(%err, failures, retry_in = ?delay, "cannot connect to the coordinator");
                }
                self.link = Link::Down {
                    retry_at: Instant::now() + delay,
                };
            }
            LinkEvent::Message(message) => self.on_message(*message),
            LinkEvent::Lost(reason) => {
                let delay = self.backoff.next_delay();
                warn!(%reason, retry_in = ?delay, "lost the coordinator stream; reconnecting");
                self.stages.on_disconnect();
                self.link = Link::Down {
                    retry_at: Instant::now() + delay,
                };
            }
            LinkEvent::HeartbeatDue => {
                let running = self.stages.running() as u32;
                self.send(Msg::Heartbeat(Heartbeat { running }));
            }
        }
    }

    fn on_welcome(&mut self, session: Box<Session>, welcome: Welcome) {
        info!(
            coordinator = %self.config.coordinator,
            resume = welcome.resume.len(),
            drop = welcome.drop.len(),
            "connected to the coordinator"
        );
        self.backoff.reset();
        self.heartbeat = connection::heartbeat_interval(&welcome);
        self.stages.on_welcome(&welcome);
        self.link = Link::Up(session);
        if self.phase != Phase::Serving {
            self.send(Msg::Draining(Draining {}));
        }
        self.flush();
    }

    fn on_message(&mut self, message: CoordinatorMessage) {
        match message.msg {
            Some(CoordinatorMsg::Assign(assign)) => self.on_assign(assign),
            Some(CoordinatorMsg::Cancel(cancel)) => {
                let Some(stage) = &cancel.stage else {
                    warn!("coordinator sent a cancel without a stage; ignoring it");
                    return;
                };
                let key = AttemptKey::from(stage);
                if self.stages.cancel(key, cancel.reason.clone()) {
                    info!(stage = %key, reason = %cancel.reason, "cancelling stage");
                } else {
                    debug!(stage = %key, "cancel for a stage that does not run here");
                }
            }
            Some(CoordinatorMsg::Ack(ack)) => self.stages.on_ack(&ack),
            Some(CoordinatorMsg::Welcome(_)) => {
                warn!("coordinator sent a second Welcome on one stream; ignoring it");
            }
            None => warn!("coordinator sent an empty message; ignoring it"),
        }
    }

    fn on_assign(&mut self, assign: Assign) {
        let received = Instant::now();
        let Some(stage) = assign.stage else {
            warn!("coordinator assigned a stage without naming it; ignoring it");
            return;
        };
        let key = AttemptKey::from(&stage);
        if self.stages.contains(key) {
            warn!(stage = %key, "coordinator assigned a stage this agent already holds; ignoring it");
            return;
        }
        let name = &self.config.name;
        if self.phase != Phase::Serving {
            let message = format!("agent {name} is shutting down and takes no new stages");
            info!(stage = %key, "refusing a stage while draining");
            self.stages.refuse(stage, Outcome::HandedBack, message);
            self.flush();
            return;
        }
        let running = self.stages.running();
        if running >= self.config.capacity as usize {
            let message = format!(
                "agent {name} already runs {running} stages, its capacity; the coordinator must not assign more"
            );
            warn!(stage = %key, running, "refusing a stage beyond capacity");
            self.stages.refuse(stage, Outcome::InfraError, message);
            self.flush();
            return;
        }

        self.next_task_id += 1;
        let task_id = self.next_task_id;
        let signals = self.stages.start(stage, task_id);
        self.send(Msg::Started(StageStarted { stage: Some(stage) }));
        info!(
            stage = %key,
            pipeline = %assign.pipeline,
            name = %assign.stage_name,
            "starting stage"
        );
        let masker = Masker::new(assign.secrets.values());
        let sink = LogSink::new(key, task_id, self.events_tx.clone(), signals.paused, masker);
        let runner = self.runner.clone();
        let handle = self.tasks.spawn(async move {
            let report = runner.run(assign, received, &sink, signals.stop).await;
            sink.done(report).await;
        });
        self.task_attempts.insert(handle.id(), (key, task_id));
    }

    fn on_task_joined(&mut self, joined: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let (id, failure) = match joined {
            Ok((id, ())) => (id, None),
            Err(err) => (err.id(), Some(err)),
        };
        let attempt = self.task_attempts.remove(&id);
        if let (Some(err), Some((key, task_id))) = (failure, attempt)
            && err.is_panic()
        {
            error!(stage = %key, "stage task panicked");
            let report = Report {
                outcome: Outcome::InfraError,
                exit_code: -1,
                message: "the agent's stage task panicked; see the agent's log".into(),
                image_digest: String::new(),
                outputs: Vec::new(),
            };
            self.stages.finish(key, task_id, report);
            self.flush();
        }
    }

    fn begin_drain(&mut self) {
        let drain_timeout = duration::format(self.config.drain_timeout);
        info!(running = self.stages.running(), %drain_timeout, "shutdown requested; draining");
        self.phase = Phase::Draining {
            deadline: Instant::now() + self.config.drain_timeout,
        };
        self.send(Msg::Draining(Draining {}));
    }

    /// Moves shutdown on when what a phase waits for has happened.
    fn advance_phase(&mut self) {
        self.phase = match self.phase {
            Phase::Draining { .. } | Phase::AwaitingAcks { .. } if self.stages.is_empty() => {
                Phase::Done
            }
            Phase::HandingBack { .. } if self.stages.running() == 0 => Phase::AwaitingAcks {
                deadline: Instant::now() + ACK_WAIT,
            },
            phase => phase,
        };
    }

    /// Moves shutdown on when a phase ran out of time.
    fn on_phase_deadline(&mut self) {
        let now = Instant::now();
        self.phase = match self.phase {
            Phase::Draining { .. } => {
                let handed_back = self.stages.hand_back_all();
                if handed_back > 0 {
                    info!(
                        handed_back,
                        "drain timeout passed; handing back the stages that still run"
                    );
                }
                Phase::HandingBack {
                    deadline: now + STOP_WAIT,
                }
            }
            Phase::HandingBack { .. } => {
                let running = self.stages.running();
                warn!(
                    running,
                    "stages did not stop in time; exiting without their reports"
                );
                Phase::AwaitingAcks {
                    deadline: now + ACK_WAIT,
                }
            }
            Phase::AwaitingAcks { .. } => {
                let unacked = self.stages.held().len();
                warn!(
                    unacked,
                    "exiting before the coordinator acknowledged every stage"
                );
                Phase::Done
            }
            phase => phase,
        };
    }

    /// Ends the stream and waits for every stage task.
    async fn close(&mut self) {
        self.link = Link::Down {
            retry_at: Instant::now(),
        };
        self.stages.forget_all();
        let deadline = Instant::now() + STOP_WAIT;
        let mut aborted = false;
        loop {
            tokio::select! {
                joined = self.tasks.join_next() => if joined.is_none() { break },
                // Keep draining events so no task waits on a full queue.
                Some(_) = self.events_rx.recv() => {}
                () = sleep_until(deadline), if !aborted => {
                    warn!(tasks = self.tasks.len(), "stage tasks did not stop in time; aborting them");
                    self.tasks.abort_all();
                    aborted = true;
                }
            }
        }
    }

    /// Sends everything the stage table has ready, if connected.
    fn flush(&mut self) {
        self.flush_at = None;
        if let Some(session) = self.link.session() {
            for message in self.stages.outgoing(BATCH_LINES, BATCH_BYTES) {
                session.send_message(message);
            }
        }
    }

    /// Sends `msg` if connected; otherwise it is not needed any more by the
    /// time a new stream opens (its state travels in `Hello` and `Welcome`).
    fn send(&self, msg: Msg) {
        if let Some(session) = self.link.session() {
            session.send(msg);
        }
    }

    fn hello(&self) -> Hello {
        Hello {
            name: self.config.name.clone(),
            labels: self.config.labels.clone().into_iter().collect(),
            capacity: self.config.capacity,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            held: self.stages.held(),
            resources: Some(crate::resources::machine(&self.config.gpus)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExecutorKind;

    fn config(labels: &[(&str, &str)]) -> Config {
        Config {
            coordinator: "http://127.0.0.1:1".into(),
            client: Default::default(),
            name: "a".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            capacity: 1,
            work_dir: "/nonexistent".into(),
            executor: ExecutorKind::Process,
            drain_timeout: Duration::from_secs(1),
            gpus: Vec::new(),
            cache_max_bytes: 1 << 20,
        }
    }

    #[test]
    fn the_executor_label_is_added_and_may_not_be_contradicted() {
        let mut plain = config(&[("role", "build")]);
        advertise_executor(&mut plain).unwrap();
        assert_eq!(plain.labels["executor"], "process");
        assert_eq!(plain.labels["role"], "build");

        let mut repeated = config(&[("executor", "process")]);
        advertise_executor(&mut repeated).unwrap();

        let mut contradicting = config(&[("executor", "docker")]);
        let err = advertise_executor(&mut contradicting).unwrap_err();
        assert!(
            err.to_string().contains("contradicts `--executor process`"),
            "{err}"
        );
    }
}
