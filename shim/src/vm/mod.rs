//! The hypervisor layer: a `Hypervisor` trait and its QEMU implementation.
//!
//! A VM is QEMU's `microvm` machine booting the PVH kernel straight from its
//! ELF, with the agent's initramfs. Devices are all virtio-mmio: an RNG, a
//! virtio-scsi controller whose disks are always hot-plugged over QMP (a new
//! container's rootfs appears without a reboot), and the agent channel
//! (virtio-serial port `spry.agent`, or vhost-vsock on KVM hosts).
//!
//! Using it: `QemuHypervisor::new(state_root).start(VmConfig { .. })` returns
//! once QEMU is up and QMP is negotiated (the guest is still booting). Connect
//! to [`Vm::agent_endpoint`] and retry/wait for the agent; watch
//! [`Vm::exit_watch`] to notice a dead VM (it fires within milliseconds of
//! QEMU exiting, with the console tail). Shut down with the agent's Shutdown
//! followed by [`Vm::stop`], which falls back to QMP `quit` and then SIGKILL.
//! Dropping the handle always kills QEMU and removes the state dir; QEMU also
//! dies with the shim (PR_SET_PDEATHSIG), so a crashed shim leaves
//! no VM behind (only its state dir); QEMU is forked by a dedicated thread
//! that lives as long as the process, so that signal never fires early.

mod accel;
pub mod cmdline;
mod console;
mod error;
mod jail;
mod launch;
pub mod qemu;
pub mod qmp;
mod scsi_slots;
mod snapshot;
mod spawner;
mod startup;
#[cfg(test)]
pub mod test_vm;
mod tsc;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use accel::KVM_UNUSABLE_WARNING;
pub use error::VmError;
pub use jail::{JailIds, DEFAULT_UID_BASE, DEFAULT_UID_COUNT};
pub use qemu::QemuHypervisor;
pub use spawner::spawn as spawn_long_lived;
pub use tsc::host_tsc_khz;

/// The virtio-serial port name the agent listens on (`/sys/class/virtio-ports/*/name`).
pub const AGENT_PORT_NAME: &str = "spry.agent";
/// The virtio-serial port of the pod's file share (agent/src/volumes/share.rs).
pub const SHARE_PORT_NAME: &str = "spry.fs";
/// The vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The kernel command-line parameter telling the agent which channel to
/// serve: `virtio-serial` (port [`AGENT_PORT_NAME`]) or `vsock` (port
/// [`AGENT_VSOCK_PORT`]).
pub const AGENT_CHANNEL_PARAM: &str = "spry.agent_channel";
/// The kernel command-line parameter holding the agent's `tracing` filter (its
/// container helper's too); the agent logs at "info" without it.
pub const GUEST_LOG_PARAM: &str = "spry.log";

/// Which accelerator to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// Use KVM when a probe guest boots fine with it, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    /// Software emulation: works everywhere, roughly 10x slower.
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// How the host reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentChannelKind {
    /// A virtio-serial port backed by a unix socket in the state dir.
    VirtioSerial,
    /// vhost-vsock with this guest CID (needs /dev/vhost-vsock).
    Vsock { cid: u32 },
}

/// Where to connect to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// A unix socket: one connection at a time, bytes go to the guest port.
    VirtioSerial {
        socket: PathBuf,
    },
    Vsock {
        cid: u32,
        port: u32,
    },
}

/// The VM size when nothing says otherwise (`VmConfig::default`, the config file's `[vm]`).
pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u32 = 256;

