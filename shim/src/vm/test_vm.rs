//! A VM double for host-side unit tests: records disk hot-plugs (targets 0, 1, 2, …; an
//! empty disk with an empty path until it is filled) and unplugs, can refuse read-write
//! plugs and fills, and counts as running for its whole life.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{Accel, AgentEndpoint, HostRelease, ScsiAddr, Vm, VmError, VmExit};

pub struct TestVm {
    next: AtomicU32,
    pub plugged: Mutex<Vec<(ScsiAddr, PathBuf)>>,
    pub unplugged: Mutex<Vec<ScsiAddr>>,
    pub refuse_writable: AtomicBool,
    pub refuse_fill: AtomicBool,
    /// Kept so the VM never looks exited.
    exit: watch::Sender<Option<VmExit>>,
}

impl Default for TestVm {
    fn default() -> Self {
        Self {
            next: AtomicU32::new(0),
            plugged: Mutex::default(),
            unplugged: Mutex::default(),
            refuse_writable: AtomicBool::new(false),
            refuse_fill: AtomicBool::new(false),
            exit: watch::channel(None).0,
        }
    }
}

#[async_trait]
impl Vm for TestVm {
    fn id(&self) -> &str {
        "test-vm"
    }
    fn pid(&self) -> u32 {
        0
    }
    fn accel(&self) -> Accel {
        Accel::Tcg
    }
    fn console_log(&self) -> &Path {
        Path::new("/dev/null")
    }
    fn agent_endpoint(&self) -> AgentEndpoint {
        AgentEndpoint::Vsock { cid: 3, port: 1 }
    }
    fn share_socket(&self) -> &Path {
        Path::new("/nonexistent/share.sock")
    }
    async fn hotplug_disk(&self, image: &Path, read_only: bool) -> Result<ScsiAddr, VmError> {
        if !read_only && self.refuse_writable.load(Ordering::SeqCst) {
            return Err(VmError::NoFreeScsiTarget {
                id: "test-vm".into(),
            });
        }
        // As QEMU's open of it would.
        if !image.exists() {
            return Err(VmError::DiskImage {
                path: image.to_path_buf(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let addr = ScsiAddr {
            target: self.next.fetch_add(1, Ordering::SeqCst),
            lun: 0,
        };
        self.plugged
            .lock()
            .unwrap()
            .push((addr, image.to_path_buf()));
        Ok(addr)
    }
    async fn plug_empty_disk(&self, _bytes: u64) -> Result<ScsiAddr, VmError> {
        let addr = ScsiAddr {
            target: self.next.fetch_add(1, Ordering::SeqCst),
            lun: 0,
        };
        self.plugged.lock().unwrap().push((addr, PathBuf::new()));
        Ok(addr)
    }
    async fn fill_disk(&self, addr: ScsiAddr, image: &Path) -> Result<(), VmError> {
        if self.refuse_fill.load(Ordering::SeqCst) {
            return Err(VmError::UnknownDisk {
                id: "test-vm".into(),
                addr,
            });
        }
        let mut plugged = self.plugged.lock().unwrap();
        let slot = plugged
            .iter_mut()
            .find(|(a, path)| *a == addr && path.as_os_str().is_empty());
        let Some((_, path)) = slot else {
            return Err(VmError::UnknownDisk {
                id: "test-vm".into(),
                addr,
            });
        };
        *path = image.to_path_buf();
        Ok(())
    }
    async fn unplug_disk(&self, addr: ScsiAddr, _: HostRelease) -> Result<(), VmError> {
        self.unplugged.lock().unwrap().push(addr);
        Ok(())
    }
    fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        self.exit.subscribe()
    }
    async fn save_snapshot(&self, _: &Path) -> Result<(), VmError> {
        unreachable!("not used by host-side unit tests")
    }
    async fn stop(&self, _: Duration) -> Result<VmExit, VmError> {
        unreachable!("not used by host-side unit tests")
    }
}
