//! The security RPCs of `ControlService`: tokens, secrets and the audit
//! log. Token and secret writes go through the group committer and are
//! durable before the reply.

use kiln_proto::v1 as pb;
use tonic::Status;

use super::ControlApi;
use crate::auth::{Principal, Role};
use crate::error::ApiError;
use crate::store::{AuditRecord, SecretRecord, TokenRecord};

/// Audit entries listed when the request says 0.
const DEFAULT_AUDIT_LIMIT: usize = 100;

impl ControlApi {
    pub(super) fn who_am_i(&self, principal: &Principal) -> Result<pb::Token, ApiError> {
        self.tokens
            .list()
            .iter()
            .find(|record| record.name == principal.name)
            .map(token_view)
            .ok_or_else(|| ApiError::NotFound(format!("no token named `{}`", principal.name)))
    }

    pub(super) async fn create_token(
        &self,
        request: pb::CreateTokenRequest,
        principal: Principal,
    ) -> Result<pb::CreateTokenResponse, Status> {
        let role = role_of(request.role)?;
        let pipeline = Some(request.pipeline).filter(|name| !name.is_empty());
        let (record, secret) = self
            .tokens
            .create(&request.name, role, pipeline, &principal.name)
            .await?;
        Ok(pb::CreateTokenResponse {
            token: Some(token_view(&record)),
            secret,
        })
    }

    pub(super) fn list_tokens(&self) -> pb::ListTokensResponse {
        pb::ListTokensResponse {
            tokens: self.tokens.list().iter().map(token_view).collect(),
        }
    }

    pub(super) async fn revoke_token(&self, name: String) -> Result<pb::Token, Status> {
        let record = self.tokens.revoke(&name).await?;
        Ok(token_view(&record))
    }

    pub(super) async fn set_secret(
        &self,
        request: pb::SetSecretRequest,
        principal: Principal,
    ) -> Result<pb::SecretInfo, Status> {
        let record = self
            .secrets
            .put(&request.name, &request.value, &principal.name)
            .await?;
        Ok(secret_view(&record))
    }

    pub(super) fn list_secrets(&self) -> Result<pb::ListSecretsResponse, ApiError> {
        Ok(pb::ListSecretsResponse {
            secrets: self.secrets.list()?.iter().map(secret_view).collect(),
        })
    }

    pub(super) async fn delete_secret(&self, name: String) -> Result<pb::SecretInfo, Status> {
        let record = self.secrets.remove(&name).await?;
        Ok(secret_view(&record))
    }

    pub(super) fn list_audit(&self, limit: u32) -> Result<pb::ListAuditResponse, ApiError> {
        let limit = if limit == 0 {
            DEFAULT_AUDIT_LIMIT
        } else {
            limit as usize
        };
        Ok(pb::ListAuditResponse {
            entries: self.store.audit(limit)?.iter().map(audit_view).collect(),
        })
    }
}

fn role_of(role: i32) -> Result<Role, ApiError> {
    match pb::Role::try_from(role) {
        Ok(pb::Role::Viewer) => Ok(Role::Viewer),
        Ok(pb::Role::Operator) => Ok(Role::Operator),
        Ok(pb::Role::Admin) => Ok(Role::Admin),
        Ok(pb::Role::Agent) => Ok(Role::Agent),
        Ok(pb::Role::Pipeline) => Ok(Role::Pipeline),
        _ => Err(ApiError::InvalidArgument(
            "role must be viewer, operator, admin, agent or pipeline".into(),
        )),
    }
}

fn token_view(record: &TokenRecord) -> pb::Token {
    let role = match record.role {
        Role::Viewer => pb::Role::Viewer,
        Role::Operator => pb::Role::Operator,
        Role::Admin => pb::Role::Admin,
        Role::Agent => pb::Role::Agent,
        Role::Pipeline => pb::Role::Pipeline,
    };
    pb::Token {
        name: record.name.clone(),
        role: role as i32,
        pipeline: record.pipeline.clone().unwrap_or_default(),
        created_ms: record.created_ms,
        created_by: record.created_by.clone(),
        revoked_ms: record.revoked_ms.unwrap_or_default(),
    }
}

fn secret_view(record: &SecretRecord) -> pb::SecretInfo {
    pb::SecretInfo {
        name: record.name.clone(),
        updated_ms: record.updated_ms,
        updated_by: record.updated_by.clone(),
    }
}

fn audit_view(record: &AuditRecord) -> pb::AuditEntry {
    pb::AuditEntry {
        at_ms: record.at_ms,
        principal: record.principal.clone(),
        method: record.method.clone(),
        target: record.target.clone(),
        outcome: record.outcome.clone(),
        message: record.message.clone(),
        peer: record.peer.clone(),
    }
}
