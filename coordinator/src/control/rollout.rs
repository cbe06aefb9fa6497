//! `kiln rollout status|promote|abort ENV`: the engine's delivery
//! controller answers; promote and abort are audited like every delivery
//! action.

use kiln_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::ControlApi;
use crate::auth::{Principal, audited};
use crate::engine::{Event, RolloutCommand};

impl ControlApi {
    pub(super) async fn rollout(
        &self,
        request: Request<pb::RolloutRequest>,
        command: RolloutCommand,
    ) -> Result<Response<pb::Rollout>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let environment = self.resolve_environment(&request.pipeline, &request.environment)?;
        principal.check_pipeline(environment.pipeline())?;
        let target = format!("environment {environment}");
        let rollout = self
            .ask(|reply| Event::Rollout {
                environment,
                command,
                reply,
            })
            .await?;
        Ok(audited(rollout, target))
    }
}