/// Everything needed to start a VM. `Default` gives a [`DEFAULT_CPUS`]-CPU,
/// [`DEFAULT_MEMORY_MIB`] MiB VM with the Debian QEMU path; id, state dir, kernel and
/// initramfs must be set.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Names the VM in logs; letters, digits, `-`, `_` and `.` only.
    pub id: String,
    /// Per-VM directory (sockets, console log). Created by `start`, which
    /// refuses an existing one; removed on every path (stop, drop, errors).
    pub state_dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cpus: u32,
    pub memory_mib: u32,
    pub accel: AccelChoice,
    /// The `qemu-system-x86_64` binary.
    pub qemu: PathBuf,
    pub agent_channel: AgentChannelKind,
    /// Appended to the kernel command line (later parameters win).
    pub extra_cmdline: Vec<String>,
    /// The network namespace QEMU runs in; NICs' taps are created there.
    pub netns: NetNamespace,
    /// virtio-net NICs, each backed by a tap QEMU creates (and removes when it exits).
    pub nics: Vec<Nic>,
    /// Under TCG, the most host memory QEMU may fill with translated guest code, MiB
    /// (QEMU's `tb-size`; 0 keeps QEMU's default of up to 1 GiB). Translated code is the
    /// largest private cost of an idle TCG VM; a full cache is flushed and refilled.
    pub tcg_cache_mib: u32,
    /// What backs guest RAM.
    pub memory: GuestMemory,
    /// Resume from this migration stream (saved by [`Vm::save_snapshot`]) instead of
    /// booting: RAM must come from the snapshot's memory file ([`GuestMemory::PrivateFile`]).
    /// Kernel and initramfs are then not loaded: the guest's memory already holds them.
    pub restore: Option<PathBuf>,
    /// The uids QEMU may run as (one per running VM).
    pub jail: JailIds,
    /// Cgroup dirs (existing) QEMU is spawned into, so that every page it ever allocates
    /// (a boot's or a restore's too) is charged to the pod; empty: the shim's cgroups.
    pub cgroup: Vec<PathBuf>,
}

/// Which network namespace QEMU runs in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NetNamespace {
    /// The caller's own (only for a VM without NICs).
    #[default]
    Inherit,
    /// A pod's network namespace (a bind-mounted netns file).
    Join(PathBuf),
    /// A new, empty one that lives as long as QEMU: a template VM's NICs go nowhere.
    New,
}

/// A guest NIC: a virtio-net device whose backend is the tap `tap` in QEMU's network
/// namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The tap's name (at most 15 bytes, as the kernel wants).
    pub tap: String,
    /// The MAC the guest sees at boot.
    pub mac: [u8; 6],
}

/// What backs a VM's guest RAM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GuestMemory {
    /// Ordinary private anonymous memory.
    #[default]
    Anonymous,
    /// A file QEMU creates and maps shared: everything the guest writes lands in it. A VM
    /// that becomes a template runs like this, so its RAM outlives QEMU.
    SharedFile { path: PathBuf },
    /// An existing file mapped privately and opened read-only: reads share the file's page
    /// cache with every other VM mapping it, writes copy the page. Clones of a template.
    PrivateFile { path: PathBuf },
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            state_dir: PathBuf::new(),
            kernel: PathBuf::new(),
            initramfs: PathBuf::new(),
            cpus: DEFAULT_CPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            accel: AccelChoice::Auto,
            qemu: PathBuf::from(DEFAULT_QEMU),
            agent_channel: AgentChannelKind::VirtioSerial,
            extra_cmdline: Vec::new(),
            netns: NetNamespace::Inherit,
            nics: Vec::new(),
            tcg_cache_mib: 0,
            memory: GuestMemory::Anonymous,
            restore: None,
            jail: JailIds::default(),
            cgroup: Vec::new(),
        }
    }
}

/// Where Debian installs QEMU.
pub const DEFAULT_QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// When QEMU closes an unplugged disk's image (and frees its SCSI target): QEMU frees an
/// unplugged device only some tens of ms after the guest lost it (`scsi_slots.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRelease {
    /// Before `unplug_disk` returns: for a host block device its owner may take back.
    Awaited,
    /// Soon after it returns: for an image file the host may unlink (an open file stays
    /// readable) or whose mount it detaches lazily, on a container stop's path.
    Background,
}

