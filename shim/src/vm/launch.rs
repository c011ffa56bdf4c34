//! Starting QEMU jailed: the shim opens everything QEMU talks through (its sockets, the
//! console log, /dev/kvm, the NICs' taps), takes a uid for it, lays out its jail and spawns
//! it with those fds at the numbers its command line names (`cmdline::fds`).

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Child;

use super::cmdline::{fds, qemu_args, StatePaths};
use super::jail::{self, JailFiles, UidLease};
use super::{spawner, Accel, AgentChannelKind, GuestMemory, NetNamespace, Nic, VmConfig, VmError};
use crate::sys::{self, ChildNetns, ChildSetup};

/// A spawned QEMU and the uid it runs as (held until QEMU is gone).
#[derive(Debug)]
pub struct Launched {
    pub child: Child,
    pub lease: UidLease,
}

/// What the sandbox setup writes to QEMU's stderr when a step fails before exec.
const SETUP_FAILED: &str = "spry: setting up QEMU's sandbox failed at:";

/// Spawns QEMU for `config` in its jail. `uid_dir` holds the jail uid locks.
pub async fn launch(
    config: &VmConfig,
    accel: Accel,
    tsc_khz: u64,
    paths: &StatePaths,
    uid_dir: &Path,
) -> Result<Launched, VmError> {
    let lease = UidLease::take(uid_dir, config.jail, &config.id)?;
    let stderr = File::create(&paths.qemu_stderr).map_err(|source| VmError::StateDir {
        path: paths.qemu_stderr.clone(),
        source,
    })?;
    let qmp = listen(&paths.qmp_socket)?;
    let agent = match config.agent_channel {
        AgentChannelKind::VirtioSerial => Some(listen(&paths.agent_socket)?),
        AgentChannelKind::Vsock { .. } => None,
    };
    let share = listen(&paths.share_socket)?;
    let console = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&paths.console_log)
        .map_err(|source| VmError::StateDir {
            path: paths.console_log.clone(),
            source,
        })?;
    let kvm = match accel {
        Accel::Kvm => {
            Some(open_rw("/dev/kvm").map_err(|source| VmError::KvmUnavailable { source })?)
        }
        Accel::Tcg => None,
    };
    let vhost_vsock =
        match config.agent_channel {
            AgentChannelKind::Vsock { .. } => Some(open_rw("/dev/vhost-vsock").map_err(
                |source| match source.kind() {
                    io::ErrorKind::NotFound => VmError::NoVhostVsock,
                    _ => VmError::HostFd {
                        what: "/dev/vhost-vsock".into(),
                        source,
                    },
                },
            )?),
            AgentChannelKind::VirtioSerial => None,
        };
    let network = open_network(&config.netns, &config.nics).await?;
    let cgroups =
        sys::open_cgroup_procs(&config.cgroup).map_err(|(path, source)| VmError::HostFd {
            what: path.display().to_string(),
            source,
        })?;

    let (jailed, files) = jail_view(config, &lease)?;
    fs::create_dir(&paths.jail_root).map_err(|source| VmError::StateDir {
        path: paths.jail_root.clone(),
        source,
    })?;
    let jail = jail::plan(&paths.jail_root, &files, lease.uid, lease.gid)?;

    let mut passed: Vec<(RawFd, RawFd)> = vec![
        (qmp.as_raw_fd(), fds::QMP),
        (share.as_raw_fd(), fds::SHARE),
        (console.as_raw_fd(), fds::CONSOLE),
    ];
    passed.extend(agent.as_ref().map(|a| (a.as_raw_fd(), fds::AGENT)));
    passed.extend(kvm.as_ref().map(|k| (k.as_raw_fd(), fds::KVM)));
    passed.extend(
        vhost_vsock
            .as_ref()
            .map(|v| (v.as_raw_fd(), fds::VHOST_VSOCK)),
    );
    passed.extend(
        network
            .taps
            .iter()
            .zip(fds::TAP0..)
            .map(|(tap, target)| (tap.as_raw_fd(), target)),
    );
    let netns = match (&network.netns, &config.netns) {
        (Some(file), _) => ChildNetns::Join(file.as_raw_fd()),
        (None, NetNamespace::New) => ChildNetns::New,
        (None, _) => ChildNetns::Inherit,
    };

    let mut command = tokio::process::Command::new(&jailed.qemu);
    command
        .args(qemu_args(&jailed, accel, tsc_khz))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true);
    let spawn_error = |source| VmError::Spawn {
        qemu: config.qemu.clone(),
        detail: setup_failure(&paths.qemu_stderr),
        source,
    };
    sys::configure_child(
        &mut command,
        ChildSetup {
            netns,
            fds: passed,
            jail: Some(jail),
            cgroups: cgroups.iter().map(AsRawFd::as_raw_fd).collect(),
        },
    )
    .map_err(spawn_error)?;
    let child = spawner::spawn(command).await.map_err(spawn_error)?;
    // Our copies of the sockets, console, devices and taps close here: QEMU holds its own.
    Ok(Launched { child, lease })
}

