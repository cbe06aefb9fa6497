//! Durable state: the records the coordinator keeps and the small [`Store`]
//! trait they live behind.
//!
//! sled is an implementation detail of [`sled_store`]; nothing else in the
//! crate names it. Writes arrive as a [`Batch`] that is applied atomically
//! (one transition = one batch) and made durable by [`Store::flush`], which
//! the group committer calls once for many batches.

mod keys;
mod migrate;
mod rollout;
mod security;
mod sled_store;

use std::collections::BTreeMap;

use kiln_common::ids::{EnvKey, RunId, StageKey};
use serde::{Deserialize, Serialize};

pub(crate) use crate::state::{RunState, StageState};
pub(crate) use rollout::{
    AnalysisRound, MAX_ROUNDS, RolloutKind, RolloutOutcome, RolloutPhase, RolloutRecord,
};
pub(crate) use security::{AuditRecord, Role, SecretRecord, TokenRecord};
pub(crate) use sled_store::{RawWriter, SledStore};

/// The schema version this coordinator writes (and migrates older stores
/// to); a backup records it.
pub(crate) const SCHEMA_VERSION: u32 = migrate::CURRENT;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record under key {key}: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    /// The data directory was written by a newer coordinator.
    #[error(
        "the store in {dir} has schema version {found}, newer than this coordinator knows \
         (up to {known}); nothing was changed: run the coordinator release that wrote it, \
         or a newer one"
    )]
    FutureSchema { dir: String, found: u32, known: u32 },
    /// A migration found data it cannot carry over.
    #[error(
        "cannot migrate the store in {dir} from schema version {from} to {to}: {why}; \
         nothing was changed: fix or remove that record, or start the previous coordinator \
         release on this directory"
    )]
    Migration {
        dir: String,
        from: u32,
        to: u32,
        why: String,
    },
}

pub(crate) type Result<T> = std::result::Result<T, StoreError>;

/// One registered version of a pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct PipelineRecord {
    pub(crate) name: String,
    pub(crate) version: u32,
    pub(crate) file_name: String,
    pub(crate) spec_yaml: String,
    pub(crate) repo: String,
    pub(crate) branch: String,
    pub(crate) subdir: String,
    pub(crate) registered_ms: u64,
    /// The pipeline file's path inside the repository when every run reads
    /// it at its own commit; "" for a registered snapshot (runs use
    /// `spec_yaml`).
    #[serde(default)]
    pub(crate) path: String,
    /// "sha256:<hex>" of `spec_yaml` ("" in versions stored before it).
    #[serde(default)]
    pub(crate) digest: String,
    /// The repository's name (`kiln repo add --name`), "" if none.
    #[serde(default)]
    pub(crate) repository: String,
    /// Where runs report their state on their commit (`kiln repo add
    /// --status`), if anywhere.
    #[serde(default)]
    /// Boxed: most pipelines have none, and the record travels inside
    /// engine events.
    pub(crate) status: Option<Box<crate::forge_status::StatusTarget>>,
    /// How often the repository is polled for new commits (`kiln repo add
    /// --poll`), in ms; 0 = never.
    #[serde(default)]
    pub(crate) poll_ms: u64,
    /// Read at the commit of a run that did not build the registered
    /// branch (another branch, a tag, a pinned commit): stored for its
    /// runs, never the pipeline's current version, whose triggers,
    /// settings and page are the newest version that is not a side one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) side: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunRecord {
    pub(crate) id: RunId,
    pub(crate) pipeline: String,
    pub(crate) pipeline_version: u32,
    pub(crate) commit: String,
    pub(crate) rev: String,
    pub(crate) state: RunState,
    pub(crate) triggered_by: String,
    pub(crate) created_ms: u64,
    pub(crate) finished_ms: Option<u64>,
    /// An uploaded source snapshot the run uses instead of a git checkout.
    #[serde(default)]
    pub(crate) source_digest: Option<String>,
    /// Set for a run the coordinator started to put a release back.
    #[serde(default)]
    pub(crate) rollback: Option<RollbackPlan>,
    /// Datasets the run was given (a `data` trigger's snapshot).
    #[serde(default)]
    pub(crate) datasets: Vec<DatasetRecord>,
    /// "sha256:<hex>" of the pipeline file read at the run's commit (even
    /// one that did not parse); "" for a run of a registered snapshot.
    #[serde(default)]
    pub(crate) pipeline_digest: String,
    /// The run's `params:` values, defaults filled in.
    #[serde(default)]
    pub(crate) params: BTreeMap<String, String>,
    /// What started the run, as stages see it (`KILN_EVENT`, and
    /// `KILN_BRANCH`, `KILN_TAG`, `KILN_MR_ID` where they apply).
    #[serde(default)]
    pub(crate) variables: BTreeMap<String, String>,
    /// Set for a run `kiln promote` started to deploy an existing model
    /// version to another environment.
    #[serde(default)]
    pub(crate) promote: Option<PromotePlan>,
    /// The pipeline's `concurrency:` group as this run rendered it: runs
    /// of one pipeline and group never overlap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) group: Option<String>,
    /// Created while an older run of its group was under way: no stage
    /// starts until the older runs have ended.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) waiting: bool,
}

