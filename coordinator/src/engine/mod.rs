//! The engine: the single owner of live state.
//!
//! Every change to runs, stages and agents happens here, on one task, in
//! response to an [`Event`]. Handling an event mutates memory at once and
//! queues the matching writes plus the effects that depend on them; after a
//! burst of events the engine hands the whole group to the [`Committer`],
//! which makes it durable and only then runs the effects (acks, replies,
//! assignments). Dispatch happens after every burst, so a stage that becomes
//! ready is pushed to an agent in the same commit.
//!
//! - [`runs`]: the run book — creating runs, the one stage transition
//!   function, moving the DAG forward, cancel and retry.
//! - [`pool`]: the agent pool — connections, slots, leases, placement; its
//!   own state and tests, nothing about runs.
//! - [`agents`]: what the pool's events mean for attempts — fencing,
//!   completion, loss.
//! - [`dispatch`]: ready stages to the places the pool offers.
//! - [`logs`]: storing, acknowledging and following log lines.
//! - [`delivery`]: the delivery controller — gates, releases,
//!   environments, monitors and rollbacks; its own state and tests,
//!   nothing about the DAG.
//! - [`route`]: what the run book asks of delivery and what delivery
//!   decides for the run book, carried across by the loop.

mod agents;
mod at_commit;
mod checks;
mod conditions;
mod delivery;
mod dispatch;
mod logs;
mod placement;
mod pool;
mod promote;
mod rollout;
mod route;
mod runs;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use kiln_common::ids::{AttemptKey, EnvKey, RunId, StageKey};
use kiln_common::spec;
use kiln_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot, watch};

use crate::blobs::BlobStore;
use crate::clock::Clock;
use crate::commit::{Committer, Effect};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::{Batch, Op, PipelineRecord, RunRecord, StageRecord, Store};
use crate::views;

pub(crate) use at_commit::{FileAtCommit, TriggerRequest};
pub(crate) use delivery::rollout::RolloutCommand;
pub(crate) use pool::{AgentTx, ConnId};

pub(crate) type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// Everything the engine reacts to.
pub(crate) enum Event {
    AgentHello {
        hello: pb::Hello,
        conn: ConnId,
        tx: AgentTx,
    },
    AgentMessage {
        agent: String,
        conn: ConnId,
        msg: pb::agent_message::Msg,
    },
    AgentGone {
        agent: String,
        conn: ConnId,
    },
    Register {
        pipeline: NewPipeline,
        reply: Reply<(PipelineRecord, bool)>,
    },
    Trigger {
        request: TriggerRequest,
        reply: Reply<pb::Run>,
    },
    /// `None`: the run is not unfinished here (finished, or unknown);
    /// the caller reads it from the store.
    WatchRun {
        run: RunId,
        reply: Reply<Option<watch::Receiver<pb::Run>>>,
    },
    CancelRun {
        run: RunId,
        reply: Reply<pb::Run>,
    },
    /// A finished run comes with its durable records (read by the caller
    /// off the loop), unless the engine still holds a newer copy.
    RetryStage {
        run: RunId,
        stage: String,
        stored: Option<(RunRecord, Vec<StageRecord>)>,
        reply: Reply<pb::Run>,
    },
    /// Taps the live lines of an unfinished run's stage(s); answered after
    /// a commit with where the durable lines end. `None`: the run is not
    /// unfinished here, so the store has all of it.
    FollowLogs {
        run: RunId,
        stage: Option<String>,
        tap: crate::read::Tap,
        reply: Reply<Option<crate::read::Followed>>,
    },
    ListAgents {
        reply: Reply<Vec<pb::Agent>>,
    },
    DrainAgent {
        name: String,
        reply: Reply<pb::Agent>,
    },
    DecideGate {
        run: RunId,
        stage: String,
        user: String,
        approve: bool,
        /// Why, if the person said ("" otherwise).
        reason: String,
        reply: Reply<pb::Run>,
    },
    Rollback {
        environment: EnvKey,
        to: Option<u64>,
        user: String,
        reply: Reply<pb::Run>,
    },
    Unfreeze {
        environment: EnvKey,
        reply: Reply<pb::Environment>,
    },
    /// `kiln rollout status|promote|abort`.
    Rollout {
        environment: EnvKey,
        command: delivery::rollout::RolloutCommand,
        reply: Reply<pb::Rollout>,
    },
    /// `kiln promote NAME@N --to ENV`; see [`promote`]. `stored`: the
    /// source run's stages, read by the caller off the loop.
    Promote {
        model: String,
        environment: String,
        user: String,
        stored: Option<(RunId, Vec<StageRecord>)>,
        reply: Reply<pb::Run>,
    },
    /// `kiln model alias NAME@N ALIAS [--rm]`.
    SetModelAlias {
        model: String,
        alias: String,
        remove: bool,
        user: String,
        reply: Reply<()>,
    },
    /// What a monitor saw; see [`monitor`].
    MonitorSample(delivery::monitor::Observation),
    /// An assigned stage's secrets, opened off the loop; see [`checks`].
    SecretsOpened {
        agent: String,
        key: StageKey,
        attempt: u32,
        /// Boxed: an `Assign` is by far the largest thing an event carries.
        assign: Box<pb::Assign>,
        opened: Result<std::collections::BTreeMap<String, String>, String>,
    },
    /// What the blob store said of a completion's outputs; see [`checks`].
    OutputsChecked {
        agent: String,
        finished: pb::StageFinished,
        checked: checks::Checked,
    },
    /// Git's answer for an environment stage held by the outdated-deploy
    /// guard; see [`conditions`].
    DeployGuardChecked {
        check: Box<conditions::GuardCheck>,
        outdated: Result<bool, String>,
    },
}

