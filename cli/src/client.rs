//! The connection to a coordinator's `ControlService`.
//!
//! Every call goes through [`Coordinator`] so that each failure is turned
//! into a [`CliError`] that knows the coordinator's URL, in one place. The
//! long-lived streams (`WatchRun`, `StreamLogs`) hand back gRPC statuses
//! instead, because their followers reconnect after some of them
//! (`reconnect`).

use std::time::Duration;

use kiln_common::channel::{ClientOptions, CoordinatorEndpoint, KilnChannel};
use kiln_proto::v1 as pb;
use kiln_proto::v1::artifact_service_client::ArtifactServiceClient;
use kiln_proto::v1::control_service_client::ControlServiceClient;

use tonic::{Status, Streaming};

use crate::error::CliError;
use crate::reconnect::{self, Reconnect};

/// Long enough for a coordinator on another continent, short enough that a
/// typo in `--coordinator` does not look like a hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected `ControlService` client.
#[derive(Clone)]
pub(crate) struct Coordinator {
    /// As the user gave it, for error messages.
    url: String,
    rpc: ControlServiceClient<KilnChannel>,
    /// The same connection, for blob transfers.
    channel: KilnChannel,
    /// How long a follower (`logs -f`, `run --wait`) keeps reconnecting
    /// to a coordinator that went away.
    patience: Duration,
}

impl Coordinator {
    /// Connects eagerly, so that "nobody listens there" is reported as such
    /// (exit 3) before any request is built.
    /// A wrong TLS file or token is an input error (exit 2); a failed
    /// handshake counts as unreachable (exit 3).
    pub(crate) async fn connect(url: &str, options: &ClientOptions) -> Result<Self, CliError> {
        // `host:port` is what people paste; tonic needs a scheme.
        let full_url = if url.contains("://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        let endpoint = CoordinatorEndpoint::new(&full_url, options)
            .map_err(|e| CliError::Input(e.to_string()))?;
        let channel = endpoint
            .map_endpoint(|endpoint| endpoint.connect_timeout(CONNECT_TIMEOUT))
            .connect()
            .await
            .map_err(|e| CliError::unreachable(url, &e))?;
        Ok(Coordinator {
            url: url.to_owned(),
            rpc: ControlServiceClient::new(channel.clone()),
            channel,
            patience: reconnect::DEFAULT_PATIENCE,
        })
    }

    /// A client of the coordinator's `ArtifactService` on this connection.
    pub(crate) fn artifacts(&self) -> ArtifactServiceClient<KilnChannel> {
        // Chunks are 1 MiB; leave room above tonic's 4 MiB default anyway.
        ArtifactServiceClient::new(self.channel.clone()).max_decoding_message_size(8 << 20)
    }

    /// Turns a transfer failure into one readable line.
    pub(crate) fn transfer_failed(&self, error: kiln_agent::transfer::TransferError) -> CliError {
        CliError::Coordinator(error.to_string())
    }

    pub(crate) async fn list_artifacts(
        &self,
        request: pb::ListArtifactsRequest,
    ) -> Result<Vec<pb::Artifact>, CliError> {
        let reply = self.rpc.clone().list_artifacts(request).await;
        reply
            .map(|response| response.into_inner().artifacts)
            .map_err(|s| self.fail(s))
    }

    pub(crate) async fn collect_garbage(
        &self,
        request: pb::GcRequest,
    ) -> Result<pb::GcResponse, CliError> {
        let reply = self.rpc.clone().collect_garbage(request).await;
        reply
            .map(tonic::Response::into_inner)
            .map_err(|s| self.fail(s))
    }

    /// The control client, for calls that need no special handling.
    pub(crate) fn control(&self) -> ControlServiceClient<KilnChannel> {
        self.rpc.clone()
    }

    /// One readable line for a failed call.
    pub(crate) fn failed(&self, status: tonic::Status) -> CliError {
        self.fail(status)
    }

    fn fail(&self, status: tonic::Status) -> CliError {
        CliError::from_status(status, &self.url)
    }

    /// One unary call, with the error mapping every call needs.
    pub(crate) async fn call<T, F, Fut>(&self, call: F) -> Result<T, CliError>
    where
        F: FnOnce(ControlServiceClient<KilnChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        call(self.rpc.clone())
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.fail(s))
    }

    pub(crate) async fn register_pipeline(
        &self,
        request: pb::RegisterPipelineRequest,
    ) -> Result<pb::RegisterPipelineResponse, CliError> {
        let reply = self.rpc.clone().register_pipeline(request).await;
        reply
            .map(tonic::Response::into_inner)
            .map_err(|s| self.fail(s))
    }

