//! Host block devices a container asks for (CRI `devices`, kubelet's `volumeDevices`):
//! each becomes a disk hot-plugged into the VM, and the agent gives the spec's device
//! node the guest disk's numbers.
//!
//! The OCI spec names a device by its numbers only (CRI resolved the host path), so the
//! host node is found through sysfs. Character devices stay in the spec as they are:
//! the common ones (/dev/fuse, /dev/net/tun) have the same numbers in the guest.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType, Spec};
use spry_proto::agent::{BlockDevice, ScsiDisk};
use tokio::sync::Mutex;

use super::VolumeError;
use crate::vm::{HostRelease, ScsiAddr, Vm};

/// A host block device the container gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBlockDevice {
    /// Its path in the container.
    pub container_path: PathBuf,
    /// Its node on the host.
    pub host_node: PathBuf,
    pub major: u32,
    pub minor: u32,
    /// No device cgroup rule lets the container write it.
    pub read_only: bool,
}

/// The block devices in `spec`'s `linux.devices`, found on the host under `sys_dev_block`
/// (`/sys/dev/block`) and `dev` (`/dev`).
pub fn plan(
    spec: &Spec,
    sys_dev_block: &Path,
    dev: &Path,
) -> Result<Vec<HostBlockDevice>, VolumeError> {
    let Some(linux) = spec.linux() else {
        return Ok(Vec::new());
    };
    let rules = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().clone())
        .unwrap_or_default();
    let mut devices = Vec::new();
    for device in linux.devices().as_deref().unwrap_or_default() {
        if device.typ() != LinuxDeviceType::B {
            continue;
        }
        let (major, minor) = (device.major() as u32, device.minor() as u32);
        let host_node = host_node(sys_dev_block, dev, major, minor).ok_or_else(|| {
            VolumeError::NoHostDevice {
                container_path: device.path().clone(),
                major,
                minor,
            }
        })?;
        devices.push(HostBlockDevice {
            container_path: device.path().clone(),
            host_node,
            major,
            minor,
            read_only: !writable(&rules, major, minor),
        });
    }
    Ok(devices)
}

/// The host's node for block device `major:minor`: the kernel's name for it (sysfs
/// `uevent`'s DEVNAME) under `dev`, when that node really is the device.
fn host_node(sys_dev_block: &Path, dev: &Path, major: u32, minor: u32) -> Option<PathBuf> {
    let uevent =
        std::fs::read_to_string(sys_dev_block.join(format!("{major}:{minor}/uevent"))).ok()?;
    let name = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
    if name
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return None;
    }
    let node = dev.join(name);
    let meta = std::fs::metadata(&node).ok()?;
    let rdev = meta.rdev();
    let same = meta.file_type().is_block_device()
        && nix::sys::stat::major(rdev) == major as u64
        && nix::sys::stat::minor(rdev) == minor as u64;
    same.then_some(node)
}

/// The block devices plugged for each container of the pod; unplugged with it.
#[derive(Debug, Default)]
pub struct ContainerDevices {
    plugged: Mutex<HashMap<String, Vec<ScsiAddr>>>,
}

impl ContainerDevices {
    /// Plugs `devices` for container `container_id`; on a failure, unplugs what it plugged.
    pub async fn attach(
        &self,
        vm: &dyn Vm,
        container_id: &str,
        devices: &[HostBlockDevice],
    ) -> Result<Vec<BlockDevice>, VolumeError> {
        let mut plugged = Vec::new();
        let mut agent_devices = Vec::new();
        for device in devices {
            match vm.hotplug_disk(&device.host_node, device.read_only).await {
                Ok(addr) => {
                    plugged.push(addr);
                    agent_devices.push(BlockDevice {
                        path: device.container_path.display().to_string(),
                        scsi: Some(ScsiDisk {
                            target: addr.target,
                            lun: addr.lun,
                            ..Default::default()
                        })
                        .into(),
                        host_major: device.major,
                        host_minor: device.minor,
                        ..Default::default()
                    });
                }
                Err(source) => {
                    unplug_all(vm, container_id, plugged).await;
                    return Err(VolumeError::Plug {
                        path: device.host_node.clone(),
                        source,
                    });
                }
            }
        }
        if !plugged.is_empty() {
            self.plugged
                .lock()
                .await
                .insert(container_id.to_string(), plugged);
        }
        Ok(agent_devices)
    }

