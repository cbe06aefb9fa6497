//! When a run's stages start at all: their `if:`/`changes:` conditions,
//! the pipeline's `concurrency:` group, and the outdated-deploy guard.
//!
//! - Conditions are decided once, when the run is created, from what
//!   started it (branch, tag, event, merge request, parameters) and the
//!   paths its commit changed (found off the loop by the starter). A stage
//!   whose condition is false is `skipped` with the reason, and so is
//!   every stage that needs it, transitively.
//! - Runs of one pipeline whose `concurrency:` group renders to the same
//!   name never overlap. With `cancel_in_progress` a new run cancels the
//!   older ones — except an environment stage an agent already holds,
//!   which finishes (and releases) first, while nothing after it starts.
//!   Without it the new run is created `waiting` and its first stages
//!   become ready only when the older runs of its group have ended.
//! - An environment stage about to become ready, in a run that is not a
//!   rollback, whose environment's live release was built from another
//!   commit, waits (still `pending`) while the runner asks git whether
//!   that commit descends from this run's commit; if it does, the stage is
//!   skipped: an older commit never replaces a newer one's release.
//!
//! **Architecture Invariant:** a deploy of commit C never starts while the
//! live release of its environment was built from a descendant of C,
//! unless it is a rollback.

use kiln_common::ids::{EnvKey, RunId, StageKey};
use kiln_common::spec::Facts;

use super::{Engine, Event};
use crate::store::{RunRecord, StageState};

/// An environment stage waiting for the guard's answer.
#[derive(Clone, Debug)]
pub(crate) struct GuardCheck {
    pub(super) key: StageKey,
    /// The pipeline's repository, where git compares the commits.
    pub(crate) repo: String,
    /// The run's commit.
    pub(crate) commit: String,
    /// The live release: its id and commit, and its environment's name.
    pub(super) live_release: u64,
    pub(crate) live_commit: String,
    pub(super) environment: String,
}

impl GuardCheck {
    /// The answer as the engine's event: `Ok(true)` when the live commit
    /// descends from the run's, so the deploy is outdated.
    pub(crate) fn answered(self, outdated: Result<bool, String>) -> Event {
        Event::DeployGuardChecked {
            check: Box::new(self),
            outdated,
        }
    }
}

impl Engine {
    /// Decides a new run's conditions and concurrency, then readies the
    /// stages that can start. `changed`: the paths its commit changed
    /// (`None`: everything).
    pub(super) fn start_new_run(&mut self, run: RunId, changed: Option<Vec<String>>) {
        let Some(active) = self.runs.get(&run) else {
            return;
        };
        let spec = active.spec.clone();
        let record = active.record.clone();
        let facts = Facts {
            pipeline: &record.pipeline,
            variables: &record.variables,
            params: &record.params,
            changed: changed.as_deref(),
        };
        let unwanted: Vec<(usize, String)> = spec
            .parsed
            .stages
            .iter()
            .enumerate()
            .filter_map(|(idx, stage)| {
                let reason = stage.condition.as_ref()?.decide(&facts).err()?;
                Some((idx, reason))
            })
            .collect();
        let group = spec.parsed.concurrency.as_ref().map(|concurrency| {
            (
                concurrency.group.render(&facts),
                concurrency.cancel_in_progress,
            )
        });
        for (idx, reason) in unwanted {
            let key = StageKey {
                run,
                idx: idx as u32,
            };
            tracing::info!(stage = %key, %reason, "stage skipped by its condition");
            if self.skip_settled(key, reason) {
                let name = spec.parsed.stages[idx].name.clone();
                self.skip_dependents_of_skipped(key, &spec, &name);
            }
        }
        let mut waiting = false;
        if let Some((group, cancel)) = group {
            let older = self.group_runs(&record.pipeline, &group, run);
            if cancel {
                for older in older {
                    self.supersede(older, run, &group);
                }
            } else if !older.is_empty() {
                tracing::info!(run = %run, %group, "run waits for the older runs of its concurrency group");
                waiting = true;
            }
            if let Some(active) = self.runs.get_mut(&run) {
                active.record.group = Some(group);
                active.record.waiting = waiting;
            }
            self.save_run(run);
        }
        if !waiting {
            self.ready_roots(run);
        }
        self.finish_run_if_done(run);
    }

