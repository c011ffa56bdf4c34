//! When the new container counts as ready: it answers on a TCP port of the pod, or its log
//! shows a line, or (with neither asked) it is still running a moment after it started.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use regex::Regex;
use spry_proto::cri::ContainerState;

use crate::cri::{CriClient, CriError};

/// With no probe: running this long after the start counts as ready.
const SETTLE: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(20);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub enum Readiness {
    Running,
    Tcp { ip: IpAddr, port: u16 },
    Log { pattern: Regex, file: PathBuf },
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Running => write!(f, "still running {} s after its start", SETTLE.as_secs()),
            Self::Tcp { ip, port } => write!(f, "answering on {}", SocketAddr::new(*ip, *port)),
            Self::Log { pattern, file } => {
                write!(f, "logging /{pattern}/ (in {})", file.display())
            }
        }
    }
}

/// Why a container never became ready.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("it exited with code {code} after {after:?}{reason}")]
    Exited {
        code: i32,
        after: Duration,
        /// ": <reason>" from the runtime, or empty.
        reason: String,
    },
    #[error("it was not {readiness} within {timeout:?}")]
    Timeout {
        readiness: String,
        timeout: Duration,
    },
    #[error("its status cannot be read")]
    Status(#[source] CriError),
}

/// Waits until container `id` is ready as `readiness` says; returns how long that took.
pub async fn wait_ready(
    cri: &CriClient,
    id: &str,
    readiness: &Readiness,
    timeout: Duration,
) -> Result<Duration, NotReady> {
    let started = Instant::now();
    loop {
        let status = cri.container_status(id).await.map_err(NotReady::Status)?;
        if status.state.enum_value() == Ok(ContainerState::CONTAINER_EXITED) {
            let reason = [status.reason.as_str(), status.message.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(": ");
            return Err(NotReady::Exited {
                code: status.exit_code,
                after: started.elapsed(),
                reason: if reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({reason})")
                },
            });
        }
        let running = status.state.enum_value() == Ok(ContainerState::CONTAINER_RUNNING);
        let ready = running
            && match readiness {
                Readiness::Running => started.elapsed() >= SETTLE,
                Readiness::Tcp { ip, port } => answers(SocketAddr::new(*ip, *port)).await,
                Readiness::Log { pattern, file } => logged(file, pattern),
            };
        if ready {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return Err(NotReady::Timeout {
                readiness: readiness.to_string(),
                timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn answers(address: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address)).await,
        Ok(Ok(_))
    )
}

/// Whether a message in the CRI log file (`<time> <stream> <tag> <message>` lines)
/// matches `pattern`.
fn logged(file: &PathBuf, pattern: &Regex) -> bool {
    let Ok(text) = std::fs::read_to_string(file) else {
        return false;
    };
    text.lines()
        .filter_map(|line| line.splitn(4, ' ').nth(3))
        .any(|message| pattern.is_match(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_match_on_their_message_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("0.log");
        std::fs::write(
            &file,
            "2026-11-30T08:00:00.1Z stdout F booting\n2026-11-30T08:00:01.2Z stdout F listening on 8080\n",
        )
        .unwrap();
        assert!(logged(&file, &Regex::new("listening on \\d+").unwrap()));
        assert!(!logged(&file, &Regex::new("stdout").unwrap()));
        assert!(!logged(
            &dir.path().join("missing.log"),
            &Regex::new(".").unwrap()
        ));
    }
}
