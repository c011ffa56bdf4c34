//! Runs libcontainer operations in a short-lived helper process (`spry-agent` re-executed).
//!
//! Why a separate process: libcontainer clones its intermediate and init processes from the
//! calling process with raw `clone`, which does not run glibc's fork handlers. Doing that from
//! the multi-threaded agent could leave a lock (malloc arena, stderr, tracing) held forever in
//! the child. libcontainer also `waitpid`s its intermediate process and runs hooks with
//! `std::process`, which would race with the agent's reaper. The helper is single-threaded, owns
//! those children, and stays alive until the agent has registered the container process's pid
//! with the reaper, so the process is reparented to the agent only afterwards.
//!
//! Protocol over a `SOCK_SEQPACKET` pair that is the helper's stdin: the helper says it is
//! ready, the agent sends one JSON [`HelperRequest`] with the stdio descriptors attached
//! (`SCM_RIGHTS`), the helper answers with one JSON [`HelperReply`], then waits for the agent
//! to close its end and exits. A helper whose agent end closes before any request (a spare
//! no longer needed) exits quietly.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use super::helper_process::{kill, take_spare, HelperProcess, READY};
use crate::reaper::{ExitWatch, Reaper};
use crate::sys;

/// The hidden subcommand that turns `spry-agent` into the helper.
pub const HELPER_SUBCOMMAND: &str = "container-helper";
const MAX_MESSAGE: usize = 64 * 1024;

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
    #[error("the container helper reported success without the new process's pid")]
    NoPid,
    #[error("{message}")]
    Failed { kind: FailureKind, message: String },
    #[error("the container helper task failed")]
    Join { source: tokio::task::JoinError },
}

/// A successful helper run.
pub struct HelperDone {
    /// The new process (create/exec) and its exit watch, registered before the helper exited.
    pub process: Option<(i32, ExitWatch)>,
}

/// Runs `request` in a helper process (the spare one when ready), handing it `fds` (stdin,
/// stdout, stderr when given).
pub async fn run(request: &HelperRequest, fds: Vec<OwnedFd>) -> Result<HelperDone, HelperError> {
    let payload = serde_json::to_vec(request).expect("helper requests always serialize");
    let spare = take_spare();
    let exchange = tokio::task::spawn_blocking(move || exchange(spare, &payload, fds))
        .await
        .map_err(|source| HelperError::Join { source })?;
    let Exchange {
        outcome,
        pid,
        mut exit,
    } = exchange?;
    if let Err(HelperError::Channel { source }) = &outcome {
        if *source == nix::errno::Errno::EAGAIN {
            tracing::error!(helper_pid = pid, "container helper timed out; killing it");
        }
        kill(pid);
    }
    // The helper exits once released; nothing needs it gone before we answer (the new
    // process is already registered with the reaper and is reparented to us when the
    // helper exits), and under TCG its exit costs ~100 ms of a container's start.
    tokio::spawn(async move {
        let exit = exit.wait().await;
        if exit.code != Some(0) {
            tracing::warn!(helper_pid = pid, code = ?exit.code, signal = ?exit.signal, "container helper ended abnormally");
        }
    });
    outcome
}

/// A finished exchange with a helper that has been released (told to exit).
struct Exchange {
    outcome: Result<HelperDone, HelperError>,
    pid: i32,
    exit: ExitWatch,
}

/// Sends the request to `spare`, or to a new helper when there is none or it has died.
fn exchange(
    spare: Option<HelperProcess>,
    payload: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Exchange, HelperError> {
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsgs };
    let send = |helper: &HelperProcess| {
        sendmsg::<()>(
            helper.control.as_raw_fd(),
            &[IoSlice::new(payload)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
    };
    let spare = spare.and_then(|spare| match send(&spare) {
        Ok(_) => Some(spare),
        Err(err) => {
            tracing::debug!(helper_pid = spare.pid, error = %err, "spare container helper is gone");
            None
        }
    });
    let helper = match spare {
        Some(helper) => helper,
        None => {
            let fresh = HelperProcess::start()?;
            send(&fresh).map_err(|source| HelperError::Channel { source })?;
            fresh
        }
    };
    drop(fds);
    let mut buf = vec![0u8; MAX_MESSAGE];
    let outcome = match helper.receive(&mut buf) {
        Err(source) => Err(HelperError::Channel { source }),
        Ok(0) => Err(HelperError::NoReply),
        Ok(len) => match serde_json::from_slice(&buf[..len]) {
            Err(source) => Err(HelperError::BadReply { source }),
            Ok(HelperReply::Done { pid }) => Ok(HelperDone {
                // Register before releasing the helper: the process is reparented to us only
                // when the helper exits.
                process: pid.map(|pid| (pid, Reaper::global().watch(pid))),
            }),
            Ok(HelperReply::Failed { kind, message }) => Err(HelperError::Failed { kind, message }),
        },
    };
    // Closing our end releases the helper.
    let HelperProcess { pid, exit, control } = helper;
    drop(control);
    Ok(Exchange { outcome, pid, exit })
}

/// The helper process's main: serves one request on stdin and exits.
pub fn helper_main() -> i32 {
    sys::restore_default_signals();
    let control = std::io::stdin().as_fd().try_clone_to_owned();
    let Ok(control) = control else {
        return 2;
    };
    if let Err(err) = sendmsg::<()>(
        control.as_raw_fd(),
        &[IoSlice::new(READY)],
        &[],
        MsgFlags::MSG_NOSIGNAL,
        None,
    ) {
        tracing::error!(error = %err, "container helper: cannot say it is ready");
        return 2;
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; 3]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            control.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(err) => {
                tracing::error!(error = %err, "container helper: no request");
                return 2;
            }
        };
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for cmsg in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = cmsg {
                    fds.extend(sys::adopt_received_fds(&raw));
                }
            }
        }
        (msg.bytes, fds)
    };
    if len == 0 {
        // A spare whose agent end was closed: nothing to do.
        return 0;
    }
    // A spare may have been started at idle priority; the container must not inherit it.
    if let Err(err) = sys::set_thread_nice(0) {
        tracing::warn!(error = %err, "container helper: cannot reset its priority");
    }
    let reply = match serde_json::from_slice::<HelperRequest>(&buf[..len]) {
        Ok(request) => execute(request, fds),
        Err(err) => HelperReply::Failed {
            kind: FailureKind::Internal,
            message: format!("unreadable helper request: {err}"),
        },
    };
    let payload = serde_json::to_vec(&reply).expect("helper replies always serialize");
    if let Err(err) = sendmsg::<()>(
        control.as_raw_fd(),
        &[IoSlice::new(&payload)],
        &[],
        MsgFlags::MSG_NOSIGNAL,
        None,
    ) {
        tracing::error!(error = %err, "container helper: cannot reply");
        return 2;
    }
    // Stay the parent of the new process until the agent has registered it.
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let _ = recvmsg::<()>(control.as_raw_fd(), &mut iov, None, MsgFlags::empty());
    0
}