/// A release to watch: the runner starts a monitor task for it.
pub(crate) struct MonitorRequest {
    pub(crate) release: u64,
    pub(crate) environment: EnvKey,
    pub(crate) monitor: spec::Monitor,
    pub(crate) until_ms: u64,
}

/// A pipeline file that passed validation, before it gets a version.
pub(crate) struct NewPipeline {
    pub(crate) name: String,
    pub(crate) file_name: String,
    pub(crate) spec_yaml: String,
    pub(crate) repo: String,
    pub(crate) branch: String,
    pub(crate) subdir: String,
    /// The file's path in the repository when runs read it at their
    /// commit; "" for a snapshot.
    pub(crate) path: String,
    /// The repository's name, "" if none.
    pub(crate) repository: String,
    /// Where runs report their state on their commit.
    pub(crate) status: Option<Box<crate::forge_status::StatusTarget>>,
    /// `--poll` in ms; 0 = never.
    pub(crate) poll_ms: u64,
}

/// A pipeline version, parsed once and shared by its runs.
pub(crate) struct PipelineSpec {
    pub(crate) record: PipelineRecord,
    pub(crate) parsed: Arc<spec::Pipeline>,
    /// `dependents[i]`: stages that list stage `i` in their `needs`.
    pub(crate) dependents: Vec<Vec<usize>>,
}

impl PipelineSpec {
    pub(crate) fn new(record: PipelineRecord, parsed: Arc<spec::Pipeline>) -> Self {
        let mut dependents = vec![Vec::new(); parsed.stages.len()];
        for (idx, stage) in parsed.stages.iter().enumerate() {
            for &need in &stage.needs {
                dependents[need].push(idx);
            }
        }
        Self {
            record,
            parsed,
            dependents,
        }
    }
}

/// A run that is not finished yet, with everything needed to move it on.
struct ActiveRun {
    record: RunRecord,
    stages: Vec<StageRecord>,
    spec: Arc<PipelineSpec>,
    /// Latest snapshot for `WatchRun` streams; created on first watch.
    watch: Option<watch::Sender<pb::Run>>,
    followers: Vec<crate::read::Follower>,
    /// Masks the secret values of each stage (by index) in stored lines;
    /// rebuilt from the secrets store after a restart.
    maskers: HashMap<u32, Result<Arc<kiln_common::masking::Masker>, String>>,
}

impl ActiveRun {
    fn new(record: RunRecord, stages: Vec<StageRecord>, spec: Arc<PipelineSpec>) -> Self {
        Self {
            record,
            stages,
            spec,
            watch: None,
            followers: Vec::new(),
            maskers: HashMap::new(),
        }
    }
}

/// What changed during the current burst of events.
#[derive(Default)]
struct Dirty {
    stages: BTreeSet<StageKey>,
    runs: BTreeSet<RunId>,
    /// Runs whose `WatchRun` streams get a new snapshot.
    watched: BTreeSet<RunId>,
}

/// Finished runs kept in memory past their durability, for retries and
/// late completions.
const RETIRED_KEPT: usize = 1024;