    /// Unfinished runs of `pipeline` in `group`, other than `except`,
    /// oldest first.
    fn group_runs(&self, pipeline: &str, group: &str, except: RunId) -> Vec<RunId> {
        self.runs
            .values()
            .filter(|active| {
                active.record.id != except
                    && active.record.pipeline == pipeline
                    && active.record.group.as_deref() == Some(group)
                    && !active.record.state.is_finished()
            })
            .map(|active| active.record.id)
            .collect()
    }

    /// Readies every pending stage of `run` whose needs have all passed
    /// (the first stages of a new run; after a restart, also a stage whose
    /// guard answer was lost).
    fn ready_roots(&mut self, run: RunId) {
        let Some(active) = self.runs.get(&run) else {
            return;
        };
        let spec = active.spec.clone();
        let ready: Vec<StageKey> = active
            .stages
            .iter()
            .filter(|stage| stage.state == StageState::Pending)
            .filter(|stage| {
                spec.parsed.stages[stage.key.idx as usize]
                    .needs
                    .iter()
                    .all(|&need| super::runs::passes(&active.stages[need], &spec))
            })
            .map(|stage| stage.key)
            .collect();
        for key in ready {
            self.make_ready(key);
        }
    }

    /// Cancels `run` for the newer `by` of the same group; an environment
    /// stage an agent holds (or one rolling out) goes on to its end, and
    /// nothing starts after.
    fn supersede(&mut self, run: RunId, by: RunId, group: &str) {
        let Some(active) = self.runs.get_mut(&run) else {
            return;
        };
        let spec = active.spec.clone();
        active.record.waiting = false;
        tracing::info!(run = %run, by = %by, %group, "run superseded in its concurrency group");
        let message = format!("cancelled: superseded by run {by} of concurrency group `{group}`");
        let keys: Vec<StageKey> = active.stages.iter().map(|stage| stage.key).collect();
        for key in keys {
            let Some(stage) = self.stage(key) else {
                continue;
            };
            if stage.state.is_finished() {
                continue;
            }
            // A rollout the stage started goes on too: the run ends with it.
            let deploying = (stage.state.is_held()
                && spec.parsed.stages[key.idx as usize].environment.is_some())
                || stage.state == StageState::RollingOut;
            if deploying {
                tracing::info!(stage = %key, "environment stage of a superseded run finishes first");
                continue;
            }
            if stage.state.is_held()
                && let Some(agent) = stage.agent.clone()
            {
                let attempt = stage.attempt;
                self.send_cancel(&agent, key, attempt, &message);
            }
            self.end_attempt(key, StageState::Cancelled, None, message.clone());
        }
        self.save_run(run);
        self.finish_run_if_done(run);
    }

    /// After a run of a group ended: the oldest waiting run of the group
    /// starts once no other run of it is under way.
    pub(super) fn group_run_ended(&mut self, record: &RunRecord) {
        let Some(group) = &record.group else {
            return;
        };
        let runs = self.group_runs(&record.pipeline, group, record.id);
        let busy = runs
            .iter()
            .any(|run| self.runs.get(run).is_some_and(|r| !r.record.waiting));
        let Some(&next) = runs.first() else {
            return;
        };
        if busy {
            return;
        }
        tracing::info!(run = %next, %group, "run of a concurrency group starts: the older ones ended");
        if let Some(active) = self.runs.get_mut(&next) {
            active.record.waiting = false;
        }
        self.save_run(next);
        self.ready_roots(next);
        self.finish_run_if_done(next);
    }

    /// After a restart: a stage whose guard answer was lost asks again,
    /// and a group whose running run ended while the coordinator was down
    /// starts its next.
    pub(super) fn resume_conditions(&mut self) {
        let runs: Vec<RunRecord> = self
            .runs
            .values()
            .map(|active| active.record.clone())
            .collect();
        for record in &runs {
            if !record.waiting && record.rollback.is_none() {
                self.ready_roots(record.id);
            }
        }
        for record in &runs {
            if record.waiting {
                self.group_run_ended(record);
            }
        }
    }

