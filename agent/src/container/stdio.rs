//! A process's stdio as the host sees it: bounded output buffers fed by drain tasks, a stdin
//! writer, and the pty master for terminals.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::unistd::pipe2;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::sys;

/// Bytes of output kept per stream before the drain task stops reading the pipe.
pub const OUTPUT_BUFFER_BYTES: usize = 256 * 1024;

/// Errors of setting up or using stdio.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("failed to create a stdio pipe")]
    Pipe { source: Errno },
    #[error("failed to open /dev/null")]
    DevNull { source: io::Error },
    #[error("failed to register a stdio descriptor with the event loop")]
    Register { source: io::Error },
    #[error("failed to receive the pty master from the container")]
    ReceivePty { source: io::Error },
    #[error("the container did not send a pty master")]
    NoPty,
    #[error("stdin was not requested or is already closed")]
    StdinClosed,
    #[error("failed to write to stdin")]
    WriteStdin { source: io::Error },
    #[error("the process has no terminal")]
    NoTerminal,
    #[error("failed to resize the terminal")]
    Resize { source: io::Error },
}

/// A nonblocking descriptor driven by the tokio reactor.
pub struct AsyncFdIo(AsyncFd<OwnedFd>);

impl AsyncFdIo {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        Ok(Self(sys::register_async_fd(fd)?))
    }

    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| Ok(nix::unistd::read(fd.get_ref().as_raw_fd(), buf)?)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn write(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| Ok(nix::unistd::write(fd, buf)?)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

#[derive(Default)]
struct BufferState {
    data: VecDeque<u8>,
    eof: bool,
}

/// Output of one stream, bounded: readers block until data or end of stream.
pub struct OutputBuffer {
    state: Mutex<BufferState>,
    changed: Notify,
    capacity: usize,
}

impl OutputBuffer {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::default(),
            changed: Notify::new(),
            capacity,
        }
    }

    /// A stream that is over before it started (no stderr on a terminal).
    pub fn finished() -> Self {
        let buffer = Self::new(0);
        buffer.finish();
        buffer
    }

    fn lock(&self) -> MutexGuard<'_, BufferState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns up to `max` bytes, waiting for some; empty with `true` at end of stream.
    pub async fn read(&self, max: usize) -> (Vec<u8>, bool) {
        let max = max.max(1);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if !state.data.is_empty() {
                    let n = max.min(state.data.len());
                    let data: Vec<u8> = state.data.drain(..n).collect();
                    drop(state);
                    self.changed.notify_waiters();
                    return (data, false);
                }
                if state.eof {
                    return (Vec::new(), true);
                }
            }
            notified.await;
        }
    }

    /// Waits until there is room and returns how many bytes fit.
    async fn wait_for_space(&self) -> usize {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let free = self.capacity.saturating_sub(self.lock().data.len());
            if free > 0 {
                return free;
            }
            notified.await;
        }
    }

    fn push(&self, bytes: &[u8]) {
        self.lock().data.extend(bytes);
        self.changed.notify_waiters();
    }

    fn finish(&self) {
        self.lock().eof = true;
        self.changed.notify_waiters();
    }

    /// True once the writer is gone and every byte was read.
    pub fn drained(&self) -> bool {
        let state = self.lock();
        state.eof && state.data.is_empty()
    }
}

