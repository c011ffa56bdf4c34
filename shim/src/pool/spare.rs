//! A spare shim's life until a pod takes it: hold its dir's lock, restore a VM from the
//! template, answer `start` on the control socket.

use std::io::Write;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, info, warn};

use super::cgroup::SpareCgroups;
use super::protocol::{read_line, write_line};
use super::{
    io_error, try_lock, AdoptReply, AdoptRequest, PoolError, CONFIG_FILE, CONTROL_SOCKET, NICS,
    PID_FILE, SHIM_PID_MARKER, VM_NAME_MARKER,
};
use crate::config::Config;
use crate::host::Host;
use crate::network::nic_for;
use crate::rootfs::RootfsShare;
use crate::sandbox::{BootedVm, SandboxIdentity};
use crate::vm::{NetNamespace, VmConfig};

/// A spare's nice value until a pod takes it: restoring and idling yield to running pods.
pub const SPARE_NICE: i32 = 10;
/// How often a spare checks that its dir is still there.
const DIR_CHECK: Duration = Duration::from_secs(1);
/// How long a spare waits for `start`'s request once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A pooled VM: restored from the template of `config`, its agent answering, its NIC's tap
/// in a namespace of its own, given to no pod yet.
pub struct Spare {
    pub booted: BootedVm,
    /// The VM's name, which names its state dirs.
    pub name: String,
    pub config: Config,
    /// The VM's rootfs share, with the next container's writable disk already plugged
    /// (and probed by the guest while the spare idled).
    pub share: Box<dyn RootfsShare>,
}

/// A spare a pod took: the pod as `start` described it, the pod's task socket (already
/// listening) and the VM.
pub struct Adopted {
    pub request: AdoptRequest,
    pub listener: StdUnixListener,
    pub spare: Spare,
}

/// Runs the spare of pool dir `dir` until a pod takes it. Any error ends the spare (its
/// VM stopped); the dir stays for the next `refill` to sweep.
pub async fn wait_for_pod(dir: &Path) -> Result<Adopted, PoolError> {
    let lock = try_lock(dir)?.ok_or_else(|| PoolError::Locked(dir.to_path_buf()))?;
    let pid_file = dir.join(PID_FILE);
    std::fs::write(&pid_file, std::process::id().to_string())
        .map_err(io_error("write", &pid_file))?;
    // The spawner waits for this line: from now on the dir counts as a live spare.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "locked").and_then(|()| stdout.flush());
    // Before the VM, so QEMU starts in the spares' cgroup too.
    let cgroups = SpareCgroups::host();
    let home = enter_pool_cgroup(&cgroups);
    let spare = restore(dir).await?;
    let adopted = serve_control(dir, spare).await?;
    drop(lock);
    record_adoption(&adopted);
    let qemu = adopted.spare.booted.vm().pid();
    for pid in [std::process::id(), qemu] {
        if let Err(e) = crate::sys::set_process_nice(pid, 0) {
            warn!(pid, error = %e, "cannot restore the pod's CPU priority");
        }
    }
    if let Some(home) = home {
        match cgroups.move_to(&[std::process::id(), qemu], &home) {
            Ok(()) => cgroups.remove_pool(Duration::ZERO).await,
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "cannot leave the spares' cgroup; the pod's VM keeps its low CPU weight until its own cgroup takes it")
            }
        }
    }
    Ok(adopted)
}

/// Moves this spare into the spares' cgroup; returns the cgroups it was in (to go back
/// to once adopted), or None when it stays where it is (logged).
fn enter_pool_cgroup(cgroups: &SpareCgroups) -> Option<Vec<PathBuf>> {
    let pid = std::process::id();
    let entered = cgroups
        .of_process(pid)
        .and_then(|home| cgroups.enter_pool(pid).map(|()| home));
    match entered {
        Ok(home) => Some(home),
        Err(e) => {
            warn!(error = %crate::error_chain(&e), "cannot enter the spares' cgroup; this spare idles where it was spawned (at nice {SPARE_NICE})");
            None
        }
    }
}

