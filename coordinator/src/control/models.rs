//! Models: `kiln model ls|show|compare` read the store on the blocking
//! pool (the registry is derived from the releases: `crate::models`);
//! `kiln model alias` and `kiln promote` are decided by the engine.

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::ControlApi;
use crate::auth::{Principal, audited};
use crate::engine::Event;
use crate::error::ApiError;
use crate::models;
use crate::store::{ModelAliasRecord, ReleaseRecord, ReleaseState, Store};
use crate::views;

/// What the registry is derived from, read at once.
struct Snapshot {
    releases: Vec<ReleaseRecord>,
    aliases: Vec<ModelAliasRecord>,
}

impl Snapshot {
    fn read(store: &dyn Store) -> Result<Self, ApiError> {
        Ok(Self {
            releases: store.releases()?,
            aliases: store.model_aliases()?,
        })
    }
}

impl ControlApi {
    /// Runs `read` over the store on the blocking pool.
    async fn read_models<T: Send + 'static>(
        &self,
        read: impl FnOnce(&dyn Store, Snapshot) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store: Arc<dyn Store> = self.store.clone();
        tokio::task::spawn_blocking(move || read(store.as_ref(), Snapshot::read(store.as_ref())?))
            .await
            .map_err(|_| ApiError::Internal("reading the models failed".into()))?
    }

    pub(super) async fn models_list(&self) -> Result<pb::ListModelsResponse, ApiError> {
        self.read_models(|_, snapshot| {
            let versions = models::versions(&snapshot.releases);
            let models = versions
                .iter()
                .map(|(name, versions)| model_view(name, versions, &snapshot.aliases))
                .collect();
            Ok(pb::ListModelsResponse { models })
        })
        .await
    }

    pub(super) async fn model_version(
        &self,
        reference: String,
    ) -> Result<pb::ModelVersion, ApiError> {
        self.read_models(move |store, snapshot| {
            let versions = models::versions(&snapshot.releases);
            let version = models::resolve(&versions, &snapshot.aliases, &reference)?;
            let origin = version.origin();
            let name = &origin
                .model
                .as_ref()
                .expect("a version names its model")
                .name;
            let aliases = models::aliases(&versions[name], name, &snapshot.aliases)
                .into_iter()
                .filter(|(_, v)| *v == version.version)
                .map(|(alias, _)| alias)
                .collect();
            let run = store.run(origin.run)?;
            let stages = store.stages(origin.run)?;
            // The training run may have been collected: its release kept
            // the metrics it had then.
            let metrics = if stages.is_empty() {
                origin.metrics.clone()
            } else {
                models::run_metrics(&stages)
            };
            Ok(pb::ModelVersion {
                name: name.clone(),
                version: version.version,
                aliases,
                metrics: views::metrics(&metrics),
                releases: version.releases.iter().map(|r| views::release(r)).collect(),
                run_id: origin.run.0,
                pipeline: origin.pipeline.clone(),
                pipeline_version: origin.pipeline_version,
                commit: origin.commit.clone(),
                params: run
                    .map(|r| r.params.into_iter().collect())
                    .unwrap_or_default(),
                triggered_by: origin.triggered_by.clone(),
                created_ms: origin.created_ms,
            })
        })
        .await
    }

    pub(super) async fn set_model_alias_request(
        &self,
        request: Request<pb::SetModelAliasRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let (name, _) = models::split_ref(&request.model)?;
        let name = name.to_owned();
        let pipeline = self
            .read_models({
                let name = name.clone();
                move |_, snapshot| Ok(pipeline_of(&snapshot.releases, &name))
            })
            .await?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no model `{name}` has been released; `kiln model ls` lists the models"
                ))
            })?;
        principal.check_pipeline(&pipeline)?;
        let target = if request.remove {
            format!("model {name} alias {} removed", request.alias)
        } else {
            format!("model {} alias {}", request.model, request.alias)
        };
        self.ask(|reply| Event::SetModelAlias {
            model: request.model,
            alias: request.alias,
            remove: request.remove,
            user: principal.name.clone(),
            reply,
        })
        .await?;
        let model = self
            .read_models(move |_, snapshot| {
                let versions = models::versions(&snapshot.releases);
                Ok(model_view(&name, &versions[&name], &snapshot.aliases))
            })
            .await?;
        Ok(audited(model, target))
    }

    pub(super) async fn promote_request(
        &self,
        request: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        if request.environment.is_empty() {
            return Err(ApiError::InvalidArgument(
                "no environment given; say where to promote to with --to ENV".into(),
            )
            .into());
        }
        let reference = request.model.clone();
        // The source run's stages (their metrics are what the gates check),
        // read here so the engine never waits on the store.
        let (pipeline, stored) = self
            .read_models(move |store, snapshot| {
                let versions = models::versions(&snapshot.releases);
                let version = models::resolve(&versions, &snapshot.aliases, &reference)?;
                let origin = version.origin();
                Ok((
                    origin.pipeline.clone(),
                    (origin.run, store.stages(origin.run)?),
                ))
            })
            .await?;
        principal.check_pipeline(&pipeline)?;
        let target = format!(
            "model {} to environment {pipeline}/{}",
            request.model, request.environment
        );
        let run = self
            .ask(|reply| Event::Promote {
                model: request.model,
                environment: request.environment,
                user: principal.name.clone(),
                stored: Some(stored),
                reply,
            })
            .await?;
        Ok(audited(run, target))
    }
}

/// The pipeline that released the newest version of `model`.
fn pipeline_of(releases: &[ReleaseRecord], model: &str) -> Option<String> {
    releases
        .iter()
        .rev()
        .find(|release| release.model.as_ref().is_some_and(|m| m.name == model))
        .map(|release| release.pipeline.clone())
}

fn model_view(
    name: &str,
    versions: &BTreeMap<u32, models::Version<'_>>,
    stored: &[ModelAliasRecord],
) -> pb::Model {
    let newest = versions.values().next_back().map(|v| v.origin());
    pb::Model {
        name: name.to_owned(),
        pipeline: newest.map(|r| r.pipeline.clone()).unwrap_or_default(),
        versions: versions
            .values()
            .map(|version| pb::ModelVersionSummary {
                version: version.version,
                run_id: version.run.0,
                created_ms: version.origin().created_ms,
                live_in: version
                    .releases
                    .iter()
                    .filter(|r| r.state == ReleaseState::Live)
                    .map(|r| r.environment.name.clone())
                    .collect(),
            })
            .collect(),
        aliases: models::aliases(versions, name, stored)
            .into_iter()
            .collect(),
    }
}