#[cfg(test)]
impl PipelineRecord {
    /// Version `version` of `name` registered from branch `main` as the
    /// snapshot `yaml`; tests set what else they need.
    pub(crate) fn for_test(name: &str, version: u32, yaml: &str) -> Self {
        Self {
            name: name.into(),
            version,
            file_name: "kiln.yml".into(),
            spec_yaml: yaml.into(),
            repo: String::new(),
            branch: "main".into(),
            subdir: String::new(),
            registered_ms: 0,
            path: String::new(),
            digest: String::new(),
            repository: String::new(),
            status: None,
            poll_ms: 0,
            side: false,
        }
    }
}

#[cfg(test)]
impl RunRecord {
    /// A run of `pipeline` at commit `c` of `main` (version 1), started by
    /// `test` at time 0 and not finished; tests set what else they need.
    pub(crate) fn for_test(id: u64, pipeline: &str, state: RunState) -> Self {
        RunRecord {
            id: RunId(id),
            pipeline: pipeline.into(),
            pipeline_version: 1,
            commit: "c".into(),
            rev: "main".into(),
            state,
            triggered_by: "test".into(),
            created_ms: 0,
            finished_ms: None,
            source_digest: None,
            rollback: None,
            datasets: Vec::new(),
            pipeline_digest: String::new(),
            params: Default::default(),
            variables: Default::default(),
            promote: None,
            group: None,
            waiting: false,
        }
    }
}

/// A snapshot of a watched data location, stored as a blob.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct DatasetRecord {
    /// The watched location, e.g. "/srv/data/raw".
    pub(crate) source: String,
    /// Workspace path the stages find it at.
    pub(crate) path: String,
    /// "sha256:<hex>" of the packed snapshot blob.
    pub(crate) digest: String,
    /// "sha256:<hex>" over the files' names and contents.
    pub(crate) content_digest: String,
}

/// A webhook delivery that started a run, by one of its idempotency keys
/// (the forge's delivery id, or the event, ref and commit): a delivery
/// seen again starts nothing. Written in the batch of the run it started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct DeliveryRecord {
    pub(crate) pipeline: String,
    pub(crate) key: String,
    pub(crate) run: RunId,
}

/// What a pipeline's schedule and data triggers last did; written in the
/// same batch as the run they started, so a restart neither repeats nor
/// forgets one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct TriggerStateRecord {
    pub(crate) pipeline: String,
    /// The schedule slot (ms) that last started a run.
    pub(crate) last_fired_ms: Option<u64>,
    /// The content digest of the watched data that last started a run.
    pub(crate) data_digest: Option<String>,
    /// Branches and tags (full ref → commit) the last poll of the
    /// repository saw (`kiln repo add --poll`); `None` before the first.
    #[serde(default)]
    pub(crate) refs: Option<BTreeMap<String, String>>,
}

/// A release's signed provenance (written once, by the signer).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ProvenanceRecord {
    pub(crate) release: u64,
    /// The DSSE envelope exactly as signed.
    pub(crate) envelope_json: String,
    pub(crate) statement_json: String,
    pub(crate) key_id: String,
    /// "sha256:<hex>" of `envelope_json`.
    pub(crate) digest: String,
}