/// Tunables, from the coordinator's config.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EngineConfig {
    pub(crate) lease_ttl: Duration,
    pub(crate) heartbeat_interval: Duration,
    /// Total bytes of stage outputs one run may store.
    pub(crate) max_run_artifact_bytes: u64,
    /// Webhook delivery keys remembered (`W` records); past it the keys
    /// of the oldest runs are forgotten (`at_commit::expire_deliveries`).
    pub(crate) max_delivery_keys: usize,
}

/// [`EngineConfig::max_delivery_keys`] unless configured: a forge
/// redelivers within hours, and a busy farm starts far fewer webhook runs
/// than this in that time.
pub const MAX_DELIVERY_KEYS: usize = 10_000;

pub(crate) struct Engine {
    store: Arc<dyn Store>,
    /// New releases go here once durable, to be signed.
    release_signer: Option<mpsc::UnboundedSender<u64>>,
    /// Opens the secrets a stage lists when it is dispatched.
    secrets: Option<Arc<crate::secrets::Secrets>>,
    /// Checked (and touched) when a stage reports outputs.
    blobs: Arc<BlobStore>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    /// The current version of every pipeline, by name: the newest that is
    /// not a side version ([`PipelineRecord::side`]).
    latest: HashMap<String, PipelineRecord>,
    /// The highest version number of every pipeline, side versions
    /// included: the next version's number follows it.
    top_version: HashMap<String, u32>,
    /// The version holding each file (pipeline, "sha256:<hex>"), among the
    /// versions with the latest settings (repository, branch, path): a
    /// file read at a commit gets a new version only when it is new.
    digests: HashMap<(String, String), u32>,
    /// Webhook deliveries that started runs, by (pipeline, idempotency
    /// key): a repeat starts nothing.
    deliveries: HashMap<(String, String), RunId>,
    /// Parsed pipeline versions that active runs use.
    specs: HashMap<(String, u32), Arc<PipelineSpec>>,
    runs: BTreeMap<RunId, ActiveRun>,
    /// Ready stages in the order they became ready: FIFO across runs. May
    /// hold stale keys (stage cancelled meanwhile); dispatch skips them.
    ready: VecDeque<StageKey>,
    pool: pool::AgentPool,
    next_run_id: u64,
    /// The delivery controller: environments, releases, breaches, and
    /// the monitors, alerts and signatures it asks for.
    delivery: delivery::DeliveryController,
    /// Completions whose outputs the runner is to check off the loop.
    checks: Vec<checks::OutputCheck>,
    /// Assignments waiting for their secrets to be opened off the loop.
    secrets_to_open: Vec<checks::SecretsToOpen>,
    /// Environment stages waiting for the outdated-deploy check, for the
    /// runner to ask git; and the stages it cleared.
    guard_checks: Vec<conditions::GuardCheck>,
    guard_cleared: BTreeSet<StageKey>,
    /// Environment stages whose check is in flight.
    guard_pending: BTreeSet<StageKey>,
    /// Environment stages waiting for another run's deploy to the same
    /// environment to end.
    parked_deploys: BTreeSet<StageKey>,
    /// Attempts with a check in flight.
    checking: BTreeSet<AttemptKey>,
    /// Delivery work the run book asked for, routed after each event.
    delivery_events: Vec<delivery::DeliveryEvent>,
    /// When each queued stage became ready, for the dispatch latency metric.
    ready_since: HashMap<StageKey, std::time::Instant>,
    /// Records changed since the last commit, written once at its end.
    dirty: Dirty,
    /// Pipeline versions parsed once, shared with the API.
    parsed: Arc<crate::pipelines::ParsedPipelines>,
    /// What readers may see once the pending group is durable.
    view: Arc<crate::read::DurableView>,
    view_update: crate::read::ViewUpdate,
    /// Finished runs kept until their last writes are durable (and a while
    /// after), so a retry or a repeated completion never reads the store
    /// for a run whose final batch may still be on its way.
    retired: BTreeMap<RunId, ActiveRun>,
    /// Retirement order with the commit that carries each run's last write
    /// (`None` until that commit is submitted).
    retired_order: VecDeque<(RunId, Option<u64>)>,
    /// Every commit up to this number is durable (set by the committer).
    durable: Arc<std::sync::atomic::AtomicU64>,
    /// Replies that carry a run snapshot, built once the burst is decided.
    run_replies: Vec<(Reply<pb::Run>, Result<RunId, ApiError>)>,
    /// Writes and effects of the events handled since the last commit.
    batch: Batch,
    effects: Vec<Effect>,
}

