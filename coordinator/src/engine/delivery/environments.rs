//! The delivery controller's state: environments, their releases, and the
//! breach count of each watched release.
//!
//! It knows nothing of runs or agents: the controller ([`super`]) asks it
//! questions (the champion of an environment, whether one is frozen) and
//! tells it what happened (a release is made, a rollback ended, a monitor
//! sampled); every change it makes comes back as store ops.
//!
//! **Architecture Invariant:** an environment has at most one live
//! release; making one live supersedes (or rolls back) the one before, in
//! the same batch.

use std::collections::{BTreeMap, HashMap};

use kiln_common::ids::EnvKey;

use crate::error::ApiError;
use crate::store::{EnvironmentRecord, Op, ReleaseRecord, ReleaseState, RolloutRecord};

/// What a monitor sample means for its release.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Watch {
    /// Not live any more, or already acted on: ignore the sample.
    Ignored,
    /// Healthy, or breaching fewer than `failure_limit` times in a row.
    Counted(u32),
    /// The `failure_limit`-th consecutive breach: act, once.
    Act(u32),
}

pub(super) struct Environments {
    environments: BTreeMap<EnvKey, EnvironmentRecord>,
    /// Every release, by id: the engine reads its own latest writes here,
    /// never from the store, whose batches may still be on their way.
    releases: BTreeMap<u64, ReleaseRecord>,
    next_release_id: u64,
    /// Consecutive breaches per watched release; `None` once acted on.
    breaches: HashMap<u64, Option<u32>>,
}

impl Environments {
    pub(super) fn load(environments: Vec<EnvironmentRecord>, releases: Vec<ReleaseRecord>) -> Self {
        let releases: BTreeMap<u64, ReleaseRecord> = releases
            .into_iter()
            .map(|release| (release.id, release))
            .collect();
        Self {
            environments: environments
                .into_iter()
                .map(|env| (env.key.clone(), env))
                .collect(),
            next_release_id: releases.keys().next_back().map_or(1, |id| id + 1),
            releases,
            breaches: HashMap::new(),
        }
    }

    /// Live releases whose watch window is still open at `now`.
    pub(super) fn watched_at(&self, now: u64) -> impl Iterator<Item = &ReleaseRecord> {
        self.releases.values().filter(move |release| {
            release.state == ReleaseState::Live
                && release.monitor_until_ms.is_some_and(|until| until > now)
        })
    }

    pub(super) fn release(&self, id: u64) -> Option<&ReleaseRecord> {
        self.releases.get(&id)
    }

    /// Every release, oldest first.
    pub(super) fn releases(&self) -> impl Iterator<Item = &ReleaseRecord> {
        self.releases.values()
    }

    pub(super) fn live(&self, environment: &EnvKey) -> Option<u64> {
        self.environments.get(environment)?.live
    }

    /// The live release of `environment`: the champion a gate compares to.
    pub(super) fn champion(&self, environment: &EnvKey) -> Option<&ReleaseRecord> {
        self.releases.get(&self.live(environment)?)
    }

    /// Releases of `environment`, oldest first.
    pub(super) fn history(&self, environment: &EnvKey) -> Vec<&ReleaseRecord> {
        self.releases
            .values()
            .filter(|release| release.environment == *environment)
            .collect()
    }

    pub(super) fn frozen(&self, environment: &EnvKey) -> Option<&str> {
        self.environments.get(environment)?.frozen.as_deref()
    }

    pub(super) fn exists(&self, environment: &EnvKey) -> bool {
        self.environments.contains_key(environment)
    }

    pub(super) fn next_release_id(&mut self) -> u64 {
        let id = self.next_release_id;
        self.next_release_id += 1;
        id
    }

    /// Makes `release` live in its environment; the one live before gets
    /// `previous_becomes` (with `reason`). Returns the writes.
    pub(super) fn make_live(
        &mut self,
        release: ReleaseRecord,
        previous_becomes: ReleaseState,
        reason: Option<String>,
    ) -> Vec<Op> {
        let mut ops = Vec::new();
        let environment = release.environment.clone();
        let env = self
            .environments
            .entry(environment.clone())
            .or_insert_with(|| EnvironmentRecord::new(environment.clone()));
        let previous = env.live.replace(release.id);
        let env_record = env.clone();
        if let Some(previous) = previous.filter(|&p| p != release.id)
            && let Some(old) = self.releases.get_mut(&previous)
        {
            old.state = previous_becomes;
            if reason.is_some() {
                old.reason = reason;
            }
            self.breaches.remove(&previous);
            ops.push(Op::Release(old.clone()));
        }
        tracing::info!(release = release.id, environment = %environment, run = %release.run, "release is live");
        self.releases.insert(release.id, release.clone());
        ops.push(Op::Release(release));
        ops.push(Op::Environment(env_record));
        ops
    }

    /// Lets `environment` take deployments again; the record to write.
    pub(super) fn unfreeze(&mut self, environment: &EnvKey) -> Result<EnvironmentRecord, ApiError> {
        let env = self.environments.get_mut(environment).ok_or_else(|| {
            ApiError::NotFound(format!("environment `{environment}` has no releases"))
        })?;
        env.frozen = None;
        Ok(env.clone())
    }

    pub(super) fn freeze(&mut self, environment: &EnvKey, reason: String) -> Option<Op> {
        let env = self.environments.get_mut(environment)?;
        env.frozen = Some(reason);
        Some(Op::Environment(env.clone()))
    }