/// A rollback run re-runs one environment stage with a release's exact
/// artifacts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct RollbackPlan {
    pub(crate) environment: EnvKey,
    /// The release being replaced.
    pub(crate) from: u64,
    /// The release being restored.
    pub(crate) to: u64,
    pub(crate) stage: String,
    /// The restored release's artifacts, by digest.
    pub(crate) inputs: Vec<StageArtifact>,
    pub(crate) reason: String,
    /// The monitor said `on_breach: [rollback, retrain]`: once the
    /// rollback succeeds, the pipeline runs again on its newest commit.
    #[serde(default)]
    pub(crate) retrain: bool,
    /// Set for a run that deploys one step of a rollout (`to` at
    /// `weight`), or restores `to` at 100% after an abort; such a run
    /// re-deploys fixed artifacts like a rollback, but the rollout decides
    /// what its end means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rollout: Option<RolloutStep>,
}

/// What a rollout's run deploys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct RolloutStep {
    /// The step (index into the rollout's `steps`).
    pub(crate) step: usize,
    /// Traffic percent given as `KILN_TRAFFIC_WEIGHT`.
    pub(crate) weight: u32,
    /// The previous release put back at 100% after an abort.
    pub(crate) restore: bool,
    /// How many steps the rollout has (0 in records from before it was
    /// kept).
    #[serde(default)]
    pub(crate) steps: usize,
    /// The model version the run deploys, if its release is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) model: Option<ModelVersion>,
}

impl RollbackPlan {
    /// What kind of run carries this plan: `rollback`, `rollout_step` or
    /// `rollout_restore`.
    pub(crate) fn kind(&self) -> &'static str {
        match &self.rollout {
            None => "rollback",
            Some(step) if step.restore => "rollout_restore",
            Some(_) => "rollout_step",
        }
    }

    /// What the run is for, in one line: "rollout step 2/3 of caravan@4
    /// to production at 50%", "roll back shop/production from release 3
    /// to release 2: …".
    pub(crate) fn describe(&self) -> String {
        let Some(step) = &self.rollout else {
            return format!(
                "roll back `{}` from release {} to release {}: {}",
                self.environment, self.from, self.to, self.reason
            );
        };
        let what = match &step.model {
            Some(model) => format!("{model} (release {})", self.to),
            None => format!("release {}", self.to),
        };
        let environment = &self.environment.name;
        if step.restore {
            return format!(
                "restore {what} in {environment} at 100% after the aborted rollout of release {}",
                self.from
            );
        }
        let of = if step.steps > 0 {
            format!("{}/{}", step.step + 1, step.steps)
        } else {
            (step.step + 1).to_string()
        };
        format!(
            "rollout step {of} of {what} to {environment} at {}%",
            step.weight
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct StageRecord {
    pub(crate) key: StageKey,
    /// Copied from the pipeline version so a stored run reads on its own.
    pub(crate) name: String,
    pub(crate) needs: Vec<String>,
    pub(crate) state: StageState,
    /// Starts at 1; every re-dispatch increments it, which fences off the
    /// agent that held the previous attempt.
    pub(crate) attempt: u32,
    /// Re-dispatches charged against the stage's `retries` (lost agents,
    /// infrastructure errors); hand-backs and manual retries are free.
    pub(crate) retries_used: u32,
    pub(crate) agent: Option<String>,
    pub(crate) started_ms: Option<u64>,
    pub(crate) finished_ms: Option<u64>,
    pub(crate) exit_code: Option<i32>,
    pub(crate) message: String,
    /// Log lines of the current attempt stored so far.
    pub(crate) next_log_seq: u64,
    /// Bytes of log text of the current attempt stored so far.
    #[serde(default)]
    pub(crate) log_bytes: u64,
    /// The current attempt's log hit a limit; later lines are dropped.
    #[serde(default)]
    pub(crate) log_truncated: bool,
    /// The image the last attempt ran in, by digest (docker executor).
    #[serde(default)]
    pub(crate) image_digest: Option<String>,
    /// What the last attempt uploaded.
    #[serde(default)]
    pub(crate) outputs: Vec<ArtifactRecord>,
    /// Parsed by the coordinator from the stage's `metrics:` file; `None`
    /// values were NaN.
    #[serde(default)]
    pub(crate) metrics: BTreeMap<String, Option<f64>>,
    /// A gate's decision and the values that decided it.
    #[serde(default)]
    pub(crate) gate: Option<GateDecision>,
    /// The GPU devices the current attempt holds on its agent, so a
    /// restarted coordinator reserves the same ones again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) gpus: Vec<u32>,
    /// Skipped for a reason a retry does not undo: its own `if:` or
    /// `changes:` was false, the outdated-deploy guard skipped it, or a
    /// stage it needs was skipped so. Retrying a failed stage upstream
    /// reopens the stages its failure skipped, never these.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) settled: bool,
}

/// What a gate decided, with every check's inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct GateDecision {
    pub(crate) passed: bool,
    pub(crate) checks: Vec<GateCheck>,
    /// One line for people: why it passed or failed.
    pub(crate) summary: String,
    pub(crate) decided_ms: u64,
    /// Who approved or rejected a manual gate.
    #[serde(default)]
    pub(crate) decided_by: Option<String>,
    /// A best-of gate's pick, with every candidate's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) selection: Option<Selection>,
}

/// What a best-of gate (`select:`) chose among the stages it needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Selection {
    pub(crate) metric: String,
    /// Each candidate stage with its value of `metric` (`None`: missing).
    pub(crate) candidates: Vec<(String, Option<f64>)>,
    /// The winner; `None` when no candidate had a value.
    pub(crate) winner: Option<String>,
}