impl Engine {
    /// Loads unfinished runs from the store and resumes them.
    pub(crate) fn recover(
        store: Arc<dyn Store>,
        blobs: Arc<BlobStore>,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ApiError> {
        let latest: HashMap<String, PipelineRecord> = store
            .latest_pipelines()?
            .into_iter()
            .map(|record| (record.name.clone(), record))
            .collect();
        let versions = store.pipeline_versions()?;
        let mut top_version: HashMap<String, u32> = HashMap::new();
        for record in &versions {
            let top = top_version.entry(record.name.clone()).or_default();
            *top = (*top).max(record.version);
        }
        let digests = versions
            .into_iter()
            .filter(|record| {
                latest
                    .get(&record.name)
                    .is_some_and(|latest| same_settings(latest, record))
            })
            .map(|record| {
                let digest = version_digest(&record);
                ((record.name, digest), record.version)
            })
            .collect();
        let next_run_id = store.last_run_id()? + 1;
        let mut delivery = delivery::DeliveryController::load(
            store.environments()?,
            store.releases()?,
            metrics.clone(),
        );
        delivery.load_aliases(store.model_aliases()?);
        let mut engine = Self {
            store: store.clone(),
            blobs,
            clock,
            config,
            metrics,
            latest,
            top_version,
            digests,
            deliveries: store
                .deliveries()?
                .into_iter()
                .map(|record| ((record.pipeline, record.key), record.run))
                .collect(),
            specs: HashMap::new(),
            runs: BTreeMap::new(),
            ready: VecDeque::new(),
            pool: pool::AgentPool::new(config.lease_ttl),
            next_run_id,
            delivery,
            delivery_events: Vec::new(),
            checks: Vec::new(),
            secrets_to_open: Vec::new(),
            guard_checks: Vec::new(),
            guard_cleared: BTreeSet::new(),
            guard_pending: BTreeSet::new(),
            parked_deploys: BTreeSet::new(),
            checking: BTreeSet::new(),
            ready_since: HashMap::new(),
            dirty: Dirty::default(),
            view: Arc::new(crate::read::DurableView::default()),
            parsed: Arc::default(),
            view_update: crate::read::ViewUpdate::default(),
            retired: BTreeMap::new(),
            retired_order: VecDeque::new(),
            durable: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            run_replies: Vec::new(),
            batch: Batch::default(),
            effects: Vec::new(),
            release_signer: None,
            secrets: None,
        };
        for record in store.unfinished_runs()? {
            let stages = store.stages(record.id)?;
            match engine.spec(&record.pipeline, record.pipeline_version) {
                Ok(spec) => engine.resume_run(record, stages, spec),
                // One version today's parser refuses must not keep the
                // coordinator down: only the runs that need it fail.
                Err(error) => engine.fail_unparsable_run(record, stages, &error),
            }
        }
        engine.resume_conditions();
        // Everything recovered is durable: readers may see it at once.
        let update = std::mem::take(&mut engine.view_update);
        engine.view.apply(crate::read::ViewUpdate {
            last_run: Some(RunId(next_run_id - 1)),
            pipelines: engine.latest.values().cloned().collect(),
            ..update
        });
        // A lower --max-webhook-deliveries applies at once.
        engine.expire_deliveries();
        // Releases still inside their watch window get their monitor back.
        engine.resume_monitors();
        engine.resume_rollouts();
        engine.update_gauges();
        Ok(engine)
    }

    /// Handles one event; its writes join the pending group.
    pub(crate) fn handle(&mut self, event: Event) {
        match event {
            Event::AgentHello { hello, conn, tx } => self.agent_hello(hello, conn, tx),
            Event::AgentMessage { agent, conn, msg } => self.agent_message(&agent, conn, msg),
            Event::AgentGone { agent, conn } => self.agent_gone(&agent, conn),
            Event::Register { pipeline, reply } => {
                let result = self.register(pipeline);
                self.reply(reply, result);
            }
            Event::Trigger { request, reply } => self.trigger_request(request, reply),
            Event::WatchRun { run, reply } => self.watch_run(run, reply),
            Event::CancelRun { run, reply } => {
                let result = self.cancel_run(run);
                self.reply_run(reply, result);
            }
            Event::RetryStage {
                run,
                stage,
                stored,
                reply,
            } => {
                let result = self.retry_stage(run, &stage, stored);
                self.reply_run(reply, result);
            }
            Event::FollowLogs {
                run,
                stage,
                tap,
                reply,
            } => {
                let result = self.follow_logs(run, stage, tap);
                self.reply(reply, result);
            }
            Event::ListAgents { reply } => {
                let agents = self.pool.views();
                self.reply(reply, Ok(agents));
            }
            Event::DrainAgent { name, reply } => {
                let result = self.drain_agent(&name);
                self.reply(reply, result);
            }
            Event::DecideGate {
                run,
                stage,
                user,
                approve,
                reason,
                reply,
            } => {
                let result = self.decide_gate(run, &stage, &user, approve, &reason);
                self.reply_run(reply, result);
            }
            Event::Rollback {
                environment,
                to,
                user,
                reply,
            } => {
                let reason = format!("manual rollback by {user}");
                let result = self.start_rollback(&environment, to, reason, user, false);
                self.reply_run(reply, result);
            }
            Event::Unfreeze { environment, reply } => {
                let result = self
                    .unfreeze(&environment)
                    .map(|env| views::environment(&env));
                self.reply(reply, result);
            }
            Event::Rollout {
                environment,
                command,
                reply,
            } => {
                let result = self.rollout_command(&environment, command);
                self.reply(reply, result);
            }
            Event::Promote {
                model,
                environment,
                user,
                stored,
                reply,
            } => {
                let result = self.promote(&model, &environment, &user, stored);
                self.reply_run(reply, result);
            }
            Event::SetModelAlias {
                model,
                alias,
                remove,
                user,
                reply,
            } => {
                let result = self.set_model_alias(&model, &alias, remove, &user);
                self.reply(reply, result);
            }
            Event::MonitorSample(observation) => self.observe(observation),
            Event::OutputsChecked {
                agent,
                finished,
                checked,
            } => self.outputs_checked(&agent, finished, checked),
            Event::DeployGuardChecked { check, outdated } => {
                self.deploy_guard_checked(*check, outdated)
            }
            Event::SecretsOpened {
                agent,
                key,
                attempt,
                assign,
                opened,
            } => self.secrets_opened(&agent, key, attempt, *assign, opened),
        }
        // What the run book asked of delivery happens before the next event.
        self.route_delivery();
    }

    /// Periodic work: expire leases.
    pub(crate) fn tick(&mut self) {
        self.expire_leases();
        self.expire_runs();
        self.rollout_tick();
    }

    /// Monitors to start, alerts to send: work for the runner, outside the
    /// engine.
    pub(crate) fn take_requests(
        &mut self,
    ) -> (Vec<MonitorRequest>, Vec<crate::delivery::alerts::Alert>) {
        self.delivery.take_work()
    }

    /// Runs to start again after a rollback (`on_breach: [rollback,
    /// retrain]`), each with the pipeline's latest version: the runner
    /// resolves the newest commit off the loop.
    pub(crate) fn take_retrains(&mut self) -> Vec<crate::triggers::TriggeredRun> {
        let retrains = self.delivery.take_retrains();
        retrains
            .into_iter()
            .filter_map(|retrain| {
                let Some(pipeline) = self.latest.get(&retrain.pipeline).cloned() else {
                    tracing::error!(
                        pipeline = retrain.pipeline,
                        "cannot retrain: the pipeline is gone"
                    );
                    return None;
                };
                Some(crate::triggers::TriggeredRun::new(
                    pipeline,
                    None,
                    "retrain",
                    retrain.triggered_by,
                ))
            })
            .collect()
    }

    /// Output checks to run on the blocking pool; each reports back as an
    /// event.
    pub(crate) fn take_checks(&mut self) -> Vec<checks::OutputCheck> {
        std::mem::take(&mut self.checks)
    }

    /// Secrets to open on the blocking pool; each reports back as an event.
    pub(crate) fn take_secrets_to_open(&mut self) -> Vec<checks::SecretsToOpen> {
        std::mem::take(&mut self.secrets_to_open)
    }

    pub(crate) fn take_guard_checks(&mut self) -> Vec<conditions::GuardCheck> {
        std::mem::take(&mut self.guard_checks)
    }

    /// Pushes ready stages to agents, then returns the pending group.
    /// Where new releases are sent to be signed.
    pub(crate) fn sign_releases_with(&mut self, signer: mpsc::UnboundedSender<u64>) {
        self.release_signer = Some(signer);
    }

    /// The secrets store stages' `secrets:` are read from.
    ///
    /// Stages recovered on an agent get their log maskers here, before the
    /// loop runs, so the loop never opens secrets itself; a stage whose
    /// secrets cannot be opened keeps the reason, and its lines are refused.
    pub(crate) fn with_secrets(&mut self, secrets: Arc<crate::secrets::Secrets>) {
        self.secrets = Some(secrets);
        let held: Vec<(StageKey, Vec<String>)> = self
            .runs
            .values()
            .flat_map(|run| {
                run.stages
                    .iter()
                    .filter(|stage| stage.state.is_held())
                    .filter_map(|stage| {
                        let names = &run.spec.parsed.stages[stage.key.idx as usize].secrets;
                        (!names.is_empty()).then(|| (stage.key, names.clone()))
                    })
            })
            .collect();
        for (key, names) in held {
            let masker = self
                .reveal_secrets(&names)
                .map(|values| Arc::new(kiln_common::masking::Masker::new(values.values())));
            if let Some(run) = self.runs.get_mut(&key.run) {
                run.maskers.insert(key.idx, masker);
            }
        }
    }

    pub(crate) fn take_commit(&mut self) -> (Batch, Vec<Effect>) {
        // Deciding a gate can make more stages ready, and dispatch can hand
        // more gates to delivery: go round until both are settled.
        loop {
            self.route_delivery();
            self.dispatch();
            if self.delivery_events.is_empty() {
                break;
            }
        }
        self.write_dirty(None);
        self.update_gauges();
        for (reply, result) in std::mem::take(&mut self.run_replies) {
            let result = result.and_then(|run| {
                self.snapshot(run)
                    .ok_or_else(|| ApiError::Internal(format!("run {run} left memory unanswered")))
            });
            self.after_commit(move || {
                let _ = reply.send(result);
            });
        }
        let mut effects = std::mem::take(&mut self.effects);
        let update = std::mem::take(&mut self.view_update);
        if !update.is_empty() {
            // First: a client answered by this commit reads what it changed.
            let view = self.view.clone();
            effects.insert(0, Box::new(move || view.apply(update)));
        }
        (std::mem::take(&mut self.batch), effects)
    }

    /// Notes the number of the commit that carries everything taken so far,
    /// and lets go of finished runs whose last write is durable.
    pub(crate) fn committed(&mut self, seq: u64) {
        for entry in self.retired_order.iter_mut().rev() {
            if entry.1.is_some() {
                break;
            }
            entry.1 = Some(seq);
        }
        let durable = self.durable.load(std::sync::atomic::Ordering::Acquire);
        while self.retired_order.len() > RETIRED_KEPT {
            match self.retired_order.front() {
                Some(&(run, Some(seq))) if seq <= durable => {
                    self.retired.remove(&run);
                    self.retired_order.pop_front();
                }
                _ => break,
            }
        }
    }

    /// The parsed pipeline versions, for the API to share.
    pub(crate) fn parsed_pipelines(&self) -> Arc<crate::pipelines::ParsedPipelines> {
        self.parsed.clone()
    }

    /// The shared view readers use; filled by this engine's commits.
    pub(crate) fn durable_view(&self) -> Arc<crate::read::DurableView> {
        self.view.clone()
    }

    /// A run as this engine holds it (unfinished or recently finished).
    fn snapshot(&self, run: RunId) -> Option<pb::Run> {
        self.runs
            .get(&run)
            .or_else(|| self.retired.get(&run))
            .map(|active| views::run(&active.record, &active.stages))
    }

    fn write(&mut self, op: Op) {
        // A run's state goes to its commit's forge too, in the same batch.
        if let Op::Run(run) = &op {
            let target = self
                .latest
                .get(&run.pipeline)
                .and_then(|p| p.status.as_deref());
            if let Some(report) = crate::forge_status::CommitStatusRecord::of(run, target) {
                self.batch.push(Op::CommitStatus(report));
            }
        }
        self.batch.push(op);
    }

    /// Runs `effect` once everything queued so far is durable.
    fn after_commit(&mut self, effect: impl FnOnce() + Send + 'static) {
        self.effects.push(Box::new(effect));
    }

    /// Answers a request once everything it changed (and everything before
    /// it) is durable.
    fn reply<T: Send + 'static>(&mut self, reply: Reply<T>, result: Result<T, ApiError>) {
        self.after_commit(move || {
            let _ = reply.send(result);
        });
    }

