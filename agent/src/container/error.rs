//! Errors of container operations.

use std::path::PathBuf;

use super::cgroup::CgroupError;
use super::helper::{FailureKind, HelperError};
use super::spec::SpecError;
use super::stdio::StdioError;
use crate::storage::StorageError;

/// Errors of container operations.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container {id} does not exist")]
    NotFound { id: String },
    #[error("process {exec_id} does not exist in container {id}")]
    ExecNotFound { id: String, exec_id: String },
    #[error("container {id} already exists")]
    AlreadyExists { id: String },
    #[error("process {exec_id} already exists in container {id}")]
    ExecAlreadyExists { id: String, exec_id: String },
    #[error("cannot {action} container {id}: it is {state}")]
    WrongState {
        id: String,
        action: &'static str,
        state: &'static str,
    },
    #[error("process {pid} has already exited")]
    ProcessExited { pid: i32 },
    #[error("invalid spec for container {id}")]
    Spec { id: String, source: SpecError },
    #[error("invalid resources for container {id}")]
    Resources {
        id: String,
        source: serde_json::Error,
    },
    #[error("storage of container {id} failed")]
    Storage { id: String, source: StorageError },
    #[error("libcontainer failed for container {id}")]
    Runtime { id: String, source: HelperError },
    #[error("stdio of container {id} failed")]
    Stdio { id: String, source: StdioError },
    #[error("cgroup of container {id} failed")]
    Cgroup { id: String, source: CgroupError },
    #[error("failed to signal process {pid}")]
    Signal { pid: i32, source: nix::Error },
    #[error("I/O on {path} failed")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("timed out waiting for the pty of container {id}")]
    PtyTimeout { id: String },
    #[error("processes of container {id} survived SIGKILL")]
    Unkillable { id: String },
}

impl ContainerError {
    /// The libcontainer failure kind, when this is a helper failure.
    pub fn runtime_kind(&self) -> Option<FailureKind> {
        match self {
            ContainerError::Runtime {
                source: HelperError::Failed { kind, .. },
                ..
            } => Some(*kind),
            _ => None,
        }
    }
}