impl Selection {
    /// Candidates that lost: their metrics and artifacts go no further.
    pub(crate) fn losers(&self) -> impl Iterator<Item = &str> {
        self.candidates
            .iter()
            .map(|(name, _)| name.as_str())
            .filter(move |name| self.winner.as_deref() != Some(*name))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct GateCheck {
    pub(crate) metric: String,
    /// e.g. ">= 0.9", or "regression <= 0.02 vs production".
    pub(crate) rule: String,
    pub(crate) value: Option<f64>,
    pub(crate) champion: Option<f64>,
    pub(crate) passed: bool,
    /// Set when a missing or NaN value decided the check.
    pub(crate) decided_by_on_missing: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ReleaseState {
    Live,
    Superseded,
    RolledBack,
    /// Being rolled out (`strategy:`): takes part of the traffic, not live.
    RollingOut,
    /// Its rollout was aborted; the previous release stayed (or was put
    /// back) at 100%.
    Aborted,
}

/// A model that went live in an environment, with its lineage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ReleaseRecord {
    pub(crate) id: u64,
    /// The environment of the pipeline (`pipeline`) that made it.
    pub(crate) environment: EnvKey,
    pub(crate) run: RunId,
    pub(crate) pipeline: String,
    pub(crate) pipeline_version: u32,
    pub(crate) commit: String,
    pub(crate) source_digest: Option<String>,
    /// The stage that deployed it.
    pub(crate) stage: String,
    /// What it deployed (inputs of that stage) and what it produced.
    pub(crate) artifacts: Vec<StageArtifact>,
    pub(crate) image_digest: Option<String>,
    pub(crate) metrics: BTreeMap<String, Option<f64>>,
    /// Gate decisions of the run, by gate stage.
    pub(crate) gates: Vec<(String, GateDecision)>,
    pub(crate) triggered_by: String,
    pub(crate) created_ms: u64,
    pub(crate) state: ReleaseState,
    /// Why it was rolled back, with the observed values.
    pub(crate) reason: Option<String>,
    /// A monitor watches it until then.
    pub(crate) monitor_until_ms: Option<u64>,
    /// Set for a release made live again by a rollback.
    #[serde(default)]
    pub(crate) restored_by_rollback: bool,
    /// Where it is served (the stage's `endpoint:`), as its stage and the
    /// stages after it got it in `KILN_ENDPOINT`.
    #[serde(default)]
    pub(crate) endpoint: Option<String>,
    /// The model version it is (the environment stage's `model:`).
    #[serde(default)]
    pub(crate) model: Option<ModelVersion>,
    /// Set for a release `kiln promote` made: who decided, when, from
    /// which release (its gates' re-checked values are in `gates`).
    #[serde(default)]
    pub(crate) promotion: Option<Promotion>,
    /// How it was rolled out (`strategy:`): steps, every analysis round,
    /// the decision. Set once the rollout ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rollout: Option<RolloutRecord>,
}

#[cfg(test)]
impl ReleaseRecord {
    /// Release `id` of run `run` into `environment`, made by stage
    /// `deploy` of version 1 at commit `c` with no artifacts, live; tests
    /// set what else they need.
    pub(crate) fn for_test(id: u64, environment: EnvKey, run: u64) -> Self {
        ReleaseRecord {
            id,
            pipeline: environment.pipeline().to_owned(),
            environment,
            run: RunId(run),
            pipeline_version: 1,
            commit: "c".into(),
            source_digest: None,
            stage: "deploy".into(),
            artifacts: Vec::new(),
            image_digest: None,
            metrics: BTreeMap::new(),
            gates: Vec::new(),
            triggered_by: "test".into(),
            created_ms: 0,
            state: ReleaseState::Live,
            reason: None,
            monitor_until_ms: None,
            restored_by_rollback: false,
            endpoint: None,
            model: None,
            promotion: None,
            rollout: None,
        }
    }
}

impl ReleaseRecord {
    /// What deploying this release again is fed: its artifacts by digest,
    /// its own environment stage's outputs left out. Rollbacks, rollout
    /// steps and promotes all deploy exactly these.
    pub(crate) fn redeploy_inputs(&self) -> Vec<StageArtifact> {
        self.artifacts
            .iter()
            .filter(|artifact| artifact.stage != self.stage)
            .cloned()
            .collect()
    }
}

/// `name@version`: a release is a version of the model its environment
/// stage names; every release of one run is the same version.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub(crate) struct ModelVersion {
    pub(crate) name: String,
    pub(crate) version: u32,
}

impl std::fmt::Display for ModelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// How a promoted release came to be.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Promotion {
    /// Who asked (`kiln promote`).
    pub(crate) by: String,
    pub(crate) at_ms: u64,
    /// The release whose artifacts and image it deploys.
    pub(crate) from_release: u64,
}

