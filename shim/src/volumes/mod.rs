//! A container's host volumes (the OCI spec's bind mounts) and how each reaches the guest.
//!
//! kubelet and CRI hand every volume to the runtime as a bind mount of a host path. Each
//! is one of:
//! - CRI's pod files (/etc/hosts, /etc/hostname, /etc/resolv.conf): small, written once
//!   before the container starts: copied into the guest ([`GuestFile`]);
//! - `/dev/shm`: the pod's shared memory, a tmpfs the agent keeps per pod in the guest;
//! - kubelet's atomic-writer volumes (configMap, secret, projected, downwardAPI): copied
//!   into the guest and every update replayed there as the same atomic swap, so guest
//!   inotify fires (`synced.rs`);
//! - kubelet's emptyDir volumes and subPaths of them: kept in the guest, on a disk or a
//!   tmpfs per pod (`pod_local.rs`), since only the pod's containers use them;
//! - anything else (hostPath, subPath of other volumes, the termination log): served
//!   live from the host through the pod's file share (`share.rs`, FUSE in the guest over
//!   a virtio-serial port, `server.rs` on the host), so writes go both ways.
//!
//! Host block devices in `linux.devices` are hot-plugged disks (`block.rs`).
//!
//! All of it works the same in VMs restored from a template: nothing in it needs guest
//! RAM shared with another process (which is why the share is not virtio-fs).

pub mod attach;
mod block;
mod pod_local;
pub mod server;
pub mod server_filter;
mod share;
mod submounts;
mod synced;

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Mount, Spec};
use spry_proto::agent::{volume_mount, GuestFile, VolumeMount};

pub use block::{ContainerDevices, HostBlockDevice};
pub use pod_local::{Medium, PodLocalDisks, PodLocalVolume};
pub use share::{remove_staging, FileShare, FileShareConfig, READY_LINE};
pub use synced::{snapshot as synced_snapshot, VolumeWatches};

/// CRI's pod files, copied rather than shared: read at every name lookup, never written
/// by the container, and rewritten by nobody once the container runs.
const COPIED_FILES: [&str; 3] = ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf"];
/// Copied files larger than this are shared instead.
const MAX_COPIED_FILE: u64 = 1 << 20;

/// Failure to bring a volume into the guest.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(
        "the source {source_path} of the volume at {destination} does not exist on the host \
         (or cannot be read): create it, or fix the pod's volume"
    )]
    MissingSource {
        destination: PathBuf,
        source_path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the volume at {destination} asks for {mode} mount propagation (Bidirectional), which \
         cannot cross the VM boundary: mounts made in the guest never reach the host. Use \
         HostToContainer or None"
    )]
    UnsupportedPropagation { destination: PathBuf, mode: String },
    #[error("the volume at {destination} is a {what}, which Spry cannot share into the VM")]
    UnsupportedSource {
        destination: PathBuf,
        what: &'static str,
    },
    #[error("container id {id:?} cannot name a directory of the pod's file share")]
    BadContainerId { id: String },
    #[error("the pod's file share has no room for container {id}: it is not set up")]
    NoShare { id: String },
    #[error("cannot prepare {path} for the pod's file share")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind {source_path} into the pod's file share at {target}")]
    Bind {
        source_path: PathBuf,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot start the pod's file server {program}")]
    SpawnServer {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pod's file server did not start: {detail}")]
    ServerFailed { detail: String },
    #[error("cannot read the synced volume at {path}")]
    Snapshot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the synced volume at {path} holds more than {max} bytes", max = synced::MAX_SYNCED_BYTES)]
    TooBig { path: PathBuf },
    #[error("cannot read what the emptyDir at {path} is")]
    EmptyDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the emptyDir disk {path}")]
    DiskImage {
        path: PathBuf,
        #[source]
        source: crate::rootfs::WritableError,
    },
    #[error("cannot plug {path} into the pod's VM")]
    Plug {
        path: PathBuf,
        #[source]
        source: crate::vm::VmError,
    },
    #[error(
        "the container's device {container_path} is block device {major}:{minor}, which this \
         host does not have under /dev"
    )]
    NoHostDevice {
        container_path: PathBuf,
        major: u32,
        minor: u32,
    },
}

/// A host path the container mounts, served through the pod's file share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedVolume {
    pub destination: PathBuf,
    /// The host path, symlinks resolved.
    pub source: PathBuf,
    pub is_dir: bool,
    pub readonly: ReadOnly,
    /// The spec's options, passed on to the guest's bind mount.
    pub options: Vec<String>,
}