/// A SCSI address on the VM's controller (bus 0): the guest finds the disk
/// at `/sys/bus/scsi/devices/<host>:0:<target>:<lun>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ScsiAddr {
    pub target: u32,
    pub lun: u32,
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// QEMU's exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed QEMU, when it was killed.
    pub signal: Option<i32>,
    /// The last lines of the guest console (newline-separated, oldest first).
    pub console_tail: String,
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "QEMU exited with status {code}")?,
            (None, Some(signal)) => write!(f, "QEMU was killed by signal {signal}")?,
            (None, None) => write!(f, "QEMU ended")?,
        }
        match self.console_tail.lines().last() {
            Some(line) => write!(f, "; last console line: {line}"),
            None => Ok(()),
        }
    }
}

/// Starts VMs.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    async fn start(&self, config: VmConfig) -> Result<Box<dyn Vm>, VmError>;
    /// A digest of everything a snapshot of a VM started with `config` depends on: the
    /// hypervisor binary, kernel and initramfs (by file identity), the accelerator it would
    /// get, and the machine it would build. Snapshots restore only into a VM whose config
    /// has the same fingerprint; per-VM details (id, state dir, network namespace, what backs
    /// RAM) do not count.
    async fn snapshot_fingerprint(&self, config: &VmConfig) -> Result<String, VmError>;
}

/// A running VM. Dropping the handle kills the VM and removes its state dir.
#[async_trait]
pub trait Vm: Send + Sync {
    fn id(&self) -> &str;
    /// QEMU's PID.
    fn pid(&self) -> u32;
    fn accel(&self) -> Accel;
    /// The guest serial console log (inside the state dir).
    fn console_log(&self) -> &Path;
    fn agent_endpoint(&self) -> AgentEndpoint;
    /// The unix socket QEMU serves the file share's virtio-serial port on.
    fn share_socket(&self) -> &Path;
    /// Hot-plugs a disk image (or a host block device) on the virtio-scsi controller.
    async fn hotplug_disk(&self, image: &Path, read_only: bool) -> Result<ScsiAddr, VmError>;
    /// Hot-plugs a writable disk of `bytes` that holds nothing yet (it reads zeros and drops
    /// writes), for [`Vm::fill_disk`] to back with an image later. The guest probes a disk
    /// when it is plugged (~20 ms under TCG): plugging one ahead takes that off the start
    /// of the container that gets it. Unplug it as any other.
    async fn plug_empty_disk(&self, bytes: u64) -> Result<ScsiAddr, VmError>;
    /// Backs the empty disk at `addr` ([`Vm::plug_empty_disk`]) with `image`, a regular
    /// file of the disk's size, read-write. The guest sees the image from then on; what it
    /// read of the disk before (zeros) it only keeps if it held the disk open meanwhile.
    async fn fill_disk(&self, addr: ScsiAddr, image: &Path) -> Result<(), VmError>;
    /// Removes a hot-plugged disk (the guest must have stopped using it). Returns once the
    /// guest can no longer reach it; `release` says whether QEMU has closed the image by then.
    async fn unplug_disk(&self, addr: ScsiAddr, release: HostRelease) -> Result<(), VmError>;
    /// Becomes `Some` within a second of QEMU exiting, for any reason.
    fn exit_watch(&self) -> tokio::sync::watch::Receiver<Option<VmExit>>;
    /// False once QEMU has exited.
    fn is_running(&self) -> bool {
        self.exit_watch().borrow().is_none()
    }
    /// Pauses the guest and saves its device state to `state` (a QEMU migration stream).
    /// RAM in a [`GuestMemory::SharedFile`] is not copied (it already lives in that file), so
    /// the file plus `state` restore the VM. The guest stays paused: stop the VM afterwards.
    async fn save_snapshot(&self, state: &Path) -> Result<(), VmError>;
    /// Waits up to `timeout` for the VM to exit on its own (after the agent's
    /// Shutdown), then asks QEMU to quit, then kills it. Removes the state dir.
    async fn stop(&self, timeout: Duration) -> Result<VmExit, VmError>;
}