/// What a promote run deploys: an existing release's exact artifacts into
/// another environment, after that environment's gates passed again on
/// the version's recorded metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct PromotePlan {
    pub(crate) environment: EnvKey,
    pub(crate) model: ModelVersion,
    pub(crate) from_release: u64,
    /// The environment stage that deploys it.
    pub(crate) stage: String,
    /// The source release's artifacts, by digest (its own deploy stage's
    /// outputs left out).
    pub(crate) inputs: Vec<StageArtifact>,
    /// The metrics the gates were checked on.
    pub(crate) metrics: BTreeMap<String, Option<f64>>,
    /// The gate stages that took part (decided at the request).
    pub(crate) gates: Vec<String>,
    pub(crate) by: String,
    pub(crate) at_ms: u64,
}

/// A user-set alias of a model (`champion`, `challenger`); the aliases
/// named after environments follow the live releases and are not stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ModelAliasRecord {
    pub(crate) model: String,
    pub(crate) alias: String,
    pub(crate) version: u32,
    pub(crate) set_by: String,
    pub(crate) set_ms: u64,
}

/// An artifact with the stage that produced it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StageArtifact {
    pub(crate) stage: String,
    pub(crate) artifact: ArtifactRecord,
}

/// An environment of one pipeline: which release is live and whether
/// promotions stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct EnvironmentRecord {
    pub(crate) key: EnvKey,
    pub(crate) live: Option<u64>,
    /// Set by a monitor with `on_breach: freeze`: no promotions until
    /// unfrozen.
    pub(crate) frozen: Option<String>,
    /// A rollout in progress (`strategy:`); no other release deploys here
    /// meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rollout: Option<RolloutRecord>,
}

impl EnvironmentRecord {
    /// An environment nothing went live in yet.
    pub(crate) fn new(key: EnvKey) -> Self {
        Self {
            key,
            live: None,
            frozen: None,
            rollout: None,
        }
    }
}

