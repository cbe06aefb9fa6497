//! Models in the delivery controller: the version a new release is, the
//! aliases people set, and `kiln promote` — an existing version deployed
//! to another environment once that environment's gates pass again on
//! the version's recorded metrics.
//!
//! The registry itself is derived (`crate::models`) from the controller's
//! own releases, so a version number is decided here, in the batch that
//! makes the release, and an environment's alias moves with every release
//! that goes live there (a rollback's included) without a write of its
//! own.

use std::collections::BTreeSet;

use kiln_common::ids::{EnvKey, RunId};
use kiln_common::spec::{self, Approval};

use super::{DeliveryController, gates};
use crate::error::ApiError;
use crate::models;
use crate::store::{
    GateDecision, ModelAliasRecord, ModelVersion, Op, PromotePlan, ReleaseRecord, StageRecord,
};

/// A promote the run book is to start.
pub(in crate::engine) struct PromoteStart {
    pub(in crate::engine) plan: PromotePlan,
    /// The release whose artifacts and image are deployed.
    pub(in crate::engine) source: ReleaseRecord,
    /// Each gate of the environment (stage index), decided again, and
    /// whether a person still has to approve it.
    pub(in crate::engine) gates: Vec<(usize, GateDecision, bool)>,
}

/// What a promote request names.
pub(in crate::engine) struct PromoteRequest<'a> {
    /// `NAME@N` or `NAME@ALIAS`.
    pub(in crate::engine) reference: &'a str,
    /// The target environment's name (of the version's pipeline).
    pub(in crate::engine) environment: &'a str,
    pub(in crate::engine) user: &'a str,
    /// The source run's stages as the store or the engine holds them:
    /// their metrics are what the gates are checked on.
    pub(in crate::engine) run_stages: Option<&'a [StageRecord]>,
}

impl DeliveryController {
    /// Takes the stored user-set aliases (at start-up).
    pub(in crate::engine) fn load_aliases(&mut self, aliases: Vec<ModelAliasRecord>) {
        self.aliases = aliases
            .into_iter()
            .map(|alias| ((alias.model.clone(), alias.alias.clone()), alias))
            .collect();
    }

