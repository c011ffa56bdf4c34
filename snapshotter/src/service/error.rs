//! Errors of the snapshots service and their gRPC status codes.

use std::path::PathBuf;

use super::filter::FilterError;
use super::store::StoreError;

/// Errors of snapshot operations.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("snapshot {key:?} does not exist")]
    NotFound { key: String },
    #[error("snapshot {key:?} already exists")]
    AlreadyExists { key: String },
    #[error("parent {parent:?} is not a committed snapshot")]
    ParentNotCommitted { parent: String },
    #[error("snapshot {key:?} is not active")]
    NotActive { key: String },
    #[error("snapshot {key:?} has children")]
    HasChildren { key: String },
    #[error("update of field {field:?} is not supported")]
    UpdateField { field: String },
    #[error("invalid walk filter")]
    Filter(#[from] FilterError),
    #[error("failed to persist snapshot metadata")]
    Store(#[from] StoreError),
    #[error("failed to create {path}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to measure usage of {path}")]
    Usage {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to list {path}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a blocking task failed")]
    Join { source: tokio::task::JoinError },
    #[error("parent {parent:?} includes a poisoned layer: {reason}")]
    Poisoned { parent: String, reason: String },
}

impl From<ServiceError> for tonic::Status {
    fn from(err: ServiceError) -> Self {
        let message = crate::fs::error_chain(&err);
        match err {
            ServiceError::NotFound { .. } => tonic::Status::not_found(message),
            ServiceError::AlreadyExists { .. } => tonic::Status::already_exists(message),
            ServiceError::ParentNotCommitted { .. }
            | ServiceError::NotActive { .. }
            | ServiceError::HasChildren { .. }
            | ServiceError::Poisoned { .. } => tonic::Status::failed_precondition(message),
            ServiceError::UpdateField { .. } | ServiceError::Filter(_) => {
                tonic::Status::invalid_argument(message)
            }
            ServiceError::Store(_)
            | ServiceError::CreateDir { .. }
            | ServiceError::Usage { .. }
            | ServiceError::ReadDir { .. }
            | ServiceError::Join { .. } => tonic::Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn maps_to_containerd_error_codes() {
        let code = |e: ServiceError| tonic::Status::from(e).code();
        assert_eq!(
            code(ServiceError::NotFound { key: "k".into() }),
            Code::NotFound
        );
        assert_eq!(
            code(ServiceError::AlreadyExists { key: "k".into() }),
            Code::AlreadyExists
        );
        assert_eq!(
            code(ServiceError::HasChildren { key: "k".into() }),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(ServiceError::NotActive { key: "k".into() }),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(ServiceError::Poisoned {
                parent: "p".into(),
                reason: "r".into()
            }),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(ServiceError::UpdateField {
                field: "kind".into()
            }),
            Code::InvalidArgument
        );
        let status = tonic::Status::from(ServiceError::NotFound { key: "abc".into() });
        assert!(status.message().contains("\"abc\""));
    }
}
