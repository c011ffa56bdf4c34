//! Watching QEMU come up and go away: QMP negotiation that fails fast when QEMU dies,
//! and how an exit is described.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::cmdline::StatePaths;
use super::console::{self, TAIL_LINES};
use super::qmp::{QmpClient, QmpError};
use super::{VmError, VmExit};

/// QEMU opens its QMP socket before the guest runs; a loaded host is slow.
const QMP_SOCKET_TIMEOUT: Duration = Duration::from_secs(20);

pub fn exit_from(status: Option<std::process::ExitStatus>, console_log: &Path) -> VmExit {
    use std::os::unix::process::ExitStatusExt;
    VmExit {
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        console_tail: console::tail(console_log, TAIL_LINES),
    }
}

/// Waits for QEMU's QMP socket and negotiates, failing fast (with QEMU's
/// stderr) if QEMU dies first.
pub async fn connect_qmp(
    id: &str,
    paths: &StatePaths,
    mut exit: watch::Receiver<Option<VmExit>>,
) -> Result<QmpClient, VmError> {
    let deadline = Instant::now() + QMP_SOCKET_TIMEOUT;
    loop {
        if let Some(exit) = exit.borrow().clone() {
            let stderr = fs::read_to_string(&paths.qemu_stderr)
                .unwrap_or_default()
                .trim()
                .to_owned();
            return Err(VmError::StartupExit {
                id: id.to_owned(),
                exit,
                stderr,
            });
        }
        if paths.qmp_socket.exists() {
            match QmpClient::connect(&paths.qmp_socket).await {
                Ok(client) => return Ok(client),
                // QEMU may have bound but not yet listened; retry until the deadline.
                Err(QmpError::Connect { .. }) => {}
                Err(source) => {
                    // The socket hung up during the handshake: QEMU likely died.
                    let _ = tokio::time::timeout(Duration::from_secs(1), exit.changed()).await;
                    if exit.borrow().is_some() {
                        continue;
                    }
                    return Err(VmError::Qmp {
                        id: id.to_owned(),
                        source,
                    });
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(VmError::QmpSocketTimeout {
                id: id.to_owned(),
                seconds: QMP_SOCKET_TIMEOUT.as_secs(),
            });
        }
        let _ = tokio::time::timeout(Duration::from_millis(10), exit.changed()).await;
    }
}

/// Waits until the watch holds an exit, up to `timeout`.
pub async fn wait_exit(
    exit: &mut watch::Receiver<Option<VmExit>>,
    timeout: Duration,
) -> Option<VmExit> {
    let waited = match tokio::time::timeout(timeout, exit.wait_for(Option::is_some)).await {
        Ok(Ok(published)) => published.clone(),
        // The sender is gone only after it published the exit.
        Ok(Err(_)) | Err(_) => None,
    };
    waited.or_else(|| exit.borrow().clone())
}
