//! `ControlService`: the API of the `kiln` CLI. Requests that change state
//! go through the engine and are answered once durable; reads (runs, logs,
//! artifacts) go through the [`Reader`] at the durable watermark, never
//! through the engine or the commit thread.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use kiln_common::ids::RunId;
use kiln_common::spec;
use kiln_proto::v1 as pb;
use pb::control_service_server::ControlService;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tonic::{Request, Response, Status};

mod environments;
mod lineage;
mod models;
mod rollout;
mod security;

use crate::auth::tokens::Tokens;
use crate::auth::{Principal, audited};
use crate::blobs::{BlobStore, parse_digest};
use crate::caches::{self, Caches};
use crate::engine::{Event, NewPipeline, Reply, RolloutCommand};
use crate::error::ApiError;
use crate::gc;
use crate::pipelines::ParsedPipelines;
use crate::provenance::ProvenanceKey;
use crate::read::{LogRequest, Reader};
use crate::secrets::Secrets;
use crate::store::{PipelineRecord, Store};
use crate::triggers::{Starter, TriggeredRun};
use crate::views;

/// Runs listed when the request says 0.
const DEFAULT_RUN_LIMIT: usize = 50;

pub(crate) struct ControlApi {
    events: mpsc::Sender<Event>,
    /// Starts runs: resolves revisions and reads pipeline files at them.
    starter: Starter,
    reader: Reader,
    store: Arc<dyn Store>,
    blobs: Arc<BlobStore>,
    tokens: Arc<Tokens>,
    secrets: Arc<Secrets>,
    provenance_key: Arc<ProvenanceKey>,
    /// The shared cache index: `kiln cache ls|clear`.
    caches: Caches,
    /// `kiln gc`: retention's runs, unreferenced blobs, expired caches.
    collector: gc::Collector,
}

impl ControlApi {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        starter: Starter,
        reader: Reader,
        blobs: Arc<BlobStore>,
        tokens: Arc<Tokens>,
        secrets: Arc<Secrets>,
        provenance_key: Arc<ProvenanceKey>,
        caches: Caches,
        collector: gc::Collector,
    ) -> Self {
        Self {
            events: starter.events.clone(),
            starter,
            store: reader.store().clone(),
            reader,
            blobs,
            tokens,
            secrets,
            provenance_key,
            caches,
            collector,
        }
    }

    /// Sends an event carrying a reply channel and waits for the answer.
    async fn ask<T>(&self, event: impl FnOnce(Reply<T>) -> Event) -> Result<T, Status> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(event(reply))
            .await
            .map_err(|_| Status::from(ApiError::ShuttingDown))?;
        answer
            .await
            .map_err(|_| Status::from(ApiError::ShuttingDown))?
            .map_err(Status::from)
    }

    async fn decide(
        &self,
        request: Request<pb::DecideStageRequest>,
        approve: bool,
    ) -> Result<Response<pb::Run>, Status> {
        let user = Principal::of(&request)?.name;
        let request = request.into_inner();
        let (run, stage) = (RunId(request.run_id), request.stage);
        let target = format!("run {run} stage {stage}");
        let reason = request.comment.trim().to_owned();
        if reason.len() > MAX_REASON_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "the reason is {} bytes; keep it under {MAX_REASON_BYTES}",
                reason.len()
            ))
            .into());
        }
        let run = self
            .ask(|reply| Event::DecideGate {
                run,
                stage,
                user,
                approve,
                reason,
                reply,
            })
            .await?;
        Ok(audited(run, target))
    }

    /// Whether `principal` may register `name` from `repo`: a pipeline's
    /// token may update its pipeline, not point it at another repository
    /// (the coordinator and agents read from there).
    fn check_may_register(
        &self,
        principal: &Principal,
        name: &str,
        repo: &str,
    ) -> Result<(), Status> {
        principal.check_pipeline(name)?;
        if principal.role == crate::auth::Role::Pipeline
            && let Ok(existing) = self.latest_pipeline(name)
            && existing.repo != repo
        {
            return Err(ApiError::PermissionDenied(format!(
                "token `{}` may not move pipeline `{name}` from {} to another repository; ask an operator",
                principal.name, existing.repo
            ))
            .into());
        }
        Ok(())
    }

    /// The latest durable version of `name`, from the durable view.
    fn latest_pipeline(&self, name: &str) -> Result<PipelineRecord, ApiError> {
        self.reader
            .view()
            .pipeline(name)
            .map(|record| (*record).clone())
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no pipeline named `{name}`; register it with `kiln pipeline register DIR`"
                ))
            })
    }
}