/// A stage output: a packed workspace path stored as a blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ArtifactRecord {
    pub(crate) path: String,
    pub(crate) digest: String,
    pub(crate) size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LogStream {
    Stdout,
    Stderr,
    System,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct LogLine {
    pub(crate) stream: LogStream,
    pub(crate) text: String,
    pub(crate) at_ms: u64,
}

/// A stored log line with its place.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StoredLog {
    pub(crate) key: StageKey,
    pub(crate) attempt: u32,
    pub(crate) seq: u64,
    pub(crate) line: LogLine,
}

/// A key written (`Some` value) or removed (`None`), as `apply` wrote it.
pub(crate) type RawWrite = (Vec<u8>, Option<Vec<u8>>);

/// Writes applied atomically as one unit.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) ops: Vec<Op>,
}

#[derive(Debug)]
pub(crate) enum Op {
    Release(ReleaseRecord),
    Environment(EnvironmentRecord),
    Pipeline(PipelineRecord),
    Run(RunRecord),
    Stage(StageRecord),
    Log(StoredLog),
    Token(TokenRecord),
    Secret(SecretRecord),
    RemoveSecret(String),
    Audit(AuditRecord),
    Provenance(ProvenanceRecord),
    TriggerState(TriggerStateRecord),
    Delivery(DeliveryRecord),
    MonitorSample(MonitorSampleRecord),
    Cache(CacheRecord),
    /// Deletes a finished run (retention): its record, stages and log
    /// lines. A run that is unfinished when the batch is applied (retried
    /// since it was chosen) is left alone.
    DeleteRun(RunId),
    /// Forgets a shared cache entry: (pipeline, key).
    RemoveCache(String, String),
    /// Records a `kiln cache clear` (agents drop copies saved before it).
    CacheCleared(CacheClearedRecord),
    /// Forgets a key's clear marker, made redundant by a clear of the
    /// whole pipeline: (pipeline, key).
    RemoveCacheCleared(String, String),
    /// A sample thinned out of the history (see `delivery::history`).
    RemoveMonitorSample {
        release: u64,
        at_ms: u64,
    },
    ModelAlias(ModelAliasRecord),
    /// Forgets a user-set alias: (model, alias).
    RemoveModelAlias(String, String),
    /// Forgets a webhook delivery key: (pipeline, key).
    RemoveDelivery(String, String),
    /// Queues a commit status report (`forge_status`), replacing the one
    /// queued for the same commit and context.
    CommitStatus(crate::forge_status::CommitStatusRecord),
    /// Dequeues a sent report, unless a newer one replaced it since.
    RemoveCommitStatus(crate::forge_status::CommitStatusRecord),
}

/// A shared cache entry: the archives an agent saved under a pipeline's
/// rendered cache key. GC keeps its blobs until it expires.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct CacheRecord {
    pub(crate) pipeline: String,
    pub(crate) key: String,
    pub(crate) archives: Vec<ArtifactRecord>,
    pub(crate) created_ms: u64,
    pub(crate) agent: String,
}

/// The last `kiln cache clear` of a pipeline's cache key (`key` "": of all
/// its keys). `generation` only grows; an agent's own copy saved while an
/// older generation was in force is dropped instead of restored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct CacheClearedRecord {
    pub(crate) pipeline: String,
    pub(crate) key: String,
    /// The coordinator's clock at the clear (ms), raised past the previous
    /// generation if the clock did not move.
    pub(crate) generation: u64,
}

/// One round of a release's monitor: what it read and whether it breached.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct MonitorSampleRecord {
    pub(crate) release: u64,
    pub(crate) at_ms: u64,
    /// Value per `rollback_when` metric (`None`: empty result).
    pub(crate) values: BTreeMap<String, Option<f64>>,
    /// Why the source could not be read, if it could not.
    pub(crate) error: Option<String>,
    pub(crate) breached: bool,
}

impl Batch {
    pub(crate) fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub(crate) fn push(&mut self, op: Op) {
        self.ops.push(op);
    }
}