/// How much of a bind mount is read-only (CRI's readOnly and recursiveReadOnly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOnly {
    No,
    /// `ro`: the volume's own mount; mounts under its source keep their flags, as with
    /// runc's bind followed by a read-only remount.
    TopMount,
    /// `rro`: every mount under the source too.
    Recursive,
}

impl ReadOnly {
    fn of(options: &[String]) -> Self {
        if options.iter().any(|o| o == "rro") {
            ReadOnly::Recursive
        } else if options.iter().any(|o| o == "ro") {
            ReadOnly::TopMount
        } else {
            ReadOnly::No
        }
    }
}

/// What the guest needs for a container's volumes.
#[derive(Debug, Default)]
pub struct GuestVolumes {
    pub files: Vec<GuestFile>,
    pub shared: Vec<SharedVolume>,
    /// kubelet atomic-writer volumes, copied and kept in sync (`source` is their dir).
    pub synced: Vec<SharedVolume>,
    /// Mounts whose source is already in the guest (the pod's /dev/shm).
    pub guest: Vec<VolumeMount>,
    /// emptyDirs (and subPaths of them) kept in the guest.
    pub pod_local: Vec<PodLocalVolume>,
    /// Host block devices, hot-plugged for this container.
    pub block_devices: Vec<HostBlockDevice>,
}

/// Takes the bind mounts of host paths out of `spec` and says how each, and each host
/// block device, reaches the guest.
pub fn plan(spec: &mut Spec) -> Result<GuestVolumes, VolumeError> {
    let mut volumes = GuestVolumes {
        block_devices: block::plan(spec, Path::new("/sys/dev/block"), Path::new("/dev"))?,
        ..Default::default()
    };
    let Some(mounts) = spec.mounts_mut() else {
        return Ok(volumes);
    };
    let mut kept = Vec::with_capacity(mounts.len());
    for mount in mounts.drain(..) {
        if !is_bind(&mount) {
            kept.push(mount);
            continue;
        }
        let destination = mount.destination().clone();
        let options = mount.options().clone().unwrap_or_default();
        if let Some(mode) = options
            .iter()
            .find(|o| matches!(o.as_str(), "shared" | "rshared"))
        {
            return Err(VolumeError::UnsupportedPropagation {
                destination,
                mode: mode.clone(),
            });
        }
        if destination == Path::new("/dev/shm") {
            volumes.guest.push(VolumeMount {
                destination: destination.display().to_string(),
                source: Some(volume_mount::Source::PodShm(true)),
                options,
                ..Default::default()
            });
            continue;
        }
        let source_path = mount.source().clone().unwrap_or_default();
        let missing = |source| VolumeError::MissingSource {
            destination: destination.clone(),
            source_path: source_path.clone(),
            source,
        };
        let resolved = std::fs::canonicalize(&source_path).map_err(missing)?;
        let meta = std::fs::metadata(&resolved).map_err(missing)?;
        let readonly = ReadOnly::of(&options);
        if meta.is_file()
            && meta.len() <= MAX_COPIED_FILE
            && COPIED_FILES.iter().any(|f| destination == Path::new(f))
        {
            volumes.files.push(GuestFile {
                destination: destination.display().to_string(),
                content: std::fs::read(&resolved).map_err(missing)?,
                readonly: readonly != ReadOnly::No,
                ..Default::default()
            });
            continue;
        }
        if meta.is_dir() {
            if let Some((empty_dir, sub_path)) = pod_local::empty_dir_of(&resolved) {
                let medium =
                    pod_local::medium_of(&empty_dir).map_err(|source| VolumeError::EmptyDir {
                        path: empty_dir.clone(),
                        source,
                    })?;
                volumes.pod_local.push(PodLocalVolume {
                    destination,
                    id: pod_local::volume_id(&empty_dir),
                    medium,
                    sub_path,
                    options,
                });
                continue;
            }
        }
        if !meta.is_dir() && !meta.is_file() {
            return Err(VolumeError::UnsupportedSource {
                destination,
                what: "device, socket or pipe",
            });
        }
        let volume = SharedVolume {
            destination,
            is_dir: meta.is_dir(),
            readonly,
            options,
            source: resolved,
        };
        if volume.is_dir && synced::is_synced_source(&volume.source) {
            volumes.synced.push(volume);
        } else {
            volumes.shared.push(volume);
        }
    }
    *mounts = kept;
    Ok(volumes)
}

fn is_bind(mount: &Mount) -> bool {
    mount.typ().as_deref() == Some("bind")
        || mount
            .options()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|o| o == "bind" || o == "rbind")
}

#[cfg(test)]
mod tests;