    pub(crate) async fn add_repository(
        &self,
        request: pb::AddRepositoryRequest,
    ) -> Result<pb::AddRepositoryResponse, CliError> {
        let reply = self.rpc.clone().add_repository(request).await;
        reply
            .map(tonic::Response::into_inner)
            .map_err(|s| self.fail(s))
    }

    pub(crate) async fn list_pipelines(&self) -> Result<Vec<pb::Pipeline>, CliError> {
        let reply = self
            .rpc
            .clone()
            .list_pipelines(pb::ListPipelinesRequest {})
            .await;
        reply
            .map(|r| r.into_inner().pipelines)
            .map_err(|s| self.fail(s))
    }

    /// `version` 0 = the latest.
    pub(crate) async fn get_pipeline(
        &self,
        name: &str,
        version: u32,
    ) -> Result<pb::Pipeline, CliError> {
        let request = pb::GetPipelineRequest {
            name: name.to_owned(),
            version,
        };
        let reply = self.rpc.clone().get_pipeline(request).await;
        reply
            .map(tonic::Response::into_inner)
            .map_err(|s| self.fail(s))
    }

    pub(crate) async fn trigger_run(
        &self,
        request: pb::TriggerRunRequest,
    ) -> Result<pb::Run, CliError> {
        let reply = self.rpc.clone().trigger_run(request).await;
        reply
            .map(tonic::Response::into_inner)
            .map_err(|s| self.fail(s))
    }

    pub(crate) async fn get_run(&self, run_id: u64) -> Result<pb::Run, CliError> {
        let reply = self.rpc.clone().get_run(pb::GetRunRequest { run_id }).await;
        reply
            .map(tonic::Response::into_inner)
            .map_err(|s| self.fail(s))
    }

    pub(crate) async fn list_runs(
        &self,
        request: pb::ListRunsRequest,
    ) -> Result<Vec<pb::Run>, CliError> {
        let reply = self.rpc.clone().list_runs(request).await;
        reply.map(|r| r.into_inner().runs).map_err(|s| self.fail(s))
    }

    /// The run now and after every change; ends once the run is finished.
    /// Failures stay gRPC statuses: a follower decides which of them it
    /// reconnects after (`reconnect::is_resumable`).
    pub(crate) async fn watch_run(&self, run_id: u64) -> Result<Streaming<pb::Run>, Status> {
        let reply = self
            .rpc
            .clone()
            .watch_run(pb::GetRunRequest { run_id })
            .await;
        reply.map(tonic::Response::into_inner)
    }

    pub(crate) async fn cancel_run(&self, run_id: u64) -> Result<pb::Run, CliError> {
        let reply = self
            .rpc
            .clone()
            .cancel_run(pb::CancelRunRequest { run_id })
            .await;
        reply
            .map(tonic::Response::into_inner)
            .map_err(|s| self.fail(s))
    }

    pub(crate) async fn retry_stage(&self, run_id: u64, stage: &str) -> Result<pb::Run, CliError> {
        let request = pb::RetryStageRequest {
            run_id,
            stage: stage.to_owned(),
        };
        let reply = self.rpc.clone().retry_stage(request).await;
        reply
            .map(tonic::Response::into_inner)
            .map_err(|s| self.fail(s))
    }

    /// A run's (or a stage's) log lines; failures stay gRPC statuses, as
    /// for [`Coordinator::watch_run`].
    pub(crate) async fn stream_logs(
        &self,
        request: pb::StreamLogsRequest,
    ) -> Result<Streaming<pb::LogEntry>, Status> {
        let reply = self.rpc.clone().stream_logs(request).await;
        reply.map(tonic::Response::into_inner)
    }

    /// The run, or the status the call failed with (for followers that
    /// check a run between reconnects).
    pub(crate) async fn get_run_status(&self, run_id: u64) -> Result<pb::Run, Status> {
        let reply = self.rpc.clone().get_run(pb::GetRunRequest { run_id }).await;
        reply.map(tonic::Response::into_inner)
    }

    /// How a follower of this coordinator reconnects after its stream
    /// broke.
    pub(crate) fn reconnect(&self) -> Reconnect {
        Reconnect::new(&self.url, self.patience)
    }

    /// How long followers keep reconnecting (`--reconnect-for`).
    pub(crate) fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    pub(crate) async fn list_agents(&self) -> Result<Vec<pb::Agent>, CliError> {
        let reply = self.rpc.clone().list_agents(pb::ListAgentsRequest {}).await;
        reply
            .map(|r| r.into_inner().agents)
            .map_err(|s| self.fail(s))
    }

    pub(crate) async fn drain_agent(&self, name: &str) -> Result<pb::Agent, CliError> {
        let request = pb::DrainAgentRequest {
            name: name.to_owned(),
        };
        let reply = self.rpc.clone().drain_agent(request).await;
        reply
            .map(tonic::Response::into_inner)
            .map_err(|s| self.fail(s))
    }
}
