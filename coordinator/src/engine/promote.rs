//! `kiln promote` and model aliases in the loop: delivery plans (resolves
//! the version, checks the target environment's gates again), the run
//! book runs the target environment's stage alone with the version's
//! exact artifacts and image — no training, no other stage.

use std::collections::BTreeMap;

use kiln_common::ids::{RunId, StageKey};

use super::Engine;
use super::delivery::{PromoteRequest, PromoteStart};
use crate::error::ApiError;
use crate::store::{RunRecord, RunState, StageRecord, StageState};

impl Engine {
    /// `kiln promote NAME@N --to ENV`. `stored`: the source run's stages as
    /// the caller read them from the store (the engine's own copy wins
    /// while it holds the run).
    pub(super) fn promote(
        &mut self,
        reference: &str,
        environment: &str,
        user: &str,
        stored: Option<(RunId, Vec<StageRecord>)>,
    ) -> Result<RunId, ApiError> {
        let origin = self.delivery.origin_of(reference)?;
        let spec = self.spec(&origin.pipeline, origin.pipeline_version)?;
        let target = kiln_common::ids::EnvKey::of_pipeline(&origin.pipeline, environment);
        let running = self
            .runs
            .values()
            .find(|run| {
                !run.record.state.is_finished()
                    && (run.record.rollback.as_ref().map(|p| &p.environment) == Some(&target)
                        || run.record.promote.as_ref().map(|p| &p.environment) == Some(&target))
            })
            .map(|run| run.record.id);
        let held = self.run_of(origin.run).map(|run| run.stages.clone());
        let stages = held.or_else(|| {
            stored
                .filter(|(run, _)| *run == origin.run)
                .map(|(_, stages)| stages)
        });
        let now = self.clock.now_ms();
        let start = self.delivery.plan_promote(
            &PromoteRequest {
                reference,
                environment,
                user,
                run_stages: stages.as_deref(),
            },
            &spec.parsed,
            running,
            now,
        )?;
        self.start_promote_run(start, user.to_owned())
    }

    /// Starts the promote run delivery planned: the environment's gates
    /// already decided (a manual one waiting for `kiln approve`), its
    /// environment stage ready once none waits, every other stage skipped.
    fn start_promote_run(
        &mut self,
        start: PromoteStart,
        triggered_by: String,
    ) -> Result<RunId, ApiError> {
        let PromoteStart {
            plan,
            source,
            gates,
        } = start;
        let (spec, idx) =
            self.spec_with_stage(&source.pipeline, source.pipeline_version, &plan.stage)?;
        let id = RunId(self.next_run_id);
        self.next_run_id += 1;
        let now = self.clock.now_ms();
        tracing::info!(run = %id, model = %plan.model, environment = %plan.environment, from = plan.from_release, user = %plan.by, "promoting");
        let waiting = gates.iter().any(|(_, _, manual)| *manual);
        let record = RunRecord {
            id,
            pipeline: source.pipeline.clone(),
            pipeline_version: source.pipeline_version,
            commit: source.commit.clone(),
            rev: format!("promote {} from release {}", plan.model, source.id),
            state: RunState::Queued,
            triggered_by,
            created_ms: now,
            finished_ms: None,
            source_digest: source.source_digest.clone(),
            rollback: None,
            datasets: Vec::new(),
            pipeline_digest: spec.record.digest.clone(),
            params: BTreeMap::new(),
            variables: BTreeMap::from([("KILN_EVENT".to_owned(), "promote".to_owned())]),
            promote: Some(plan),
            group: None,
            waiting: false,
        };
        let mut stages: Vec<StageRecord> = spec
            .parsed
            .stages
            .iter()
            .enumerate()
            .map(|(i, stage)| {
                let key = StageKey {
                    run: id,
                    idx: i as u32,
                };
                let mut record = StageRecord::new(key, &stage.name, Vec::new());
                if i != idx {
                    record.state = StageState::Skipped;
                    record.message = "not part of a promote".into();
                }
                record
            })
            .collect();
        for (gate_idx, decision, manual) in gates {
            let stage = &mut stages[gate_idx];
            stage.message = if manual {
                format!("{}; waiting for `kiln approve`", decision.summary)
            } else {
                decision.summary.clone()
            };
            stage.state = if manual {
                StageState::AwaitingApproval
            } else {
                StageState::Succeeded
            };
            stage.started_ms = Some(now);
            if !manual {
                stage.finished_ms = Some(now);
            }
            stage.gate = Some(decision);
        }
        self.insert_new_run(record, stages, spec);
        if !waiting {
            self.make_ready(StageKey {
                run: id,
                idx: idx as u32,
            });
        }
        Ok(id)
    }

    /// Stages of `run` that a promote leaves out: they count as passed
    /// for the stages after them (the promote deploys their outputs as
    /// recorded, it does not run them).
    pub(super) fn outside_promote(&self, run: RunId) -> Vec<usize> {
        let Some(active) = self.run_of(run) else {
            return Vec::new();
        };
        let Some(plan) = &active.record.promote else {
            return Vec::new();
        };
        active
            .stages
            .iter()
            .enumerate()
            .filter(|(_, stage)| stage.name != plan.stage && !plan.gates.contains(&stage.name))
            .map(|(i, _)| i)
            .collect()
    }

    /// `kiln model alias NAME@N ALIAS` (`remove`: `--rm`).
    pub(super) fn set_model_alias(
        &mut self,
        reference: &str,
        alias: &str,
        remove: bool,
        user: &str,
    ) -> Result<(), ApiError> {
        let now = self.clock.now_ms();
        let op = if remove {
            self.delivery.remove_alias(reference, alias)?
        } else {
            self.delivery.set_alias(reference, alias, user, now)?
        };
        self.write(op);
        Ok(())
    }
}
