//! Streams a guest process's stdio to and from this terminal.

use std::os::fd::AsFd;

use nix::sys::termios::{self, SetArg, Termios};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::agent_client::{AgentClient, AgentError, OutputStream, ProcessId};

const CHUNK: u32 = 32 * 1024;

/// Copies one output stream of `process` to `out` until the guest reports end of stream.
pub async fn copy_output<W: AsyncWrite + Unpin>(
    agent: AgentClient,
    process: ProcessId,
    stream: OutputStream,
    mut out: W,
) -> Result<(), AgentError> {
    while let Some(data) = agent.read_output(&process, stream, CHUNK).await? {
        // A closed local stdout (e.g. `| head`) must not fail the container.
        if out.write_all(&data).await.is_err() || out.flush().await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Copies this process's stdin to the guest process, then closes the guest's stdin.
pub async fn copy_stdin(agent: AgentClient, process: ProcessId) -> Result<(), AgentError> {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; CHUNK as usize];
    loop {
        let n = match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        agent.write_stdin_all(&process, &buf[..n]).await?;
    }
    agent.close_stdin(&process).await
}

/// Puts the local terminal in raw mode while alive, so keys reach the guest's tty as
/// typed; restores it on drop.
pub struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    /// `None` when stdin is not a terminal.
    pub fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// The local terminal's size (rows, cols), if stdout is a terminal.
pub fn terminal_size() -> Option<(u32, u32)> {
    crate::sys::terminal_size(std::io::stdout().as_fd())
}
