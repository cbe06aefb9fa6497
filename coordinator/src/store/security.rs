//! Records of access control: tokens, encrypted secrets and the audit log.

use serde::{Deserialize, Serialize};

/// What a token may do; see `auth::Rule` for the method table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Role {
    Viewer,
    Operator,
    Admin,
    /// Only the agent service and the transfers agents make.
    Agent,
    /// Only registers and triggers one pipeline.
    Pipeline,
}

/// A bearer token. Only the sha256 of its secret is kept: the secret is
/// 256 random bits, so a plain hash cannot be reversed by guessing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct TokenRecord {
    pub(crate) name: String,
    pub(crate) role: Role,
    /// The pipeline a `Pipeline` token is limited to.
    pub(crate) pipeline: Option<String>,
    /// Hex sha256 of the bearer secret.
    pub(crate) hash: String,
    pub(crate) created_ms: u64,
    pub(crate) created_by: String,
    pub(crate) revoked_ms: Option<u64>,
}

/// A secret, sealed with the coordinator's secret key (AEAD, the name is
/// the associated data so a sealed value cannot be moved to another name).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct SecretRecord {
    pub(crate) name: String,
    /// Nonce followed by ciphertext and tag.
    pub(crate) sealed: Vec<u8>,
    pub(crate) updated_ms: u64,
    pub(crate) updated_by: String,
}

/// One state-changing call: who, what, when and how it ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct AuditRecord {
    pub(crate) id: u64,
    pub(crate) at_ms: u64,
    pub(crate) principal: String,
    pub(crate) method: String,
    pub(crate) target: String,
    /// gRPC status code name, "OK" on success.
    pub(crate) outcome: String,
    pub(crate) message: String,
    pub(crate) peer: String,
}