fn execute(request: HelperRequest, fds: Vec<OwnedFd>) -> HelperReply {
    let result = match request {
        HelperRequest::Create {
            id,
            state_root,
            bundle,
            console_socket,
        } => create(id, state_root, bundle, console_socket, fds).map(Some),
        HelperRequest::Exec {
            id,
            state_root,
            process_json,
            console_socket,
        } => exec(id, state_root, process_json, console_socket, fds).map(Some),
        HelperRequest::Start { id, state_root } => Container::load(state_root.join(&id))
            .and_then(|mut container| container.start())
            .map(|()| None),
        HelperRequest::Delete { id, state_root } => {
            let dir = state_root.join(&id);
            if dir.exists() {
                Container::load(dir)
                    .and_then(|mut container| container.delete(true))
                    .map(|()| None)
            } else {
                Ok(None)
            }
        }
    };
    match result {
        Ok(pid) => HelperReply::Done { pid },
        Err(err) => HelperReply::Failed {
            kind: classify(&err),
            message: error_chain(&err),
        },
    }
}

fn with_stdio(mut builder: ContainerBuilder, fds: Vec<OwnedFd>) -> ContainerBuilder {
    let mut fds = fds.into_iter();
    if let (Some(stdin), Some(stdout), Some(stderr)) = (fds.next(), fds.next(), fds.next()) {
        builder = builder
            .with_stdin(stdin)
            .with_stdout(stdout)
            .with_stderr(stderr);
    }
    builder
}

fn create(
    id: String,
    state_root: PathBuf,
    bundle: PathBuf,
    console_socket: Option<PathBuf>,
    fds: Vec<OwnedFd>,
) -> Result<i32, LibcontainerError> {
    let builder = ContainerBuilder::new(id, SyscallType::default())
        .with_root_path(state_root)?
        .with_console_socket(console_socket);
    let container = with_stdio(builder, fds)
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()?;
    container
        .pid()
        .map(|pid| pid.as_raw())
        .ok_or(LibcontainerError::NoDirectory)
}

fn exec(
    id: String,
    state_root: PathBuf,
    process_json: PathBuf,
    console_socket: Option<PathBuf>,
    fds: Vec<OwnedFd>,
) -> Result<i32, LibcontainerError> {
    let builder = ContainerBuilder::new(id, SyscallType::default())
        .with_root_path(state_root)?
        .with_console_socket(console_socket);
    let pid = with_stdio(builder, fds)
        .as_tenant()
        .with_process(Some(process_json))
        .with_detach(true)
        .build()?;
    Ok(pid.as_raw())
}

/// Decides the failure kind from libcontainer's typed error variants.
fn classify(err: &LibcontainerError) -> FailureKind {
    match err {
        LibcontainerError::InvalidID(_)
        | LibcontainerError::MissingSpec(_)
        | LibcontainerError::InvalidSpec(_)
        | LibcontainerError::InvalidInput(_)
        | LibcontainerError::Spec(_) => FailureKind::InvalidSpec,
        LibcontainerError::IncorrectStatus(_) => FailureKind::WrongState,
        LibcontainerError::NoDirectory => FailureKind::NotFound,
        _ => FailureKind::Internal,
    }
}

/// The error and its sources, one sentence for a person.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_unknown_fields() {
        let request = HelperRequest::Start {
            id: "c1".into(),
            state_root: "/run/x".into(),
        };
        let json = serde_json::to_string(&request).unwrap();
        assert!(matches!(
            serde_json::from_str::<HelperRequest>(&json).unwrap(),
            HelperRequest::Start { id, .. } if id == "c1"
        ));
        let bad = r#"{"Start":{"id":"c1","state_root":"/x","extra":1}}"#;
        assert!(serde_json::from_str::<HelperRequest>(bad).is_err());
    }

    #[test]
    fn libcontainer_errors_are_classified_by_variant() {
        assert_eq!(
            classify(&LibcontainerError::InvalidInput("x".into())),
            FailureKind::InvalidSpec
        );
        assert_eq!(
            classify(&LibcontainerError::NoDirectory),
            FailureKind::NotFound
        );
        assert_eq!(classify(&LibcontainerError::Exist), FailureKind::Internal);
    }
}
