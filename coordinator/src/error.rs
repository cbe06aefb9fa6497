//! The one error type of the coordinator's API, converted to
//! `tonic::Status` in one place.

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

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        let message = error.to_string();
        match error {
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::InvalidArgument(_) => Status::invalid_argument(message),
            ApiError::FailedPrecondition(_) => Status::failed_precondition(message),
            ApiError::Store(_) => Status::internal(message),
            ApiError::AlreadyExists(_) => Status::already_exists(message),
            ApiError::Unauthenticated(_) => Status::unauthenticated(message),
            ApiError::PermissionDenied(_) => Status::permission_denied(message),
            ApiError::ResourceExhausted(_) => Status::resource_exhausted(message),
            ApiError::ShuttingDown => Status::unavailable(message),
        }
    }
}