    /// Answers with the run as this burst leaves it, once that is durable.
    fn reply_run(&mut self, reply: Reply<pb::Run>, result: Result<RunId, ApiError>) {
        self.run_replies.push((reply, result));
    }

    /// Version `version` of pipeline `name` and the index of its stage
    /// `stage`: a release names the stage that made it, which that version
    /// must still have for a rollback or promote to deploy it again.
    fn spec_with_stage(
        &mut self,
        name: &str,
        version: u32,
        stage: &str,
    ) -> Result<(Arc<PipelineSpec>, usize), ApiError> {
        let spec = self.spec(name, version)?;
        let idx = spec.parsed.stage_idx(stage).ok_or_else(|| {
            ApiError::FailedPrecondition(format!("stage `{stage}` is not in version {version}"))
        })?;
        Ok((spec, idx))
    }

    /// The parsed pipeline version, from cache or store.
    fn spec(&mut self, name: &str, version: u32) -> Result<Arc<PipelineSpec>, ApiError> {
        if let Some(spec) = self.specs.get(&(name.to_owned(), version)) {
            return Ok(spec.clone());
        }
        let record = self.store.pipeline(name, version)?.ok_or_else(|| {
            ApiError::NotFound(format!("pipeline `{name}` has no version {version}"))
        })?;
        let parsed = self
            .parsed
            .get(&record)
            .map_err(|error| ApiError::FailedPrecondition(error.to_string()))?;
        let spec = Arc::new(PipelineSpec::new(record, parsed));
        self.specs.insert((name.to_owned(), version), spec.clone());
        Ok(spec)
    }

