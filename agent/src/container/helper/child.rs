//! The helper process's side: `spry-agent container-helper` serves one request on its stdin
//! with libcontainer, replies, and stays the parent of the new process until released.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessageOwned, MsgFlags};

use super::protocol::{FailureKind, HelperReply, HelperRequest, ACCEPTED, MAX_MESSAGE, READY};
use crate::error_chain;
use crate::sys;

/// The helper process's main: serves one request on stdin and exits.
pub fn helper_main() -> i32 {
    sys::restore_default_signals();
    let control = std::io::stdin().as_fd().try_clone_to_owned();
    let Ok(control) = control else {
        return 2;
    };
    if let Err(err) = say(&control, READY) {
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
    // Before any work: until the agent reads this, it may hand the request to another helper.
    if let Err(err) = say(&control, ACCEPTED) {
        tracing::error!(error = %err, "container helper: cannot acknowledge its request");
        return 2;
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
    if let Err(err) = say(&control, &payload) {
        tracing::error!(error = %err, "container helper: cannot reply");
        return 2;
    }
    // Stay the parent of the new process until the agent has registered it.
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let _ = recvmsg::<()>(control.as_raw_fd(), &mut iov, None, MsgFlags::empty());
    0
}

/// Sends one message on the control socket.
fn say(control: &OwnedFd, message: &[u8]) -> nix::Result<usize> {
    sendmsg::<()>(
        control.as_raw_fd(),
        &[IoSlice::new(message)],
        &[],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
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

/// What create and exec share: the container, its state root, its terminal or stdio.
fn builder(
    id: String,
    state_root: PathBuf,
    console_socket: Option<PathBuf>,
    fds: Vec<OwnedFd>,
) -> Result<ContainerBuilder, LibcontainerError> {
    let builder = ContainerBuilder::new(id, SyscallType::default())
        .with_root_path(state_root)?
        .with_console_socket(console_socket);
    Ok(with_stdio(builder, fds))
}

fn create(
    id: String,
    state_root: PathBuf,
    bundle: PathBuf,
    console_socket: Option<PathBuf>,
    fds: Vec<OwnedFd>,
) -> Result<i32, LibcontainerError> {
    let container = builder(id, state_root, console_socket, fds)?
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
    let pid = builder(id, state_root, console_socket, fds)?
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
