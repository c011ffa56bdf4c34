//! The messages between the agent and a container helper, over a `SOCK_SEQPACKET` pair:
//! the helper's [`READY`], one JSON [`HelperRequest`] (stdio descriptors attached with
//! `SCM_RIGHTS`), the helper's [`ACCEPTED`], one JSON [`HelperReply`].

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The hidden subcommand that turns `spry-agent` into the helper.
pub const HELPER_SUBCOMMAND: &str = "container-helper";
pub(super) const MAX_MESSAGE: usize = 64 * 1024;

/// One libcontainer operation.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum HelperRequest {
    /// OCI create from `bundle/config.json`; the stdio descriptors are attached unless a
    /// console socket is given.
    Create {
        id: String,
        state_root: PathBuf,
        bundle: PathBuf,
        console_socket: Option<PathBuf>,
    },
    /// Starts another process (OCI Process JSON at `process_json`) in a running container.
    Exec {
        id: String,
        state_root: PathBuf,
        process_json: PathBuf,
        console_socket: Option<PathBuf>,
    },
    /// OCI start.
    Start { id: String, state_root: PathBuf },
    /// OCI delete (forced): removes the cgroup and the state directory.
    Delete { id: String, state_root: PathBuf },
}

/// What went wrong in the helper, as far as the caller needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The spec or process was rejected.
    InvalidSpec,
    /// The container is not in a state that allows the operation.
    WrongState,
    /// libcontainer has no state for the container.
    NotFound,
    /// Anything else.
    Internal,
}

/// The helper's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum HelperReply {
    Done { pid: Option<i32> },
    Failed { kind: FailureKind, message: String },
}

/// Errors of running the helper.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("failed to start the container helper")]
    Spawn { source: std::io::Error },
    #[error("failed to talk to the container helper")]
    Channel { source: nix::Error },
    #[error("the container helper sent an unreadable reply")]
    BadReply { source: serde_json::Error },
    #[error("the container helper exited without replying")]
    NoReply,
    #[error("the container helper did not acknowledge its request")]
    Unacknowledged,
    #[error("the container helper reported success without the new process's pid")]
    NoPid,
    #[error("{message}")]
    Failed { kind: FailureKind, message: String },
    #[error("the container helper task failed")]
    Join { source: tokio::task::JoinError },
}

/// The first message every helper sends: it is ready for its request.
pub(super) const READY: &[u8] = b"ready";
/// The helper's first answer to its request, sent before it does anything with it: a
/// helper that ends before sending it has done nothing, so the request may go to another.
pub(super) const ACCEPTED: &[u8] = b"accepted";

/// How long a single helper exchange (start-up, or one operation) may take.
pub(super) const HELPER_TIMEOUT: Duration = Duration::from_secs(120);