    /// Unplugs container `container_id`'s devices (nothing when it has none).
    pub async fn detach(&self, vm: &dyn Vm, container_id: &str) {
        let plugged = self.plugged.lock().await.remove(container_id);
        if let Some(plugged) = plugged {
            unplug_all(vm, container_id, plugged).await;
        }
    }
}

async fn unplug_all(vm: &dyn Vm, container_id: &str, plugged: Vec<ScsiAddr>) {
    if vm.exit_watch().borrow().is_some() {
        return;
    }
    for addr in plugged {
        if let Err(e) = vm.unplug_disk(addr, HostRelease::Awaited).await {
            tracing::warn!(container_id, error = %e, "cannot unplug a container's block device");
        }
    }
}

/// Whether the last device cgroup rule matching block device `major:minor` allows writes
/// (runc's semantics: later rules win).
fn writable(rules: &[LinuxDeviceCgroup], major: u32, minor: u32) -> bool {
    let matches = |rule: &&LinuxDeviceCgroup| {
        matches!(
            rule.typ(),
            None | Some(LinuxDeviceType::A | LinuxDeviceType::B)
        ) && rule.major().is_none_or(|m| m == major as i64)
            && rule.minor().is_none_or(|m| m == minor as i64)
    };
    rules
        .iter()
        .rev()
        .find(matches)
        .is_some_and(|rule| rule.allow() && rule.access().as_deref().unwrap_or("rwm").contains('w'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(devices: serde_json::Value, rules: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.1.0",
            "linux": { "devices": devices, "resources": { "devices": rules } }
        }))
        .unwrap()
    }

    /// A sysfs and /dev stand-in where `name` is block device `major:minor` (a regular
    /// file cannot be a device node, so only the lookup failures are checked here).
    fn fake_sysfs(major: u32, minor: u32, name: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let entry = dir.path().join(format!("sys/{major}:{minor}"));
        std::fs::create_dir_all(&entry).unwrap();
        std::fs::write(
            entry.join("uevent"),
            format!("MAJOR={major}\nDEVNAME={name}\n"),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("dev")).unwrap();
        dir
    }

    #[test]
    fn character_devices_stay_in_the_spec() {
        let spec = spec_with(
            serde_json::json!([{ "path": "/dev/fuse", "type": "c", "major": 10, "minor": 229 }]),
            serde_json::json!([]),
        );
        let dir = fake_sysfs(10, 229, "fuse");
        let sys = dir.path().join("sys");
        assert!(plan(&spec, &sys, &dir.path().join("dev"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_block_device_the_host_does_not_have_fails_naming_it() {
        let spec = spec_with(
            serde_json::json!([{ "path": "/dev/xvda", "type": "b", "major": 7, "minor": 9 }]),
            serde_json::json!([]),
        );
        // Named in sysfs, but /dev has no such node (or a regular file): refused.
        let dir = fake_sysfs(7, 9, "loop9");
        std::fs::write(dir.path().join("dev/loop9"), "").unwrap();
        let err = plan(&spec, &dir.path().join("sys"), &dir.path().join("dev")).unwrap_err();
        assert!(
            matches!(&err, VolumeError::NoHostDevice { container_path, major: 7, minor: 9 }
                if container_path == Path::new("/dev/xvda")),
            "{err}"
        );
        // A DEVNAME that climbs out of /dev is never followed.
        let dir = fake_sysfs(7, 9, "../etc/passwd");
        assert!(plan(&spec, &dir.path().join("sys"), &dir.path().join("dev")).is_err());
    }

    #[test]
    fn the_last_matching_cgroup_rule_decides_writes() {
        let rule = |allow: bool, typ: &str, major: Option<i64>, access: &str| {
            serde_json::from_value::<LinuxDeviceCgroup>(serde_json::json!({
                "allow": allow, "type": typ, "major": major, "minor": null, "access": access
            }))
            .unwrap()
        };
        let deny_all = rule(false, "a", None, "rwm");
        assert!(!writable(std::slice::from_ref(&deny_all), 7, 1));
        let rw = rule(true, "b", Some(7), "rwm");
        assert!(writable(&[deny_all.clone(), rw.clone()], 7, 1));
        let read = rule(true, "b", Some(7), "r");
        assert!(!writable(&[deny_all.clone(), read], 7, 1));
        // A rule for another major says nothing about this device.
        let other = rule(true, "b", Some(8), "rwm");
        assert!(!writable(&[deny_all, other], 7, 1));
        assert!(!writable(&[], 7, 1));
    }
}