async fn restore(dir: &Path) -> Result<Spare, PoolError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_error("read", &path))?;
    let config = Config::parse(&text, &path).map_err(Box::new)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let host = Host::new(config.clone());
    let vm_config = VmConfig {
        netns: NetNamespace::New,
        nics: (0..NICS).map(nic_for).collect(),
        ..host.vm_config(&name)
    };
    let request = host.launch_request(vm_config, SandboxIdentity::default());
    let booted = crate::template::restore_unattached(&request)
        .await
        .map_err(|e| PoolError::Boot(Box::new(e)))?
        .ok_or(PoolError::NoTemplate)?;
    let started = std::time::Instant::now();
    let share = host.rootfs_share_factory(&name)();
    if let Err(e) = super::warm::warm_up(&booted, share.as_ref(), &config.vm.initramfs, dir).await {
        booted.stop().await;
        return Err(e);
    }
    // Best effort: without it, the pod's first container plugs its writable disk itself.
    if let Err(e) = share.prepare_next(booted.vm()).await {
        debug!(vm = %name, error = %crate::error_chain(&e), "cannot plug the spare's next writable disk");
    }
    info!(vm = %name, warm_up_ms = started.elapsed().as_millis() as u64, "spare VM restored and warmed; waiting for a pod");
    Ok(Spare {
        booted,
        name,
        config,
        share,
    })
}

/// Answers `start` until one hands over a pod; ends the spare (stopping its VM) when its
/// dir is removed, on SIGTERM, or when the VM dies.
async fn serve_control(dir: &Path, spare: Spare) -> Result<Adopted, PoolError> {
    let path = dir.join(CONTROL_SOCKET);
    let listener = UnixListener::bind(&path).map_err(io_error("listen on", &path))?;
    let mut exit = spare.booted.vm().exit_watch();
    let mut term =
        signal(SignalKind::terminate()).map_err(io_error("watch", Path::new("SIGTERM")))?;
    let mut tick = tokio::time::interval(DIR_CHECK);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                match take_pod(dir, stream).await {
                    Ok(Some((request, listener))) => {
                        return Ok(Adopted { request, listener, spare });
                    }
                    Ok(None) => {}
                    Err(e) => {
                        spare.booted.stop().await;
                        return Err(e);
                    }
                }
            }
            _ = exit.wait_for(|e| e.is_some()) => {
                warn!("the spare's VM died");
                spare.booted.stop().await;
                return Err(PoolError::Stopped);
            }
            _ = term.recv() => break,
            _ = tick.tick() => {
                if !dir.exists() {
                    break;
                }
            }
        }
    }
    info!("spare stopped before a pod took it");
    spare.booted.stop().await;
    Err(PoolError::Stopped)
}

/// One `start`'s request: the pod's task socket bound, or None (the spare stays one).
/// Once it said yes the spare has left the pool, so `start`'s refill already counts it
/// out; if `start` is gone by then, the spare ends.
async fn take_pod(
    dir: &Path,
    mut stream: UnixStream,
) -> Result<Option<(AdoptRequest, StdUnixListener)>, PoolError> {
    let request: AdoptRequest =
        match tokio::time::timeout(REQUEST_TIMEOUT, read_line(&mut stream)).await {
            Ok(Ok(request)) => request,
            _ => return Ok(None),
        };
    let socket = PathBuf::from(socket_path(&request.socket));
    let listener = match bind(&socket) {
        Ok(listener) => listener,
        Err(e) => {
            let reason = format!("cannot listen on {}: {e}", socket.display());
            let _ = write_line(&mut stream, &AdoptReply::Refused { reason }).await;
            return Ok(None);
        }
    };
    if let Err(e) = std::fs::remove_dir_all(dir) {
        warn!(dir = %dir.display(), error = %e, "cannot remove the spare's pool dir");
    }
    if let Err(e) = write_line(&mut stream, &AdoptReply::Serving).await {
        let _ = std::fs::remove_file(&socket);
        return Err(e);
    }
    Ok(Some((request, listener)))
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

fn bind(socket: &Path) -> std::io::Result<StdUnixListener> {
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let listener = StdUnixListener::bind(socket)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Notes in the pod's bundle what `delete` needs after a crash of this shim: its pid (its
/// command line is not a serving shim's) and its VM's name (not the one the pod's id gives).
fn record_adoption(adopted: &Adopted) {
    let bundle = &adopted.request.bundle;
    for (marker, value) in [
        (VM_NAME_MARKER, adopted.spare.name.clone()),
        (SHIM_PID_MARKER, std::process::id().to_string()),
    ] {
        let path = bundle.join(marker);
        if let Err(e) = std::fs::write(&path, value) {
            warn!(path = %path.display(), error = %e, "cannot note the pooled VM; a crash of this shim may leave state behind");
        }
    }
}