/// Longest reason a gate decision records.
const MAX_REASON_BYTES: usize = 1024;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ControlService for ControlApi {
    async fn register_pipeline(
        &self,
        request: Request<pb::RegisterPipelineRequest>,
    ) -> Result<Response<pb::RegisterPipelineResponse>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        // The parser refuses it too; this answer names the request's file
        // before any parsing starts.
        if request.spec_yaml.len() > spec::MAX_FILE_BYTES {
            return Err(Status::invalid_argument(format!(
                "{}: the pipeline file has {} bytes; the limit is {}",
                request.file_name,
                request.spec_yaml.len(),
                spec::MAX_FILE_BYTES
            )));
        }
        let file_name = if request.file_name.is_empty() {
            "kiln.yml".to_owned()
        } else {
            request.file_name
        };
        let parsed = spec::parse(&file_name, &request.spec_yaml)
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        self.check_may_register(&principal, &parsed.name, &request.repo)?;
        if request.repo.is_empty() {
            return Err(Status::invalid_argument(
                "repo is empty; give the git URL or path agents fetch the source from",
            ));
        }
        let pipeline = NewPipeline {
            name: parsed.name,
            file_name,
            spec_yaml: request.spec_yaml,
            repo: request.repo,
            branch: if request.branch.is_empty() {
                "main".into()
            } else {
                request.branch
            },
            subdir: request.subdir,
            path: normalized_file(&request.path)?,
            repository: String::new(),
        };
        let (record, created) = self
            .ask(|reply| Event::Register { pipeline, reply })
            .await?;
        let target = format!("pipeline {} v{}", record.name, record.version);
        Ok(audited(
            pb::RegisterPipelineResponse {
                pipeline: Some(pipeline_view(self.reader.parsed(), &record)),
                created,
            },
            target,
        ))
    }

    async fn add_repository(
        &self,
        request: Request<pb::AddRepositoryRequest>,
    ) -> Result<Response<pb::AddRepositoryResponse>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let url = request.url.trim().to_owned();
        if url.is_empty() || url.starts_with('-') {
            return Err(Status::invalid_argument(
                "give the repository as a git URL or a path on the coordinator and build hosts",
            ));
        }
        let branch = match request.branch.trim() {
            "" => "main".to_owned(),
            branch => branch.to_owned(),
        };
        let repos = &self.starter.repos;
        let commit = repos.resolve(&url, &branch, "").await?;
        let files = match normalized_file(&request.file)? {
            file if file.is_empty() => repos.pipeline_files(&url, &commit).await?,
            file => vec![file],
        };
        if files.is_empty() {
            return Err(ApiError::FailedPrecondition(format!(
                "{url} has no `{}` and no `{}/*.yml` at the head of `{branch}` ({commit}); commit one, or name the file with --file",
                crate::repos::DEFAULT_FILE,
                crate::repos::PIPELINES_DIR
            ))
            .into());
        }
        let repository = match request.name.trim() {
            "" => crate::repos::default_name(&url),
            name => name.to_owned(),
        };
        // Every file is read and checked before any is registered.
        let mut pipelines: Vec<NewPipeline> = Vec::new();
        for file in files {
            let text = repos.read_file(&url, &commit, &file).await?.ok_or_else(|| {
                ApiError::FailedPrecondition(format!(
                    "{file} is not in {url} at the head of `{branch}` ({commit}); commit it first"
                ))
            })?;
            let parsed = self
                .starter
                .parsed
                .parse(&file, &text, crate::repos::digest(&text))
                .map_err(|error| Status::invalid_argument(error.to_string()))?;
            self.check_may_register(&principal, &parsed.name, &url)?;
            if let Some(other) = pipelines.iter().find(|p| p.name == parsed.name) {
                return Err(Status::invalid_argument(format!(
                    "{file} and {} both name pipeline `{}`; give each file its own `pipeline:` name",
                    other.path, parsed.name
                )));
            }
            pipelines.push(NewPipeline {
                name: parsed.name.clone(),
                subdir: crate::repos::subdir_of(&file),
                file_name: file.clone(),
                spec_yaml: text,
                repo: url.clone(),
                branch: branch.clone(),
                path: file,
                repository: repository.clone(),
            });
        }
        let mut registered = Vec::new();
        for pipeline in pipelines {
            let (record, created) = self
                .ask(|reply| Event::Register { pipeline, reply })
                .await?;
            registered.push(pb::RegisterPipelineResponse {
                pipeline: Some(pipeline_view(self.reader.parsed(), &record)),
                created,
            });
        }
        let target = format!("repository {repository} ({url})");
        Ok(audited(
            pb::AddRepositoryResponse {
                pipelines: registered,
                commit,
            },
            target,
        ))
    }

    async fn list_pipelines(
        &self,
        _request: Request<pb::ListPipelinesRequest>,
    ) -> Result<Response<pb::ListPipelinesResponse>, Status> {
        let pipelines = self
            .reader
            .view()
            .pipelines()
            .iter()
            .map(|record| pipeline_view(self.reader.parsed(), record))
            .collect();
        Ok(Response::new(pb::ListPipelinesResponse { pipelines }))
    }

    async fn get_pipeline(
        &self,
        request: Request<pb::GetPipelineRequest>,
    ) -> Result<Response<pb::Pipeline>, Status> {
        let request = request.into_inner();
        let record = if request.version == 0 {
            self.latest_pipeline(&request.name)?
        } else {
            self.store
                .pipeline(&request.name, request.version)
                .map_err(ApiError::from)?
                .ok_or_else(|| {
                    ApiError::NotFound(format!(
                        "pipeline `{}` has no version {}",
                        request.name, request.version
                    ))
                })?
        };
        Ok(Response::new(pipeline_view(self.reader.parsed(), &record)))
    }

    async fn trigger_run(
        &self,
        request: Request<pb::TriggerRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        principal.check_pipeline(&request.pipeline)?;
        let pipeline = self.latest_pipeline(&request.pipeline)?;
        // Who asked comes from the token, never from the request.
        let triggered_by = format!("manual:{}", principal.name);
        let params: std::collections::BTreeMap<String, String> =
            request.params.into_iter().collect();
        let run = if request.source_digest.is_empty() {
            let rev = Some(request.rev).filter(|rev| !rev.is_empty());
            let mut run = TriggeredRun::new(pipeline, rev, "manual", triggered_by);
            run.params = params;
            self.starter.start(run).await?
        } else {
            // An uploaded snapshot stands in for a revision.
            let digest = request.source_digest;
            if self.blobs.stat(&parse_digest(&digest)?).is_none() {
                return Err(Status::failed_precondition(format!(
                    "source snapshot {digest} is not stored; upload it before triggering the run"
                )));
            }
            self.starter
                .start_snapshot(pipeline, digest, triggered_by, params)
                .await?
        };
        let target = format!("run {}", run.id);
        Ok(audited(run, target))
    }

    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let run = RunId(request.into_inner().run_id);
        Ok(Response::new(self.reader.run(run).await?))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let request = request.into_inner();
        let pipeline = Some(request.pipeline).filter(|name| !name.is_empty());
        let limit = if request.limit == 0 {
            DEFAULT_RUN_LIMIT
        } else {
            request.limit as usize
        };
        let runs = self.reader.runs(pipeline, limit).await?;
        Ok(Response::new(pb::ListRunsResponse { runs }))
    }

    type WatchRunStream = BoxStream<pb::Run>;

    async fn watch_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let run = RunId(request.into_inner().run_id);
        let receiver = match self.ask(|reply| Event::WatchRun { run, reply }).await? {
            Some(receiver) => receiver,
            // Finished (or unknown): one snapshot, then the stream ends.
            None => tokio::sync::watch::channel(self.reader.run(run).await?).1,
        };
        // Every snapshot, ending with the first finished one.
        let stream = WatchStream::new(receiver).scan(false, |done, snapshot| {
            if *done {
                return futures::future::ready(None);
            }
            *done = is_finished(&snapshot);
            futures::future::ready(Some(Ok(snapshot)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_run(
        &self,
        request: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let run = RunId(request.into_inner().run_id);
        let target = format!("run {run}");
        Ok(audited(
            self.ask(|reply| Event::CancelRun { run, reply }).await?,
            target,
        ))
    }

    async fn retry_stage(
        &self,
        request: Request<pb::RetryStageRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let request = request.into_inner();
        let (run, stage) = (RunId(request.run_id), request.stage);
        let target = format!("run {run} stage {stage}");
        // A finished run's durable records travel with the event, so the
        // engine never reads the store in its loop.
        let stored = if self.reader.is_active(run) {
            None
        } else {
            let store = self.reader.store().clone();
            tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
                let Some(record) = store.run(run)? else {
                    return Ok(None);
                };
                Ok(Some((record, store.stages(run)?)))
            })
            .await
            .map_err(|error| ApiError::Internal(format!("a read task failed: {error}")))??
        };
        Ok(audited(
            self.ask(|reply| Event::RetryStage {
                run,
                stage,
                stored,
                reply,
            })
            .await?,
            target,
        ))
    }

    type StreamLogsStream = BoxStream<pb::LogEntry>;

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let request = request.into_inner();
        let request = LogRequest {
            run: RunId(request.run_id),
            stage: Some(request.stage).filter(|name| !name.is_empty()),
            follow: request.follow,
            resume: request.resume,
        };
        let rx = crate::read::stream_logs(&self.reader, &self.events, request).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_agents(
        &self,
        _request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let agents = self.ask(|reply| Event::ListAgents { reply }).await?;
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn drain_agent(
        &self,
        request: Request<pb::DrainAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let name = request.into_inner().name;
        let target = format!("agent {name}");
        Ok(audited(
            self.ask(|reply| Event::DrainAgent { name, reply }).await?,
            target,
        ))
    }

    async fn list_artifacts(
        &self,
        request: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        let request = request.into_inner();
        let run_id = RunId(request.run_id);
        let run = self.reader.run(run_id).await?;
        if !request.stage.is_empty() && !run.stages.iter().any(|stage| stage.name == request.stage)
        {
            return Err(ApiError::NotFound(format!(
                "run {run_id} has no stage `{}`",
                request.stage
            ))
            .into());
        }
        let artifacts = run
            .stages
            .into_iter()
            .filter(|stage| request.stage.is_empty() || stage.name == request.stage)
            .flat_map(|stage| stage.outputs)
            .collect();
        Ok(Response::new(pb::ListArtifactsResponse { artifacts }))
    }

    async fn list_environments(
        &self,
        _request: Request<pb::ListEnvironmentsRequest>,
    ) -> Result<Response<pb::ListEnvironmentsResponse>, Status> {
        let environments = self
            .store
            .environments()
            .map_err(ApiError::from)?
            .iter()
            .map(views::environment)
            .collect();
        Ok(Response::new(pb::ListEnvironmentsResponse { environments }))
    }

    async fn environment_history(
        &self,
        request: Request<pb::EnvironmentHistoryRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        let request = request.into_inner();
        let environment = self.resolve_environment(&request.pipeline, &request.environment)?;
        let mut releases: Vec<pb::Release> = self
            .store
            .releases()
            .map_err(ApiError::from)?
            .iter()
            .filter(|release| release.environment == environment)
            .map(views::release)
            .collect();
        if releases.is_empty() {
            return Err(
                ApiError::NotFound(format!("environment `{environment}` has no releases")).into(),
            );
        }
        releases.reverse();
        Ok(Response::new(pb::ListReleasesResponse { releases }))
    }

    async fn metric_history(
        &self,
        request: Request<pb::MetricHistoryRequest>,
    ) -> Result<Response<pb::MetricHistoryResponse>, Status> {
        let request = request.into_inner();
        let environment = self.resolve_environment(&request.pipeline, &request.environment)?;
        let store = self.store.clone();
        let since_ms = request.since_ms;
        let (releases, samples) = tokio::task::spawn_blocking(move || {
            crate::delivery::history::read(store.as_ref(), &environment, since_ms)
        })
        .await
        .map_err(|_| ApiError::Internal("reading the metric history failed".into()))?
        .map_err(ApiError::from)?;
        Ok(Response::new(pb::MetricHistoryResponse {
            releases: releases.iter().map(views::release).collect(),
            samples: samples
                .into_iter()
                .map(|sample| pb::MetricSample {
                    release_id: sample.release,
                    at_ms: sample.at_ms,
                    values: sample
                        .values
                        .into_iter()
                        .filter_map(|(metric, value)| Some((metric, value?)))
                        .collect(),
                    breached: sample.breached,
                    error: sample.error.unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn get_release(
        &self,
        request: Request<pb::GetReleaseRequest>,
    ) -> Result<Response<pb::Release>, Status> {
        let id = request.into_inner().release_id;
        let release = self
            .store
            .release(id)
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("release {id} does not exist")))?;
        Ok(Response::new(lineage::release_view(
            &*self.store,
            &release,
        )?))
    }

    async fn approve_stage(
        &self,
        request: Request<pb::DecideStageRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        self.decide(request, true).await
    }

    async fn reject_stage(
        &self,
        request: Request<pb::DecideStageRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        self.decide(request, false).await
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let principal = Principal::of(&request)?;
        let user = principal.name.clone();
        let request = request.into_inner();
        let environment = self.resolve_environment(&request.pipeline, &request.environment)?;
        principal.check_pipeline(environment.pipeline())?;
        let to = Some(request.to_release).filter(|&id| id != 0);
        let target = format!("environment {environment}");
        let run = self
            .ask(|reply| Event::Rollback {
                environment,
                to,
                user,
                reply,
            })
            .await?;
        Ok(audited(run, target))
    }

    async fn unfreeze_environment(
        &self,
        request: Request<pb::EnvironmentHistoryRequest>,
    ) -> Result<Response<pb::Environment>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let environment = self.resolve_environment(&request.pipeline, &request.environment)?;
        principal.check_pipeline(environment.pipeline())?;
        let target = format!("environment {environment}");
        Ok(audited(
            self.ask(|reply| Event::Unfreeze { environment, reply })
                .await?,
            target,
        ))
    }

    async fn rollout_status(
        &self,
        request: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.rollout(request, RolloutCommand::Status).await
    }

    async fn rollout_promote(
        &self,
        request: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.rollout(request, RolloutCommand::Promote).await
    }

    async fn rollout_abort(
        &self,
        request: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let user = Principal::of(&request)?.name.clone();
        self.rollout(request, RolloutCommand::Abort { user }).await
    }

    async fn collect_garbage(
        &self,
        request: Request<pb::GcRequest>,
    ) -> Result<Response<pb::GcResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(
            self.collector
                .collect(request.keep_days, request.dry_run)
                .await?,
        ))
    }

    async fn list_caches(
        &self,
        request: Request<pb::ListCachesRequest>,
    ) -> Result<Response<pb::ListCachesResponse>, Status> {
        let entries = self.caches.list(&request.into_inner().pipeline).await?;
        Ok(Response::new(pb::ListCachesResponse {
            entries: entries.iter().map(caches::view).collect(),
        }))
    }

    async fn clear_caches(
        &self,
        request: Request<pb::ClearCachesRequest>,
    ) -> Result<Response<pb::ClearCachesResponse>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        if request.pipeline.is_empty() {
            return Err(Status::invalid_argument(
                "name the pipeline whose caches to clear",
            ));
        }
        principal.check_pipeline(&request.pipeline)?;
        let removed = self.caches.clear(&request.pipeline, &request.key).await?;
        Ok(Response::new(pb::ClearCachesResponse { removed }))
    }

    async fn get_provenance(
        &self,
        request: Request<pb::GetReleaseRequest>,
    ) -> Result<Response<pb::Provenance>, Status> {
        Ok(Response::new(
            self.provenance(request.into_inner().release_id)?,
        ))
    }

    async fn get_provenance_key(
        &self,
        _request: Request<pb::ProvenanceKeyRequest>,
    ) -> Result<Response<pb::ProvenanceKey>, Status> {
        Ok(Response::new(pb::ProvenanceKey {
            key_id: self.provenance_key.key_id.clone(),
            public_key_pem: self.provenance_key.public_pem.clone(),
        }))
    }

    async fn lineage(
        &self,
        request: Request<pb::LineageRequest>,
    ) -> Result<Response<pb::LineageResponse>, Status> {
        let digest = request.into_inner().digest;
        let store = self.store.clone();
        let uses = tokio::task::spawn_blocking(move || lineage::uses(&*store, &digest))
            .await
            .map_err(|error| Status::internal(format!("lineage query panicked: {error}")))??;
        Ok(Response::new(pb::LineageResponse { uses }))
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::Token>, Status> {
        Ok(Response::new(self.who_am_i(&Principal::of(&request)?)?))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let target = format!("token {}", request.name);
        Ok(audited(
            self.create_token(request, principal).await?,
            target,
        ))
    }

    async fn list_tokens(
        &self,
        _request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        Ok(Response::new(self.list_tokens()))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::Token>, Status> {
        let name = request.into_inner().name;
        let target = format!("token {name}");
        Ok(audited(self.revoke_token(name).await?, target))
    }

    async fn set_secret(
        &self,
        request: Request<pb::SetSecretRequest>,
    ) -> Result<Response<pb::SecretInfo>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let target = format!("secret {}", request.name);
        Ok(audited(self.set_secret(request, principal).await?, target))
    }

    async fn list_secrets(
        &self,
        _request: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        Ok(Response::new(self.list_secrets()?))
    }

    async fn delete_secret(
        &self,
        request: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::SecretInfo>, Status> {
        let name = request.into_inner().name;
        let target = format!("secret {name}");
        Ok(audited(self.delete_secret(name).await?, target))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        Ok(Response::new(self.list_audit(request.into_inner().limit)?))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(self.models_list().await?))
    }

    async fn get_model_version(
        &self,
        request: Request<pb::GetModelVersionRequest>,
    ) -> Result<Response<pb::ModelVersion>, Status> {
        Ok(Response::new(
            self.model_version(request.into_inner().model).await?,
        ))
    }

    async fn set_model_alias(
        &self,
        request: Request<pb::SetModelAliasRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        self.set_model_alias_request(request).await
    }

    async fn promote(
        &self,
        request: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        self.promote_request(request).await
    }
}

fn is_finished(run: &pb::Run) -> bool {
    matches!(
        pb::RunState::try_from(run.state),
        Ok(pb::RunState::Succeeded | pb::RunState::Failed | pb::RunState::Cancelled)
    )
}

fn pipeline_view(parsed: &ParsedPipelines, record: &PipelineRecord) -> pb::Pipeline {
    let stages = parsed
        .get(record)
        .map(|parsed| {
            parsed
                .stages
                .iter()
                .map(|stage| stage.name.clone())
                .collect()
        })
        .unwrap_or_default();
    pb::Pipeline {
        name: record.name.clone(),
        version: record.version,
        repo: record.repo.clone(),
        branch: record.branch.clone(),
        subdir: record.subdir.clone(),
        spec_yaml: record.spec_yaml.clone(),
        stages,
        registered_ms: record.registered_ms,
        path: record.path.clone(),
        digest: record.digest.clone(),
        repository: record.repository.clone(),
    }
}

/// A pipeline file's path inside a repository, `/`-separated and relative
/// ("" stays ""): no absolute path, no `..`.
fn normalized_file(file: &str) -> Result<String, ApiError> {
    let trimmed = file.trim().trim_start_matches("./");
    let escapes = trimmed.starts_with('/')
        || trimmed.contains('\\')
        || trimmed.split('/').any(|part| part == ".." || part == ".");
    if escapes {
        return Err(ApiError::InvalidArgument(format!(
            "pipeline file `{file}` must be a relative path inside the repository, like `kiln.yml` or `ml/kiln.yml`"
        )));
    }
    Ok(trimmed.to_owned())
}