    /// The number of `name`'s next version.
    fn next_version(&self, name: &str) -> u32 {
        self.top_version.get(name).map_or(1, |top| top + 1)
    }

    fn register(&mut self, new: NewPipeline) -> Result<(PipelineRecord, bool), ApiError> {
        let version = self.next_version(&new.name);
        let record = PipelineRecord {
            name: new.name,
            version,
            file_name: new.file_name,
            digest: crate::repos::digest(&new.spec_yaml),
            spec_yaml: new.spec_yaml,
            repo: new.repo,
            branch: new.branch,
            subdir: new.subdir,
            registered_ms: self.clock.now_ms(),
            path: new.path,
            repository: new.repository,
            status: new.status,
            poll_ms: new.poll_ms,
            side: false,
        };
        if let Some(latest) = self.latest.get(&record.name) {
            if same_settings(latest, &record) && version_digest(latest) == record.digest {
                return Ok((latest.clone(), false));
            }
            if !same_settings(latest, &record) {
                // Versions with other settings are never reused.
                self.digests.retain(|(name, _), _| *name != record.name);
            }
        }
        tracing::info!(pipeline = %record.name, version, "registered pipeline");
        self.digests
            .insert((record.name.clone(), record.digest.clone()), record.version);
        self.write(Op::Pipeline(record.clone()));
        self.view_update.pipelines.push(record.clone());
        self.top_version.insert(record.name.clone(), record.version);
        self.latest.insert(record.name.clone(), record.clone());
        Ok((record, true))
    }