/// Copies `source` into `buffer` until end of stream, reading only while there is room.
async fn drain(source: AsyncFdIo, buffer: Arc<OutputBuffer>) {
    let mut chunk = vec![0u8; 32 * 1024];
    loop {
        let free = buffer.wait_for_space().await;
        let want = free.min(chunk.len());
        match source.read(&mut chunk[..want]).await {
            Ok(0) => break,
            Ok(n) => buffer.push(&chunk[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            // A pty master reads EIO once every slave descriptor is closed: end of stream.
            Err(err) if err.raw_os_error() == Some(libc::EIO) => break,
            Err(err) => {
                tracing::warn!(error = %err, "reading process output failed");
                break;
            }
        }
    }
    buffer.finish();
}

/// The host-facing side of a process's stdio.
pub struct ProcessIo {
    pub stdout: Arc<OutputBuffer>,
    pub stderr: Arc<OutputBuffer>,
    stdin: tokio::sync::Mutex<Option<AsyncFdIo>>,
    terminal: Option<OwnedFd>,
}

/// Stdio prepared before the process exists.
pub enum PendingIo {
    Pipes {
        stdin_writer: Option<OwnedFd>,
        stdout_reader: OwnedFd,
        stderr_reader: OwnedFd,
    },
    Terminal,
}

/// Creates pipes for a non-terminal process: returns the host side and the three descriptors
/// for the process (stdin, stdout, stderr). Without `stdin` the process reads /dev/null.
pub fn pipes(stdin: bool) -> Result<(PendingIo, Vec<OwnedFd>), StdioError> {
    let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(|source| StdioError::Pipe { source });
    let (stdin_child, stdin_writer) = if stdin {
        let (r, w) = pipe()?;
        (r, Some(w))
    } else {
        let null =
            std::fs::File::open("/dev/null").map_err(|source| StdioError::DevNull { source })?;
        (OwnedFd::from(null), None)
    };
    let (stdout_reader, stdout_child) = pipe()?;
    let (stderr_reader, stderr_child) = pipe()?;
    Ok((
        PendingIo::Pipes {
            stdin_writer,
            stdout_reader,
            stderr_reader,
        },
        vec![stdin_child, stdout_child, stderr_child],
    ))
}

impl ProcessIo {
    /// Starts draining pipes; call once the process exists.
    pub fn from_pipes(pending: PendingIo) -> Result<Self, StdioError> {
        let PendingIo::Pipes {
            stdin_writer,
            stdout_reader,
            stderr_reader,
        } = pending
        else {
            unreachable!("terminal stdio is built with from_terminal");
        };
        let register = |fd| AsyncFdIo::new(fd).map_err(|source| StdioError::Register { source });
        let stdin = stdin_writer.map(register).transpose()?;
        let stdout = Arc::new(OutputBuffer::new(OUTPUT_BUFFER_BYTES));
        let stderr = Arc::new(OutputBuffer::new(OUTPUT_BUFFER_BYTES));
        tokio::spawn(drain(register(stdout_reader)?, stdout.clone()));
        tokio::spawn(drain(register(stderr_reader)?, stderr.clone()));
        Ok(Self {
            stdout,
            stderr,
            stdin: tokio::sync::Mutex::new(stdin),
            terminal: None,
        })
    }

    /// Wraps a pty master: output through stdout, stderr is empty.
    pub fn from_terminal(
        master: OwnedFd,
        rows: u16,
        cols: u16,
        stdin: bool,
    ) -> Result<Self, StdioError> {
        if rows > 0 && cols > 0 {
            sys::set_window_size(master.as_fd(), rows, cols)
                .map_err(|source| StdioError::Resize { source })?;
        }
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|source| StdioError::Register { source })
        };
        let register = |fd| AsyncFdIo::new(fd).map_err(|source| StdioError::Register { source });
        let stdout = Arc::new(OutputBuffer::new(OUTPUT_BUFFER_BYTES));
        tokio::spawn(drain(register(dup(&master)?)?, stdout.clone()));
        let stdin = if stdin {
            Some(register(dup(&master)?)?)
        } else {
            None
        };
        Ok(Self {
            stdout,
            stderr: Arc::new(OutputBuffer::finished()),
            stdin: tokio::sync::Mutex::new(stdin),
            terminal: Some(master),
        })
    }

    /// Writes some of `data` (at least one byte unless `data` is empty); returns how much.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<usize, StdioError> {
        let stdin = self.stdin.lock().await;
        let Some(writer) = stdin.as_ref() else {
            return Err(StdioError::StdinClosed);
        };
        if data.is_empty() {
            return Ok(0);
        }
        writer
            .write(data)
            .await
            .map_err(|source| StdioError::WriteStdin { source })
    }

    /// Closes the write end of stdin: the process reads end of file. On a terminal, sends the
    /// EOF character (^D) instead, since closing the master would hang up the session.
    pub async fn close_stdin(&self) -> Result<(), StdioError> {
        let mut stdin = self.stdin.lock().await;
        if self.terminal.is_some() {
            if let Some(writer) = stdin.as_ref() {
                let _ = writer.write(&[0x04]).await;
            }
        }
        stdin.take();
        Ok(())
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), StdioError> {
        let master = self.terminal.as_ref().ok_or(StdioError::NoTerminal)?;
        sys::set_window_size(master.as_fd(), rows, cols)
            .map_err(|source| StdioError::Resize { source })
    }

    pub fn is_terminal(&self) -> bool {
        self.terminal.is_some()
    }
}