/// The coordinator's durable state.
pub(crate) trait Store: Send + Sync + 'static {
    /// Applies every op of `batch` atomically (not yet durable).
    fn apply(&self, batch: &Batch) -> Result<()>;
    /// Makes everything applied so far durable.
    fn flush(&self) -> Result<()>;
    /// Up to `limit` stored keys and values in key order, after `after`
    /// (from the first key when `None`): an online backup's scan.
    fn raw_page(&self, after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Starts (`on`) or stops recording every write `apply` makes, and
    /// returns what was recorded since it last started. A backup records
    /// while it scans, so replaying the recorded writes over its scan gives
    /// the store as it was when recording stopped.
    fn record_writes(&self, on: bool) -> Vec<RawWrite>;

    fn pipeline(&self, name: &str, version: u32) -> Result<Option<PipelineRecord>>;
    /// The current version of every pipeline, by name: the newest that is
    /// not a side version.
    fn latest_pipelines(&self) -> Result<Vec<PipelineRecord>>;
    /// Every stored version of every pipeline, by name then version.
    fn pipeline_versions(&self) -> Result<Vec<PipelineRecord>>;
    fn run(&self, id: RunId) -> Result<Option<RunRecord>>;
    /// Newest first, at most `limit`, none above `up_to` (readers pass the
    /// durable watermark; the engine's own callers `RunId(u64::MAX)`).
    fn runs(&self, pipeline: Option<&str>, up_to: RunId, limit: usize) -> Result<Vec<RunRecord>>;
    /// Runs that are not finished, oldest first.
    fn unfinished_runs(&self) -> Result<Vec<RunRecord>>;
    /// The highest run id ever used (0 when none).
    fn last_run_id(&self) -> Result<u64>;
    fn stages(&self, run: RunId) -> Result<Vec<StageRecord>>;
    /// One page of an attempt's stored lines: `from_seq <= seq < below_seq`,
    /// at most `max_lines` of them. Callers page through a log; nothing
    /// reads a whole log into memory.
    fn log_page(
        &self,
        key: StageKey,
        attempt: u32,
        from_seq: u64,
        below_seq: u64,
        max_lines: usize,
    ) -> Result<Vec<StoredLog>>;
    fn release(&self, id: u64) -> Result<Option<ReleaseRecord>>;
    /// Every release, oldest first.
    fn releases(&self) -> Result<Vec<ReleaseRecord>>;
    fn environments(&self) -> Result<Vec<EnvironmentRecord>>;
    fn tokens(&self) -> Result<Vec<TokenRecord>>;
    fn secret(&self, name: &str) -> Result<Option<SecretRecord>>;
    /// Every secret, by name.
    fn secrets(&self) -> Result<Vec<SecretRecord>>;
    /// The newest `limit` audit records, newest first.
    fn audit(&self, limit: usize) -> Result<Vec<AuditRecord>>;
    /// The highest audit id used (0 when none).
    fn last_audit_id(&self) -> Result<u64>;
    fn provenance(&self, release: u64) -> Result<Option<ProvenanceRecord>>;
    fn trigger_state(&self, pipeline: &str) -> Result<Option<TriggerStateRecord>>;
    /// Every webhook delivery that started a run.
    fn deliveries(&self) -> Result<Vec<DeliveryRecord>>;
    /// Every queued commit status report, oldest commit key first.
    fn commit_statuses(&self) -> Result<Vec<crate::forge_status::CommitStatusRecord>>;
    /// The newest `limit` monitor samples of `release`, oldest first.
    fn monitor_samples(&self, release: u64, limit: usize) -> Result<Vec<MonitorSampleRecord>>;
    fn cache(&self, pipeline: &str, key: &str) -> Result<Option<CacheRecord>>;
    /// Shared cache entries of `pipeline` (every pipeline's for `None`), by
    /// pipeline and key.
    fn caches(&self, pipeline: Option<&str>) -> Result<Vec<CacheRecord>>;
    /// The clear markers of `pipeline`'s caches (the whole pipeline's has
    /// key "").
    fn caches_cleared(&self, pipeline: &str) -> Result<Vec<CacheClearedRecord>>;
    /// Every user-set model alias, by model and alias.
    fn model_aliases(&self) -> Result<Vec<ModelAliasRecord>>;
}