    fn update_gauges(&self) {
        self.metrics
            .set_engine_gauges(self.runs.len(), self.ready.len(), self.pool.connected());
    }
}

/// Whether two versions build from the same place the same way: a new
/// version with other settings never shares a run's file with an old one.
fn same_settings(a: &PipelineRecord, b: &PipelineRecord) -> bool {
    (
        &a.repo,
        &a.branch,
        &a.subdir,
        &a.path,
        &a.repository,
        &a.status,
        a.poll_ms,
    ) == (
        &b.repo,
        &b.branch,
        &b.subdir,
        &b.path,
        &b.repository,
        &b.status,
        b.poll_ms,
    )
}

/// A version's digest; versions stored before digests get theirs here.
fn version_digest(record: &PipelineRecord) -> String {
    if record.digest.is_empty() {
        crate::repos::digest(&record.spec_yaml)
    } else {
        record.digest.clone()
    }
}

/// Runs the engine until `events` closes, committing after every burst.
/// What the runner needs for delivery work outside the engine.
pub(crate) struct DeliveryRuntime {
    pub(crate) http: crate::delivery::HttpClient,
    pub(crate) alerts: crate::delivery::alerts::AlertSender,
    /// Monitors report back through the engine's own queue.
    pub(crate) events: mpsc::Sender<Event>,
    /// Starts retraining runs the way every trigger starts a run (the
    /// pipeline file read at the newest commit).
    pub(crate) starter: crate::triggers::Starter,
}