    /// Whether `key` must wait for the guard before it becomes ready (the
    /// check is then queued for the runner).
    pub(super) fn deploy_needs_guard(&mut self, key: StageKey) -> bool {
        if self.guard_cleared.remove(&key) {
            return false;
        }
        let Some(active) = self.runs.get(&key.run) else {
            return false;
        };
        let Some(environment) = active.spec.parsed.stages[key.idx as usize]
            .environment
            .clone()
        else {
            return false;
        };
        if active.record.rollback.is_some() || active.record.commit.is_empty() {
            return false;
        }
        if self.deploy_in_flight(key, &active.record.pipeline, &environment) {
            tracing::info!(stage = %key, %environment, "deploy waits for another run's deploy to the same environment");
            self.parked_deploys.insert(key);
            return true;
        }
        // An explicit `kiln promote` deploys the version it names, even one
        // older than the live release: like a rollback, a deliberate act.
        if active.record.promote.is_some() {
            return false;
        }
        let env = EnvKey::of_pipeline(&active.record.pipeline, &environment);
        let Some(live) = self.delivery.live_release(&env) else {
            return false;
        };
        if live.commit.is_empty() || live.commit == active.record.commit {
            return false;
        }
        let check = GuardCheck {
            key,
            repo: active.spec.record.repo.clone(),
            commit: active.record.commit.clone(),
            live_release: live.id,
            live_commit: live.commit.clone(),
            environment,
        };
        tracing::info!(stage = %key, live = check.live_release, "deploy waits for the outdated-deploy check");
        self.guard_checks.push(check);
        self.guard_pending.insert(key);
        true
    }

    /// Whether a stage of another run of `pipeline` deploys to
    /// `environment` now: ready, held by an agent, or being checked. Deploys
    /// to one environment go one at a time, so that each is checked against
    /// the release the one before it made.
    fn deploy_in_flight(&self, key: StageKey, pipeline: &str, environment: &str) -> bool {
        self.runs.values().any(|active| {
            active.record.id != key.run
                && active.record.pipeline == pipeline
                && active.stages.iter().any(|stage| {
                    let deploying = matches!(stage.state, StageState::Ready)
                        || stage.state.is_held()
                        || self.guard_pending.contains(&stage.key);
                    deploying
                        && active.spec.parsed.stages[stage.key.idx as usize]
                            .environment
                            .as_deref()
                            == Some(environment)
                })
        })
    }

    /// Deploys that waited for another to end try again (once the
    /// releases that ending made are live).
    pub(super) fn retry_parked_deploys(&mut self) {
        if self.parked_deploys.is_empty() {
            return;
        }
        for key in std::mem::take(&mut self.parked_deploys) {
            if self
                .stage(key)
                .is_some_and(|stage| stage.state == StageState::Pending)
            {
                self.make_ready(key);
            }
        }
    }

    /// The guard's answer for a stage still pending.
    pub(super) fn deploy_guard_checked(
        &mut self,
        check: GuardCheck,
        outdated: Result<bool, String>,
    ) {
        let key = check.key;
        self.guard_pending.remove(&key);
        if !self
            .stage(key)
            .is_some_and(|stage| stage.state == StageState::Pending)
        {
            return;
        }
        let short = |commit: &str| commit.chars().take(12).collect::<String>();
        match outdated {
            Ok(false) => {
                self.guard_cleared.insert(key);
                self.make_ready(key);
                return;
            }
            Ok(true) => {
                let reason = format!(
                    "outdated deploy: `{}` runs release {} built from commit {}, which contains this run's commit {}; an older commit never replaces a newer one (roll back with `kiln rollback` to go back deliberately)",
                    check.environment,
                    check.live_release,
                    short(&check.live_commit),
                    short(&check.commit)
                );
                tracing::warn!(stage = %key, %reason, "stage skipped");
                if self.skip_settled(key, reason) {
                    let Some(spec) = self.runs.get(&key.run).map(|run| run.spec.clone()) else {
                        return;
                    };
                    let name = spec.parsed.stages[key.idx as usize].name.clone();
                    self.skip_dependents_of_skipped(key, &spec, &name);
                }
            }
            // Fail closed: a deploy that cannot be shown to be current does
            // not run.
            Err(error) => {
                let reason = format!(
                    "cannot tell whether commit {} is older than the live release's {} of `{}`: {error}",
                    short(&check.commit),
                    short(&check.live_commit),
                    check.environment
                );
                if self.move_stage(key, StageState::Ready) {
                    self.settle_stage(key, StageState::Failed, None, reason);
                }
            }
        }
        self.finish_run_if_done(key.run);
    }
}
