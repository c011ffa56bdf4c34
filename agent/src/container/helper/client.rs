//! The agent's side of a helper exchange: hand a request (and stdio) to a spare or fresh
//! helper, read its reply, register the new process with the reaper, release the helper.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use super::pool::{kill, refill_spares, take_spare, HelperProcess};
use super::protocol::{HelperError, HelperReply, HelperRequest, ACCEPTED, MAX_MESSAGE};
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
    let exchange = tokio::task::spawn_blocking(move || exchange(spare, &payload, fds)).await;
    // Whatever the outcome: a spare may have been taken.
    refill_spares();
    let Exchange {
        outcome,
        pid,
        mut exit,
    } = exchange.map_err(|source| HelperError::Join { source })??;
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

/// Sends the request to `spare`, or to a new helper when there is none or it died before
/// taking the request (a killed spare may still look alive for a moment after its kill).
fn exchange(
    spare: Option<HelperProcess>,
    payload: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Exchange, HelperError> {
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsgs };
    let spare = match spare {
        Some(spare) => match renice_and_hand_over(&spare, payload, cmsgs) {
            Ok(HandOver::Taken) => Some(spare),
            Ok(HandOver::Gone) => {
                tracing::debug!(helper_pid = spare.pid, "spare container helper is gone");
                None
            }
            Err(err) => {
                spare.kill();
                return Err(err);
            }
        },
        None => None,
    };
    let helper = match spare {
        Some(helper) => helper,
        None => {
            let fresh = HelperProcess::start()?;
            match hand_over(&fresh, payload, cmsgs) {
                Ok(HandOver::Taken) => fresh,
                Ok(HandOver::Gone) => {
                    fresh.kill();
                    return Err(HelperError::NoReply);
                }
                Err(err) => {
                    fresh.kill();
                    return Err(err);
                }
            }
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

/// Whether a helper took the request.
enum HandOver {
    /// It acknowledged the request and now works on it.
    Taken,
    /// It ended before taking the request: it did nothing with it.
    Gone,
}

/// Hands the request to a spare, which waited at idle priority: first back to normal, so
/// that from its first instruction on the request it does not share the vCPU evenly with
/// a refill starting the next spare (the helper also resets itself, but only after it
/// has read and acknowledged the request).
fn renice_and_hand_over(
    spare: &HelperProcess,
    payload: &[u8],
    cmsgs: &[ControlMessage],
) -> Result<HandOver, HelperError> {
    if let Err(err) = crate::sys::set_nice(spare.pid, 0) {
        // A spare that is gone reads as ESRCH; the hand-over then says so.
        tracing::debug!(helper_pid = spare.pid, error = %err, "cannot reset a spare helper's priority");
    }
    hand_over(spare, payload, cmsgs)
}

/// Sends the request and waits for the helper's acknowledgement.
fn hand_over(
    helper: &HelperProcess,
    payload: &[u8],
    cmsgs: &[ControlMessage],
) -> Result<HandOver, HelperError> {
    use nix::errno::Errno;
    let ended = |err: Errno| matches!(err, Errno::EPIPE | Errno::ECONNRESET | Errno::ECONNREFUSED);
    match sendmsg::<()>(
        helper.control.as_raw_fd(),
        &[IoSlice::new(payload)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    ) {
        Ok(_) => {}
        Err(err) if ended(err) => return Ok(HandOver::Gone),
        Err(source) => return Err(HelperError::Channel { source }),
    }
    let mut buf = [0u8; 16];
    match helper.receive(&mut buf) {
        Ok(0) => Ok(HandOver::Gone),
        Ok(len) if buf[..len] == *ACCEPTED => Ok(HandOver::Taken),
        Ok(_) => Err(HelperError::Unacknowledged),
        Err(err) if ended(err) => Ok(HandOver::Gone),
        Err(source) => Err(HelperError::Channel { source }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use nix::sys::socket::{recv, send, socketpair, AddressFamily, SockFlag, SockType};

    use super::*;

    /// A helper handle over one end of a fresh pair; the other end plays the helper.
    fn pair() -> (HelperProcess, OwnedFd) {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let helper = HelperProcess {
            pid: i32::MAX,
            exit: Reaper::global().watch(i32::MAX),
            control: ours,
        };
        (helper, theirs)
    }

    #[test]
    fn a_helper_that_ends_before_acknowledging_did_not_take_the_request() {
        // Ended before the request was sent.
        let (helper, theirs) = pair();
        drop(theirs);
        assert!(matches!(hand_over(&helper, b"{}", &[]), Ok(HandOver::Gone)));
        // Ended after the request was queued to it (killed while still looking alive).
        let (helper, theirs) = pair();
        let dying = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(theirs);
        });
        assert!(matches!(hand_over(&helper, b"{}", &[]), Ok(HandOver::Gone)));
        dying.join().unwrap();
    }

    #[test]
    fn an_acknowledged_request_is_taken_and_anything_else_is_an_error() {
        let (helper, theirs) = pair();
        let serving = std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            let len = recv(theirs.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
            assert_eq!(&buf[..len], b"{}");
            send(theirs.as_raw_fd(), ACCEPTED, MsgFlags::empty()).unwrap();
            theirs
        });
        assert!(matches!(
            hand_over(&helper, b"{}", &[]),
            Ok(HandOver::Taken)
        ));
        drop(serving.join().unwrap());

        let (helper, theirs) = pair();
        send(theirs.as_raw_fd(), b"ready", MsgFlags::empty()).unwrap();
        assert!(matches!(
            hand_over(&helper, b"{}", &[]),
            Err(HelperError::Unacknowledged)
        ));
    }
}