    /// The rollout in progress in `environment`.
    pub(super) fn rollout(&self, environment: &EnvKey) -> Option<&RolloutRecord> {
        self.environments.get(environment)?.rollout.as_ref()
    }

    /// Environments with a rollout in progress.
    pub(super) fn rollouts(&self) -> impl Iterator<Item = (&EnvKey, &RolloutRecord)> {
        self.environments
            .iter()
            .filter_map(|(key, env)| Some((key, env.rollout.as_ref()?)))
    }

    /// Sets (or, `None`, ends) the rollout of an environment that exists;
    /// the write.
    pub(super) fn set_rollout(
        &mut self,
        environment: &EnvKey,
        rollout: Option<RolloutRecord>,
    ) -> Option<Op> {
        let env = self.environments.get_mut(environment)?;
        env.rollout = rollout;
        Some(Op::Environment(env.clone()))
    }

    /// Keeps a release that is not live (a rollout's candidate, or one
    /// whose rollout ended); the write.
    pub(super) fn put(&mut self, release: ReleaseRecord) -> Op {
        self.releases.insert(release.id, release.clone());
        Op::Release(release)
    }

    /// A (new) watch of `release` begins: its breaches count from zero.
    pub(super) fn start_watch(&mut self, release: u64) {
        self.breaches.insert(release, Some(0));
    }

    /// Counts a sample of `release` in `environment`.
    pub(super) fn observe(
        &mut self,
        environment: &EnvKey,
        release: u64,
        breached: bool,
        failure_limit: u32,
    ) -> Watch {
        if self.live(environment) != Some(release) {
            return Watch::Ignored;
        }
        let entry = self.breaches.entry(release).or_insert(Some(0));
        let Some(count) = entry.as_mut() else {
            return Watch::Ignored;
        };
        if !breached {
            *count = 0;
            return Watch::Counted(0);
        }
        *count += 1;
        let count = *count;
        if count < failure_limit {
            return Watch::Counted(count);
        }
        *entry = None;
        Watch::Act(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(id: u64, pipeline: &str, env: &str) -> ReleaseRecord {
        ReleaseRecord {
            commit: "c".repeat(40),
            ..ReleaseRecord::for_test(id, EnvKey::of_pipeline(pipeline, env), id)
        }
    }

    #[test]
    fn one_live_release_per_environment_of_each_pipeline() {
        let mut envs = Environments::load(Vec::new(), Vec::new());
        let credit = EnvKey::of_pipeline("credit", "production");
        let juice = EnvKey::of_pipeline("juice", "production");
        envs.make_live(
            release(1, "credit", "production"),
            ReleaseState::Superseded,
            None,
        );
        let ops = envs.make_live(
            release(2, "juice", "production"),
            ReleaseState::Superseded,
            None,
        );
        assert_eq!(ops.len(), 2, "nothing superseded in another pipeline");
        assert_eq!(envs.champion(&credit).map(|r| r.id), Some(1));
        let ops = envs.make_live(
            release(3, "credit", "production"),
            ReleaseState::RolledBack,
            Some("bad".into()),
        );
        assert_eq!(
            ops.len(),
            3,
            "the old release, the new one, the environment"
        );
        assert_eq!(
            envs.release(1).map(|r| r.state),
            Some(ReleaseState::RolledBack)
        );
        assert_eq!(
            envs.release(1).and_then(|r| r.reason.clone()),
            Some("bad".into())
        );
        assert_eq!(envs.live(&juice), Some(2));
        assert_eq!(envs.history(&credit).len(), 2);
    }

    #[test]
    fn breaches_count_in_a_row_and_act_once() {
        let mut envs = Environments::load(Vec::new(), Vec::new());
        let prod = EnvKey::of_pipeline("credit", "production");
        envs.make_live(
            release(1, "credit", "production"),
            ReleaseState::Superseded,
            None,
        );
        assert_eq!(envs.observe(&prod, 1, true, 3), Watch::Counted(1));
        assert_eq!(envs.observe(&prod, 1, false, 3), Watch::Counted(0), "reset");
        assert_eq!(envs.observe(&prod, 1, true, 3), Watch::Counted(1));
        assert_eq!(envs.observe(&prod, 1, true, 3), Watch::Counted(2));
        assert_eq!(envs.observe(&prod, 1, true, 3), Watch::Act(3));
        assert_eq!(
            envs.observe(&prod, 1, true, 3),
            Watch::Ignored,
            "acted once"
        );
        assert_eq!(envs.observe(&prod, 7, true, 1), Watch::Ignored, "not live");
    }

    #[test]
    fn freezing_and_unfreezing_are_writes() {
        let mut envs = Environments::load(Vec::new(), Vec::new());
        let prod = EnvKey::of_pipeline("credit", "production");
        assert!(
            envs.freeze(&prod, "x".into()).is_none(),
            "no such environment"
        );
        assert!(envs.unfreeze(&prod).is_err());
        envs.make_live(
            release(1, "credit", "production"),
            ReleaseState::Superseded,
            None,
        );
        assert!(matches!(
            envs.freeze(&prod, "breach".into()),
            Some(Op::Environment(_))
        ));
        assert_eq!(envs.frozen(&prod), Some("breach"));
        assert_eq!(envs.unfreeze(&prod).unwrap().frozen, None);
        assert_eq!(envs.frozen(&prod), None);
    }
}
