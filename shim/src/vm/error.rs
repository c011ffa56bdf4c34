//! The hypervisor layer's error type.

use std::io;
use std::path::PathBuf;

use super::qmp::QmpError;
use super::{ScsiAddr, VmExit};

/// Errors starting, driving or stopping a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{what} {path} does not exist")]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("VM id {id:?} must be 1-64 letters, digits, '-', '_' or '.'")]
    InvalidId { id: String },
    #[error("VM {id} needs at least one CPU")]
    NoCpus { id: String },
    #[error("VM {id} needs at least {minimum} MiB of memory, got {memory_mib}")]
    TooLittleMemory {
        id: String,
        memory_mib: u32,
        minimum: u32,
    },
    #[error("socket path {path} is longer than a unix socket allows ({max} bytes): use a shorter state dir")]
    SocketPathTooLong { path: PathBuf, max: usize },
    #[error("state dir {path} already exists (another VM, or a leftover of a crashed one)")]
    StateDirExists { path: PathBuf },
    #[error("failed to create or remove state dir {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "vsock needs /dev/vhost-vsock, which this host lacks (use the virtio-serial agent channel)"
    )]
    NoVhostVsock,
    #[error("KVM was requested but /dev/kvm cannot be opened")]
    KvmUnavailable {
        #[source]
        source: io::Error,
    },
    #[error("failed to open network namespace {path}")]
    NetNs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("VM {id} has NICs but no network namespace of its own to create their taps in")]
    NicsWithoutNetns { id: String },
    #[error("VM {id}: {tap:?} is not a valid tap name (1 to 15 letters, digits, '-' or '_')")]
    InvalidTapName { id: String, tap: String },
    #[error("cannot measure the host TSC frequency")]
    TscFrequency {
        #[source]
        source: io::Error,
    },
    #[error("failed to spawn {qemu}{detail}")]
    Spawn {
        qemu: PathBuf,
        /// What QEMU's sandbox setup reported before exec, if anything (": at ...").
        detail: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot take a uid for QEMU's jail: lock dir {dir}")]
    JailUid {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("all {count} jail uids from {first} are taken by running VMs: raise vm.jail_uids")]
    NoFreeJailUid { first: u32, count: u32 },
    #[error("cannot put {path} into QEMU's jail")]
    JailFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {what} for QEMU")]
    HostFd {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("QEMU for VM {id} exited during startup ({exit}); its stderr: {stderr}")]
    StartupExit {
        id: String,
        exit: VmExit,
        stderr: String,
    },
    #[error("QEMU for VM {id} did not open its QMP socket within {seconds} s")]
    QmpSocketTimeout { id: String, seconds: u64 },
    #[error("QMP of VM {id} failed")]
    Qmp {
        id: String,
        #[source]
        source: QmpError,
    },
    #[error("disk image {path} cannot be used")]
    DiskImage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("VM {id} has no free SCSI target left")]
    NoFreeScsiTarget { id: String },
    #[error("VM {id} has no hot-plugged disk at target {} lun {}", addr.target, addr.lun)]
    UnknownDisk { id: String, addr: ScsiAddr },
    #[error("disk image {path} has {size} bytes; the empty disk at target {} lun {} it was to back has {disk_size}", addr.target, addr.lun)]
    DiskSizeMismatch {
        path: PathBuf,
        size: u64,
        addr: ScsiAddr,
        disk_size: u64,
    },
    #[error("QEMU did not confirm removing disk at target {} lun {} of VM {id}", addr.target, addr.lun)]
    UnplugTimeout { id: String, addr: ScsiAddr },
    #[error("failed to signal QEMU (pid {pid})")]
    Signal {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("QEMU for VM {id} did not exit even after SIGKILL")]
    StopTimeout { id: String },
    #[error("VM {id} has already exited ({exit})")]
    Exited { id: String, exit: VmExit },
    #[error("VM {id} restores a snapshot, so its RAM must be the snapshot's memory file")]
    RestoreWithoutMemoryFile { id: String },
    #[error("cannot read the identity of {what} {path}")]
    FileIdentity {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QEMU could not restore VM {id} from {state}: {detail}")]
    Restore {
        id: String,
        state: PathBuf,
        detail: String,
    },
    #[error("QEMU could not save VM {id} to {state}: {detail}")]
    Snapshot {
        id: String,
        state: PathBuf,
        detail: String,
    },
    #[error("moving the state of VM {id} through {state} did not finish within {seconds} s")]
    MigrationTimeout {
        id: String,
        state: PathBuf,
        seconds: u64,
    },
}
