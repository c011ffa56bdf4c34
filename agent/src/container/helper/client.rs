//! The agent's side of a helper exchange: hand a request (and stdio) to a spare or fresh
//! helper, read its reply, register the new process with the reaper, release the helper.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use super::pool::{kill, take_spare, HelperProcess};
use super::protocol::{HelperError, HelperReply, HelperRequest, MAX_MESSAGE};
use crate::reaper::{ExitWatch, Reaper};

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
