//! The one error type of the coordinator's API, converted to
//! `tonic::Status` (and HTTP status codes) in one place.

use tonic::Status;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A fault of the coordinator itself (not of the request); the detail
    /// is logged, the caller is told only that it happened.
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("the coordinator is shutting down")]
    ShuttingDown,
}

/// What a caller sees of an internal fault: no storage engine's own text.
const INTERNAL_MESSAGE: &str = "internal error in the coordinator; its log has the details";

impl ApiError {
    /// The HTTP status of this error, for the webhook endpoint.
    pub(crate) fn http_status(&self) -> u16 {
        match self {
            Self::NotFound(_) => 404,
            Self::InvalidArgument(_) => 400,
            Self::FailedPrecondition(_) => 422,
            Self::AlreadyExists(_) => 409,
            Self::Unauthenticated(_) => 401,
            Self::PermissionDenied(_) => 403,
            Self::ResourceExhausted(_) => 429,
            Self::ShuttingDown => 503,
            Self::Store(_) | Self::Internal(_) => 500,
        }
    }

    /// The message a caller may see; internal faults are logged here with
    /// their detail and replaced by a generic line.
    pub(crate) fn public_message(&self) -> String {
        match self {
            Self::Store(_) | Self::Internal(_) => {
                tracing::error!(error = %self, "internal error answered to a caller");
                INTERNAL_MESSAGE.to_owned()
            }
            other => other.to_string(),
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        let message = error.public_message();
        match error {
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::InvalidArgument(_) => Status::invalid_argument(message),
            ApiError::FailedPrecondition(_) => Status::failed_precondition(message),
            ApiError::Store(_) | ApiError::Internal(_) => Status::internal(message),
            ApiError::AlreadyExists(_) => Status::already_exists(message),
            ApiError::Unauthenticated(_) => Status::unauthenticated(message),
            ApiError::PermissionDenied(_) => Status::permission_denied(message),
            ApiError::ResourceExhausted(_) => Status::resource_exhausted(message),
            ApiError::ShuttingDown => Status::unavailable(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_faults_reach_callers_without_their_detail() {
        let corrupt = StoreError::Corrupt {
            key: "r\\x00".into(),
            source: serde_json::from_str::<u8>("x").unwrap_err(),
        };
        let status = Status::from(ApiError::from(corrupt));
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), INTERNAL_MESSAGE);
        let status = Status::from(ApiError::NotFound("run 7 does not exist".into()));
        assert_eq!(status.message(), "run 7 does not exist");
    }
}