pub(crate) async fn run_engine(
    mut engine: Engine,
    mut events: mpsc::Receiver<Event>,
    committer: Committer,
    mut stop: watch::Receiver<bool>,
    delivery: DeliveryRuntime,
) {
    engine.durable = committer.durable();
    let mut monitors = tokio::task::JoinSet::new();
    // The monitor task of each watched release.
    let mut watching: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
    // Leases are checked often enough that expiry is noticed within a small
    // fraction of the TTL.
    let tick_every = (engine.config.lease_ttl / 10).max(Duration::from_millis(20));
    let mut ticker = tokio::time::interval(tick_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { break };
                engine.handle(event);
                // Drain what already waits so one flush serves all of it,
                // but bounded so dispatch and acks are not starved.
                for _ in 0..1024 {
                    match events.try_recv() {
                        Ok(event) => engine.handle(event),
                        Err(_) => break,
                    }
                }
            }
            _ = ticker.tick() => engine.tick(),
            _ = stop.changed() => break,
        }
        let (batch, effects) = engine.take_commit();
        if !batch.is_empty() || !effects.is_empty() {
            let seq = committer.submit(batch, effects);
            engine.committed(seq);
        }
        for check in engine.take_checks() {
            let (blobs, events) = (engine.blobs.clone(), delivery.events.clone());
            tokio::spawn(async move {
                let checked = tokio::task::spawn_blocking(move || check.run(&blobs)).await;
                // A lost result only means the agent sends its completion
                // again after it reconnects.
                if let Ok(event) = checked {
                    let _ = events.send(event).await;
                }
            });
        }
        for check in engine.take_guard_checks() {
            let (repos, events) = (delivery.starter.repos.clone(), delivery.events.clone());
            tokio::spawn(async move {
                let outdated = repos
                    .is_ancestor(&check.repo, &check.commit, &check.live_commit)
                    .await
                    .map_err(|error| error.to_string());
                // A lost answer leaves the stage pending; the next start
                // asks again.
                let _ = events.send(check.answered(outdated)).await;
            });
        }
        for work in engine.take_secrets_to_open() {
            let (secrets, events) = (engine.secrets.clone(), delivery.events.clone());
            tokio::spawn(async move {
                let opened =
                    tokio::task::spawn_blocking(move || work.run(secrets.as_deref())).await;
                // A lost answer leaves the stage assigned with nothing sent:
                // the agent's next hello (or its lease) re-queues it.
                if let Ok(event) = opened {
                    let _ = events.send(event).await;
                }
            });
        }
        let (requests, alerts) = engine.take_requests();
        for alert in alerts {
            delivery.alerts.send(alert);
        }
        for request in requests {
            let clock = engine.clock.clone();
            let release = request.release;
            let task = monitors.spawn(delivery::monitor::watch(
                request,
                delivery.http.clone(),
                delivery.events.clone(),
                stop.clone(),
                move || clock.now_ms(),
            ));
            // A release watched again (restored by a rollback within its
            // first window) has one monitor, not two counting each breach.
            if let Some(previous) = watching.insert(release, task) {
                previous.abort();
            }
        }
        for run in engine.take_retrains() {
            let (starter, alerts) = (delivery.starter.clone(), delivery.alerts.clone());
            tokio::spawn(async move {
                let pipeline = run.pipeline.name.clone();
                match starter.start(run).await {
                    Ok(run) => {
                        tracing::info!(%pipeline, run = run.id, "retraining after a rollback")
                    }
                    Err(error) => {
                        let summary = format!(
                            "cannot start the retraining run of `{pipeline}` after its rollback: {error}"
                        );
                        tracing::error!(%pipeline, %error, "{summary}");
                        alerts.send(crate::delivery::alerts::Alert {
                            name: "KilnRetrainFailed".into(),
                            severity: "warning".into(),
                            labels: [("pipeline".to_owned(), pipeline)].into(),
                            description: summary.clone(),
                            summary,
                            starts_at: std::time::SystemTime::now(),
                            ends_at: None,
                        });
                    }
                }
            });
        }
        while monitors.try_join_next().is_some() {}
        watching.retain(|_, task| !task.is_finished());
    }
    let (batch, effects) = engine.take_commit();
    committer.submit(batch, effects);
    // Monitors see the same stop signal; wait for them to return.
    drop(delivery);
    while monitors.join_next().await.is_some() {}
    // Dropping the engine closes every agent stream.
    drop(engine);
    tracing::info!("engine stopped");
}
