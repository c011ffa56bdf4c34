//! Pumps between containerd's stdio FIFOs and a guest process's streams.
//!
//! Output FIFOs are opened read-write so the open never blocks and never fails for want
//! of a reader; containerd sees end of file when the pump drops its descriptor at the
//! guest's end of stream. The stdin FIFO is opened read-only in blocking mode on a
//! blocking thread: that waits for containerd's writer, so an early read can't mistake
//! "no writer yet" for end of input. containerd's CloseIO goes through the stdin pump
//! ([`IoPumps::close_stdin`]): what containerd wrote before it is forwarded first (a
//! `kubectl attach` with `stdinOnce` writes its input and closes at once).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::debug;

use super::error::ShimError;
use crate::agent_client::{OutputStream, ProcessId};
use crate::sandbox::PodVm;

const CHUNK: u32 = 32 * 1024;

/// The FIFO paths containerd gave for one process; empty means "not wanted".
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Running pumps of one process.
pub struct IoPumps {
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<StdinPump>,
}

struct StdinPump {
    handle: JoinHandle<()>,
    path: PathBuf,
    /// Asks the pump to forward what the FIFO holds, then close the guest's stdin.
    close: Option<oneshot::Sender<()>>,
}

impl IoPumps {
    /// Opens the output FIFOs (errors surface now, at create/start) and starts pumping.
    pub fn start(
        vm: &Arc<dyn PodVm>,
        process: &ProcessId,
        paths: &StdioPaths,
    ) -> Result<Self, ShimError> {
        let mut outputs = Vec::new();
        let streams = [
            (OutputStream::Stdout, &paths.stdout),
            (OutputStream::Stderr, &paths.stderr),
        ];
        for (stream, path) in streams {
            // With a terminal, stderr is merged into the tty stream.
            if path.is_empty() || (paths.terminal && stream == OutputStream::Stderr) {
                continue;
            }
            let fifo = open_output(Path::new(path))?;
            outputs.push(tokio::spawn(pump_output(
                Arc::clone(vm),
                process.clone(),
                stream,
                fifo,
            )));
        }
        let stdin = (!paths.stdin.is_empty()).then(|| {
            let path = PathBuf::from(&paths.stdin);
            let (close, closed) = oneshot::channel();
            let pump = pump_stdin(Arc::clone(vm), process.clone(), path.clone(), closed);
            StdinPump {
                handle: tokio::spawn(pump),
                path,
                close: Some(close),
            }
        });
        Ok(Self { outputs, stdin })
    }

    /// Waits until the guest's output streams reached their end and were flushed into
    /// the FIFOs: an exit event must not overtake the last lines of output.
    /// Cancel-safe: a pump not finished when the caller gives up stays in `self`, and is
    /// aborted (its FIFO closed) when the pumps are dropped; a detached pump would keep
    /// the FIFO open while the guest keeps its output open, and containerd, which reads
    /// it to its end before it deletes the task, waiting forever.
    pub async fn drain_outputs(&mut self) {
        while let Some(handle) = self.outputs.last_mut() {
            let _ = handle.await;
            self.outputs.pop();
        }
    }

    /// containerd's CloseIO: the pump forwards what containerd already wrote, then closes
    /// the guest's stdin. False when there is no stdin pump (the caller closes it).
    pub fn close_stdin(&mut self) -> bool {
        let Some(pump) = self.stdin.as_mut() else {
            return false;
        };
        if let Some(close) = pump.close.take() {
            let _ = close.send(());
            // A pump still blocked in open() waits for a writer: be that writer once.
            wake_opener(&pump.path);
        }
        true
    }

    /// Stops the stdin pump (the process is gone).
    pub fn stop_stdin(&mut self) {
        if let Some(pump) = self.stdin.take() {
            pump.handle.abort();
            wake_opener(&pump.path);
        }
    }
}

impl Drop for IoPumps {
    fn drop(&mut self) {
        for handle in &self.outputs {
            handle.abort();
        }
        self.stop_stdin();
    }
}

/// Opens `path` for writing once, so a reader blocked in open() returns.
fn wake_opener(path: &Path) {
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
}

fn open_output(path: &Path) -> Result<pipe::Sender, ShimError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| ShimError::Fifo {
            path: path.to_path_buf(),
            source,
        })?;
    pipe::Sender::from_file(file).map_err(|source| ShimError::Fifo {
        path: path.to_path_buf(),
        source,
    })
}

async fn pump_output(
    vm: Arc<dyn PodVm>,
    process: ProcessId,
    stream: OutputStream,
    mut fifo: pipe::Sender,
) {
    loop {
        match vm.read_output(&process, stream, CHUNK).await {
            Ok(Some(data)) => {
                if let Err(e) = fifo.write_all(&data).await {
                    // Nobody reads any more (containerd went away); keep draining the
                    // guest so the process never blocks on a full pipe.
                    debug!(?stream, error = %e, "stdio FIFO write failed");
                }
            }
            Ok(None) => break,
            Err(e) => {
                debug!(?stream, error = %e, "output stream ended with an error");
                break;
            }
        }
    }
}

async fn pump_stdin(
    vm: Arc<dyn PodVm>,
    process: ProcessId,
    path: PathBuf,
    mut closed: oneshot::Receiver<()>,
) {
    let opened = tokio::task::spawn_blocking({
        let path = path.clone();
        move || std::fs::File::open(path)
    })
    .await;
    let Ok(Ok(file)) = opened else {
        debug!(path = %path.display(), "cannot open stdin FIFO");
        return;
    };
    let Ok(mut fifo) = set_nonblocking(file).and_then(pipe::Receiver::from_file) else {
        return;
    };
    let mut buf = vec![0u8; CHUNK as usize];
    loop {
        // Reads are cancel-safe: a read that loses the race took nothing.
        let n = tokio::select! {
            biased;
            read = fifo.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = &mut closed => {
                // CloseIO: forward what is already in the FIFO, then end. Plain read(2)s
                // (the FIFO is non-blocking): tokio's try_read would trust its cached
                // readiness, which may not have seen containerd's last write yet.
                use std::os::fd::AsRawFd;
                while let Ok(n) = nix::unistd::read(fifo.as_raw_fd(), &mut buf) {
                    if n == 0 || vm.write_stdin_all(&process, &buf[..n]).await.is_err() {
                        break;
                    }
                }
                break;
            }
        };
        if vm.write_stdin_all(&process, &buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = vm.close_stdin(&process).await;
}

fn set_nonblocking(file: std::fs::File) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let flags = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(file)
}