/// `config` as QEMU sees it in the jail (files at their canonical paths), and the files
/// the jail must hold. A template's memory file is made here, owned by QEMU's uid.
fn jail_view(config: &VmConfig, lease: &UidLease) -> Result<(VmConfig, JailFiles), VmError> {
    let canonical = |path: &Path| {
        fs::canonicalize(path).map_err(|source| VmError::JailFile {
            path: path.to_path_buf(),
            source,
        })
    };
    let mut files = JailFiles::default();
    let qemu = canonical(&config.qemu)?;
    files.read_only.push(qemu.clone());
    let (kernel, initramfs) = if config.restore.is_some() {
        // Not loaded: the restored RAM holds the running kernel.
        (config.kernel.clone(), config.initramfs.clone())
    } else {
        let kernel = canonical(&config.kernel)?;
        let initramfs = canonical(&config.initramfs)?;
        files.read_only.extend([kernel.clone(), initramfs.clone()]);
        (kernel, initramfs)
    };
    let memory = match &config.memory {
        GuestMemory::Anonymous => GuestMemory::Anonymous,
        GuestMemory::SharedFile { path } => {
            make_owned_file(path, lease)?;
            let path = canonical(path)?;
            files.writable.push(path.clone());
            GuestMemory::SharedFile { path }
        }
        GuestMemory::PrivateFile { path } => {
            let path = canonical(path)?;
            files.read_only.push(path.clone());
            GuestMemory::PrivateFile { path }
        }
    };
    let jailed = VmConfig {
        qemu,
        kernel,
        initramfs,
        memory,
        ..config.clone()
    };
    Ok((jailed, files))
}

/// An empty file only QEMU's uid may use: a template's RAM while it is built.
fn make_owned_file(path: &Path, lease: &UidLease) -> Result<(), VmError> {
    let io = |source| VmError::JailFile {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    std::os::unix::fs::fchown(&file, Some(lease.uid), Some(lease.gid)).map_err(io)
}

fn listen(path: &Path) -> Result<UnixListener, VmError> {
    let io = |source| VmError::StateDir {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(io)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

fn open_rw(path: &str) -> io::Result<File> {
    fs::OpenOptions::new().read(true).write(true).open(path)
}

/// The network namespace QEMU joins (when it is not its own new one) and its NICs' taps.
struct Network {
    netns: Option<File>,
    taps: Vec<OwnedFd>,
}

/// Opens the namespace and creates the taps in it. Taps are created from a thread of
/// their own, which alone enters the namespace and then ends.
async fn open_network(netns: &NetNamespace, nics: &[Nic]) -> Result<Network, VmError> {
    let joined = match netns {
        NetNamespace::Join(path) => Some(File::open(path).map_err(|source| VmError::NetNs {
            path: path.clone(),
            source,
        })?),
        NetNamespace::Inherit | NetNamespace::New => None,
    };
    if nics.is_empty() {
        return Ok(Network {
            netns: joined,
            taps: Vec::new(),
        });
    }
    let names: Vec<String> = nics.iter().map(|nic| nic.tap.clone()).collect();
    let enter = joined
        .as_ref()
        .map(|file| file.try_clone())
        .transpose()
        .map_err(|source| VmError::HostFd {
            what: "the network namespace".into(),
            source,
        })?;
    let made = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || make_taps(enter, &names))
            .join()
            .unwrap_or_else(|_| Err(host_fd("taps", io::Error::other("the tap thread panicked"))))
    })
    .await
    .unwrap_or_else(|_| Err(host_fd("taps", io::Error::other("the tap task panicked"))))?;
    Ok(Network {
        netns: joined.or(made.new_netns),
        taps: made.taps,
    })
}

fn host_fd(what: &str, source: io::Error) -> VmError {
    VmError::HostFd {
        what: what.to_owned(),
        source,
    }
}

struct MadeTaps {
    /// A namespace made for them (when QEMU was to get a new one).
    new_netns: Option<File>,
    taps: Vec<OwnedFd>,
}

/// Runs on a thread that exits afterwards: it enters `netns` (or a new namespace).
fn make_taps(netns: Option<File>, names: &[String]) -> Result<MadeTaps, VmError> {
    use nix::sched::CloneFlags;
    let new_netns = match &netns {
        Some(file) => {
            nix::sched::setns(file, CloneFlags::CLONE_NEWNET)
                .map_err(|errno| host_fd("the pod's network namespace", errno.into()))?;
            None
        }
        None => {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|errno| host_fd("a new network namespace", errno.into()))?;
            Some(
                File::open("/proc/thread-self/ns/net")
                    .map_err(|source| host_fd("the new network namespace", source))?,
            )
        }
    };
    let taps = names
        .iter()
        .map(|name| sys::open_tap(name).map_err(|source| host_fd(&format!("tap {name}"), source)))
        .collect::<Result<_, _>>()?;
    Ok(MadeTaps { new_netns, taps })
}

/// The failed step the sandbox setup wrote to QEMU's stderr, as ": at <step>", or "".
fn setup_failure(stderr: &PathBuf) -> String {
    fs::read_to_string(stderr)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                line.strip_prefix(SETUP_FAILED)
                    .map(str::trim)
                    .map(str::to_owned)
            })
        })
        .map(|step| format!(" (QEMU's sandbox setup failed at: {step})"))
        .unwrap_or_default()
}