    /// `NAME@N` of `release`, "" if it names no model: the
    /// `kiln_monitor_value` label.
    pub(super) fn model_label(&self, release: u64) -> String {
        self.environments
            .release(release)
            .and_then(|r| r.model.as_ref())
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    /// The version a release of `model` made by `run` is.
    pub(super) fn model_version(&self, model: &str, run: RunId) -> ModelVersion {
        models::version_for(self.environments.releases(), model, run)
    }

    /// The first release of the version `reference` names: where it came
    /// from (its run, pipeline version and artifacts).
    pub(in crate::engine) fn origin_of(&self, reference: &str) -> Result<ReleaseRecord, ApiError> {
        let stored: Vec<ModelAliasRecord> = self.aliases.values().cloned().collect();
        let versions = models::versions(self.environments.releases());
        Ok(models::resolve(&versions, &stored, reference)?
            .origin()
            .clone())
    }

    /// `kiln model alias NAME@N ALIAS`: the write and the version it names.
    pub(in crate::engine) fn set_alias(
        &mut self,
        reference: &str,
        alias: &str,
        user: &str,
        now: u64,
    ) -> Result<Op, ApiError> {
        let stored: Vec<ModelAliasRecord> = self.aliases.values().cloned().collect();
        let versions = models::versions(self.environments.releases());
        let version = models::resolve(&versions, &stored, reference)?;
        let (name, _) = models::split_ref(reference)?;
        models::check_alias(&versions[name], alias)?;
        let record = ModelAliasRecord {
            model: name.to_owned(),
            alias: alias.to_owned(),
            version: version.version,
            set_by: user.to_owned(),
            set_ms: now,
        };
        tracing::info!(
            model = name,
            alias,
            version = version.version,
            user,
            "model alias set"
        );
        self.aliases
            .insert((name.to_owned(), alias.to_owned()), record.clone());
        Ok(Op::ModelAlias(record))
    }

    /// `kiln model alias --rm NAME ALIAS`.
    pub(in crate::engine) fn remove_alias(
        &mut self,
        model: &str,
        alias: &str,
    ) -> Result<Op, ApiError> {
        let (name, _) = models::split_ref(model)?;
        if self
            .aliases
            .remove(&(name.to_owned(), alias.to_owned()))
            .is_none()
        {
            return Err(ApiError::NotFound(format!(
                "model `{name}` has no alias `{alias}` set by hand (environment aliases follow \
                 the live releases and cannot be removed)"
            )));
        }
        tracing::info!(model = name, alias, "model alias removed");
        Ok(Op::RemoveModelAlias(name.to_owned(), alias.to_owned()))
    }

    /// Plans `kiln promote NAME@N --to ENV`: the version's first release
    /// is deployed by `spec`'s (its pipeline version's) stage for `ENV`,
    /// once every gate between that stage and the environment before it
    /// passes again on the version's recorded metrics, against `ENV`'s
    /// current champion. A gate that fails refuses the promote with the
    /// values and changes nothing. `running`: a rollback or promote of
    /// that environment still running (one at a time).
    pub(in crate::engine) fn plan_promote(
        &mut self,
        request: &PromoteRequest<'_>,
        spec: &spec::Pipeline,
        running: Option<RunId>,
        now: u64,
    ) -> Result<PromoteStart, ApiError> {
        let stored: Vec<ModelAliasRecord> = self.aliases.values().cloned().collect();
        let versions = models::versions(self.environments.releases());
        let version = models::resolve(&versions, &stored, request.reference)?;
        let source = version.origin().clone();
        let model = source.model.clone().expect("a version's release names it");
        let target = request.environment;
        let idx = spec
            .stages
            .iter()
            .position(|stage| stage.environment.as_deref() == Some(target))
            .ok_or_else(|| {
                ApiError::InvalidArgument(format!(
                    "pipeline `{}` (version {}, which made {model}) has no stage with \
                     `environment: {target}`",
                    source.pipeline, source.pipeline_version
                ))
            })?;
        let stage = &spec.stages[idx];
        if let Some(other) = stage.model.as_deref().filter(|&m| m != model.name) {
            return Err(ApiError::InvalidArgument(format!(
                "stage `{}` releases model `{other}`, not `{}`",
                stage.name, model.name
            )));
        }
        let environment = EnvKey::of_pipeline(&source.pipeline, target);
        if let Some(why) = self.frozen(&environment) {
            return Err(ApiError::FailedPrecondition(format!(
                "`{environment}` is frozen: {why}"
            )));
        }
        if let Some(live) = self
            .environments
            .live(&environment)
            .and_then(|id| self.environments.release(id))
            && live.model.as_ref() == Some(&model)
        {
            return Err(ApiError::FailedPrecondition(format!(
                "{model} is already live in `{environment}` (release {})",
                live.id
            )));
        }
        if let Some(running) = running {
            return Err(ApiError::FailedPrecondition(format!(
                "run {running} is already deploying to `{environment}`; wait for it to finish"
            )));
        }
        let metrics = match request.run_stages {
            Some(stages) if !stages.is_empty() => models::run_metrics(stages),
            _ => source.metrics.clone(),
        };
        let mut decided = Vec::new();
        let mut refusals = Vec::new();
        for gate_idx in gates_before(spec, idx) {
            let gate_stage = &spec.stages[gate_idx];
            let gate = gate_stage.gate.as_ref().expect("gates_before yields gates");
            let champion = gate.compare_to.as_ref().and_then(|env| {
                let champion = self
                    .environments
                    .champion(&EnvKey::of_pipeline(&source.pipeline, env))?;
                Some((env.as_str(), &champion.metrics))
            });
            let mut decision = gates::decide(gate, &metrics, champion);
            decision.decided_ms = now;
            decision.summary = format!("promote of {model}: {}", decision.summary);
            if !decision.passed {
                refusals.push(format!("gate `{}`: {}", gate_stage.name, decision.summary));
            }
            let manual = gate.approval == Approval::Manual;
            decided.push((gate_idx, decision, manual));
        }
        self.metrics.gate_decided(if refusals.is_empty() {
            "passed"
        } else {
            "failed"
        });
        if !refusals.is_empty() {
            tracing::warn!(%model, environment = %environment, user = request.user, "promote refused by a gate");
            return Err(ApiError::FailedPrecondition(format!(
                "promote of {model} to `{environment}` refused; nothing changed: {}",
                refusals.join("; ")
            )));
        }
        let plan = PromotePlan {
            environment,
            model,
            from_release: source.id,
            stage: stage.name.clone(),
            inputs: source.redeploy_inputs(),
            metrics,
            gates: decided
                .iter()
                .map(|(i, _, _)| spec.stages[*i].name.clone())
                .collect(),
            by: request.user.to_owned(),
            at_ms: now,
        };
        Ok(PromoteStart {
            plan,
            source,
            gates: decided,
        })
    }
}

/// The gates an environment stage waits for: the gate stages among what
/// it needs, directly or through stages that are neither gates nor
/// environment stages — the walk stops at an earlier environment (its
/// gates were that environment's).
fn gates_before(spec: &spec::Pipeline, idx: usize) -> Vec<usize> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<usize> = spec.stages[idx].needs.clone();
    let mut found = Vec::new();
    while let Some(need) = todo.pop() {
        if !seen.insert(need) {
            continue;
        }
        let stage = &spec.stages[need];
        if stage.environment.is_some() {
            continue;
        }
        if stage.gate.is_some() {
            found.push(need);
        }
        todo.extend(stage.needs.iter().copied());
    }
    found.sort_unstable();
    found
}

/// A model's aliases as the controller sees them, for tests.
#[cfg(test)]
pub(super) fn aliases_of(
    controller: &DeliveryController,
    model: &str,
) -> std::collections::BTreeMap<String, u32> {
    let stored: Vec<ModelAliasRecord> = controller.aliases.values().cloned().collect();
    let versions = models::versions(controller.environments.releases());
    versions
        .get(model)
        .map(|v| models::aliases(v, model, &stored))
        .unwrap_or_default()
}
