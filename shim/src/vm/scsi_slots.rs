//! The virtio-scsi targets of one VM, and the end of a disk's unplug.
//!
//! `device_del` of a `scsi-hd` takes the disk away from the guest before it returns (the
//! guest gets a hot-unplug event), but QEMU frees the device, and with it the disk's block
//! node and image file, only later: measured on QEMU 10.0 in Spry's VMs, `DEVICE_DELETED`
//! came 51 ms after `device_del` every time, and `blockdev-del` fails with "in use" until
//! then. A container's stop need not wait for that (containerd's StopContainer does wait
//! for the shim's task delete), so [`HostRelease::Background`] finishes it in a task while
//! the target stays reserved; the image's file may stay open in QEMU for that long.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{broadcast, watch};
use tracing::Instrument;

use super::qmp::{QmpClient, QmpEvent};
use super::{HostRelease, ScsiAddr, VmError, VmExit};

/// virtio-scsi targets 0..=255 on bus 0; each disk gets its own target, LUN 0.
const MAX_SCSI_TARGET: u32 = 255;
/// How long QEMU may take to free an unplugged device.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);

/// Which targets hold a disk the guest can use, and which are still being freed.
#[derive(Debug, Default)]
struct Targets {
    plugged: BTreeSet<u32>,
    releasing: BTreeSet<u32>,
}

/// The targets of one VM, shared with the tasks that finish unplugs.
#[derive(Debug, Clone, Default)]
pub(super) struct ScsiSlots {
    targets: Arc<Mutex<Targets>>,
}

impl ScsiSlots {
    fn lock(&self) -> MutexGuard<'_, Targets> {
        self.targets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reserves the lowest target that is neither plugged nor being freed.
    pub(super) fn reserve(&self) -> Option<ScsiAddr> {
        let mut targets = self.lock();
        let target = (0..=MAX_SCSI_TARGET)
            .find(|t| !targets.plugged.contains(t) && !targets.releasing.contains(t))?;
        targets.plugged.insert(target);
        Some(ScsiAddr { target, lun: 0 })
    }

    /// Gives back a target whose plug failed.
    pub(super) fn cancel(&self, addr: ScsiAddr) {
        self.lock().plugged.remove(&addr.target);
    }

    pub(super) fn is_plugged(&self, addr: ScsiAddr) -> bool {
        addr.lun == 0 && self.lock().plugged.contains(&addr.target)
    }

    /// Marks a plugged target as being freed; false when it was not plugged (a second
    /// unplug of the same disk).
    fn start_release(&self, addr: ScsiAddr) -> bool {
        let mut targets = self.lock();
        if !targets.plugged.remove(&addr.target) {
            return false;
        }
        targets.releasing.insert(addr.target);
        true
    }

    /// Undoes `start_release` when `device_del` failed: the disk is still the guest's.
    fn abort_release(&self, addr: ScsiAddr) {
        let mut targets = self.lock();
        targets.releasing.remove(&addr.target);
        targets.plugged.insert(addr.target);
    }

    fn end_release(&self, addr: ScsiAddr) {
        self.lock().releasing.remove(&addr.target);
    }
}

/// What finishing an unplug needs from its VM.
pub(super) struct Unplug {
    pub vm_id: String,
    pub qmp: Arc<QmpClient>,
    pub exit: watch::Receiver<Option<VmExit>>,
    pub slots: ScsiSlots,
    pub addr: ScsiAddr,
    pub device_id: String,
    pub node_name: String,
    /// The image's own block node, for a disk plugged empty and filled.
    pub file_node: Option<String>,
}

impl Unplug {
    /// Takes the disk from the guest (`device_del`), then waits for QEMU to free it and
    /// deletes its block node, before returning or in a task, as `release` says.
    pub(super) async fn run(self, release: HostRelease) -> Result<(), VmError> {
        if !self.slots.start_release(self.addr) {
            return Err(VmError::UnknownDisk {
                id: self.vm_id,
                addr: self.addr,
            });
        }
        // Subscribe before asking, so the event cannot slip past.
        let events = self.qmp.subscribe();
        let deleted = self
            .qmp
            .execute("device_del", Some(json!({ "id": self.device_id })))
            .await;
        if let Err(source) = deleted {
            self.slots.abort_release(self.addr);
            return Err(VmError::Qmp {
                id: self.vm_id,
                source,
            });
        }
        match release {
            HostRelease::Awaited => self.free(events).await,
            HostRelease::Background => {
                let finish = async move {
                    if let Err(error) = self.free(events).await {
                        // The image stays open in QEMU until the VM exits and its target
                        // stays taken; the guest cannot reach either.
                        tracing::warn!(%error, "cannot free an unplugged disk in QEMU");
                    }
                };
                tokio::spawn(finish.instrument(tracing::Span::current()));
                Ok(())
            }
        }
    }

    /// Waits for `DEVICE_DELETED`, then deletes the block node and frees the target. A VM
    /// that exits meanwhile has nothing left to free.
    async fn free(mut self, mut events: broadcast::Receiver<QmpEvent>) -> Result<(), VmError> {
        let device_id = self.device_id.clone();
        let gone = tokio::time::timeout(UNPLUG_TIMEOUT, async {
            loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Ok(event)
                            if event.event == "DEVICE_DELETED"
                                && event.data["device"] == device_id.as_str() =>
                        {
                            return Freed::Device;
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return Freed::VmGone,
                    },
                    changed = self.exit.changed() => {
                        if changed.is_err() || self.exit.borrow().is_some() {
                            return Freed::VmGone;
                        }
                    }
                }
            }
        })
        .await;
        match gone {
            Ok(Freed::Device) => {}
            Ok(Freed::VmGone) => {
                self.slots.end_release(self.addr);
                return Ok(());
            }
            Err(_) => {
                return Err(VmError::UnplugTimeout {
                    id: self.vm_id,
                    addr: self.addr,
                })
            }
        }
        self.qmp
            .execute("blockdev-del", Some(json!({ "node-name": self.node_name })))
            .await
            .map_err(|source| VmError::Qmp {
                id: self.vm_id.clone(),
                source,
            })?;
        // A filled disk's image is a node of its own (`qemu/empty_disk.rs`).
        if let Some(file_node) = &self.file_node {
            self.qmp
                .execute("blockdev-del", Some(json!({ "node-name": file_node })))
                .await
                .map_err(|source| VmError::Qmp {
                    id: self.vm_id.clone(),
                    source,
                })?;
        }
        self.slots.end_release(self.addr);
        tracing::info!(
            target = self.addr.target,
            lun = self.addr.lun,
            "disk unplugged"
        );
        Ok(())
    }
}

enum Freed {
    Device,
    VmGone,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_being_freed_is_neither_plugged_nor_reused() {
        let slots = ScsiSlots::default();
        let a = slots.reserve().unwrap();
        let b = slots.reserve().unwrap();
        assert_eq!((a.target, b.target), (0, 1));
        assert!(slots.start_release(a));
        assert!(!slots.is_plugged(a));
        assert!(!slots.start_release(a), "a second unplug is refused");
        assert_eq!(slots.reserve().unwrap().target, 2, "0 is still being freed");
        slots.end_release(a);
        assert_eq!(slots.reserve().unwrap().target, 0, "freed: reused");
        slots.cancel(b);
        assert_eq!(slots.reserve().unwrap().target, 1);
    }

    #[test]
    fn targets_run_out() {
        let slots = ScsiSlots::default();
        for _ in 0..=MAX_SCSI_TARGET {
            slots.reserve().unwrap();
        }
        assert!(slots.reserve().is_none());
    }
}