/// Accepts libcontainer's connection on the console socket and receives the pty master.
pub async fn receive_pty_master(listener: tokio::net::UnixListener) -> Result<OwnedFd, StdioError> {
    let (stream, _) = listener
        .accept()
        .await
        .map_err(|source| StdioError::ReceivePty { source })?;
    let stream = stream
        .into_std()
        .map_err(|source| StdioError::ReceivePty { source })?;
    stream
        .set_nonblocking(false)
        .map_err(|source| StdioError::ReceivePty { source })?;
    tokio::task::spawn_blocking(move || {
        let mut name = [0u8; 4096];
        let mut iov = [io::IoSliceMut::new(&mut name)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|errno| StdioError::ReceivePty {
            source: errno.into(),
        })?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(|errno| StdioError::ReceivePty {
            source: errno.into(),
        })? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                fds.extend(sys::adopt_received_fds(&raw));
            }
        }
        fds.into_iter().next().ok_or(StdioError::NoPty)
    })
    .await
    .map_err(|_| StdioError::NoPty)?
}

/// Binds the console socket libcontainer connects to.
pub fn bind_console_socket(path: &Path) -> Result<tokio::net::UnixListener, StdioError> {
    let _ = std::fs::remove_file(path);
    tokio::net::UnixListener::bind(path).map_err(|source| StdioError::ReceivePty { source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_return_buffered_bytes_then_eof() {
        let buffer = OutputBuffer::new(8);
        buffer.push(b"hello");
        assert_eq!(buffer.read(3).await, (b"hel".to_vec(), false));
        buffer.finish();
        assert_eq!(buffer.read(100).await, (b"lo".to_vec(), false));
        assert_eq!(buffer.read(100).await, (Vec::new(), true));
        assert!(buffer.drained());
    }

    #[tokio::test]
    async fn drain_stops_reading_when_the_buffer_is_full() {
        let (reader, writer) = pipe2(OFlag::O_CLOEXEC).unwrap();
        let buffer = Arc::new(OutputBuffer::new(4));
        let task = tokio::spawn(drain(AsyncFdIo::new(reader).unwrap(), buffer.clone()));
        nix::unistd::write(&writer, b"abcdefgh").unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // Only the buffer's capacity was taken from the pipe; the rest waits in the pipe.
        assert_eq!(buffer.lock().data.len(), 4);
        drop(writer);
        let mut all = Vec::new();
        loop {
            let (data, eof) = buffer.read(3).await;
            if eof {
                break;
            }
            all.extend(data);
        }
        assert_eq!(all, b"abcdefgh");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_reader_blocks_until_data_arrives() {
        let buffer = Arc::new(OutputBuffer::new(16));
        let reader = tokio::spawn({
            let buffer = buffer.clone();
            async move { buffer.read(16).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!reader.is_finished());
        buffer.push(b"x");
        assert_eq!(reader.await.unwrap(), (b"x".to_vec(), false));
    }
}
