//! Which hot-plugged SCSI disks the guest kernel has finished attaching.
//!
//! The kernel makes a new disk's node openable (`bdev_add`) before the SCSI disk driver's
//! probe is done: the probe then scans the partition table, announces the disk and, last,
//! sets the disk's readahead to the kernel's default (`disk_update_readahead`). A mount
//! can get in between, and a readahead the agent sets then is overwritten a moment later
//! (a lazily served layer's disk read 128 KiB ahead instead of the snapshotter's 32). The
//! driver core sends a `bind` uevent for the SCSI device once the probe has returned, so
//! the agent listens to the kernel's uevents and waits for that before it mounts a disk.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use nix::sys::socket::{
    bind, recvfrom, setsockopt, socket, sockopt, AddressFamily, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};

/// The kernel's uevent multicast group.
const KERNEL_UEVENTS: u32 = 1;
/// Room for a burst of uevents (a pod's disks plugged at once) while the agent is busy.
const RECEIVE_BUFFER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UeventError {
    #[error("opening the kernel uevent socket: {0}")]
    Open(#[source] nix::Error),
    #[error("starting the uevent thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("receiving kernel uevents: {0}")]
    Receive(#[source] nix::Error),
}

/// A SCSI device's address, `host:channel:target:lun`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScsiAddr {
    pub host: u32,
    pub channel: u32,
    pub target: u32,
    pub lun: u64,
}

impl ScsiAddr {
    /// Parses `H:C:T:L` (a SCSI device's sysfs name).
    pub fn parse(name: &str) -> Option<Self> {
        let mut parts = name.split(':');
        let addr = Self {
            host: parts.next()?.parse().ok()?,
            channel: parts.next()?.parse().ok()?,
            target: parts.next()?.parse().ok()?,
            lun: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(addr)
    }
}

/// What a kernel uevent says about SCSI disks.
#[derive(Debug, PartialEq, Eq)]
pub enum DiskEvent {
    /// The SCSI disk driver finished probing the device at this address.
    Attached(ScsiAddr),
    /// The device at this address lost its driver or went away.
    Detached(ScsiAddr),
}

/// Reads a kernel uevent (`ACTION@DEVPATH\0KEY=VALUE\0...`); `None` for one about
/// anything but a SCSI device's driver.
pub fn disk_event(message: &[u8]) -> Option<DiskEvent> {
    let mut fields = message
        .split(|b| *b == 0)
        .filter_map(|f| std::str::from_utf8(f).ok());
    // The header repeats ACTION and DEVPATH; the fields are what counts.
    fields.next()?.split_once('@')?;
    let (mut action, mut devpath, mut subsystem, mut devtype, mut driver) =
        (None, None, None, None, None);
    for field in fields {
        match field.split_once('=') {
            Some(("ACTION", v)) => action = Some(v),
            Some(("DEVPATH", v)) => devpath = Some(v),
            Some(("SUBSYSTEM", v)) => subsystem = Some(v),
            Some(("DEVTYPE", v)) => devtype = Some(v),
            Some(("DRIVER", v)) => driver = Some(v),
            _ => {}
        }
    }
    if subsystem? != "scsi" || devtype? != "scsi_device" {
        return None;
    }
    let addr = ScsiAddr::parse(Path::new(devpath?).file_name()?.to_str()?)?;
    match action? {
        "bind" if driver == Some("sd") => Some(DiskEvent::Attached(addr)),
        "unbind" | "remove" => Some(DiskEvent::Detached(addr)),
        _ => None,
    }
}

/// The SCSI disks whose probe the kernel has announced.
#[derive(Debug)]
pub struct ScsiProbes {
    attached: Mutex<HashSet<ScsiAddr>>,
    /// Without a uevent socket (host test mode, or it failed to open) nothing is heard, and
    /// a disk counts as attached once its block device shows.
    listening: bool,
}

impl ScsiProbes {
    /// Hears nothing: disks count as attached once seen.
    pub fn unheard() -> Self {
        Self {
            attached: Mutex::new(HashSet::new()),
            listening: false,
        }
    }

    /// Listens to the kernel's uevents from now on (on a thread of its own: the socket
    /// blocks), starting from the disks attached in `scsi_devices` (`/sys/bus/scsi/devices`).
    pub fn listen(scsi_devices: &Path) -> Result<Arc<Self>, UeventError> {
        let socket = UeventSocket::open()?;
        // The socket is open first, so a probe ending meanwhile is heard or read here.
        let probes = Arc::new(Self {
            attached: Mutex::new(attached_in_sysfs(scsi_devices)),
            listening: true,
        });
        let heard = probes.clone();
        let scsi_devices = scsi_devices.to_path_buf();
        std::thread::Builder::new()
            .name("uevents".into())
            .spawn(move || heard.follow(&socket, &scsi_devices))
            .map_err(UeventError::Thread)?;
        Ok(probes)
    }

    fn follow(&self, socket: &UeventSocket, scsi_devices: &Path) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match socket.recv(&mut buf) {
                Ok(Some(len)) => {
                    if let Some(event) = disk_event(&buf[..len]) {
                        self.apply(event);
                    }
                }
                Ok(None) => {}
                // Events were dropped (the buffer overflowed): what sysfs says now is the
                // best there is.
                Err(UeventError::Receive(nix::errno::Errno::ENOBUFS)) => {
                    tracing::warn!("kernel uevents were dropped; re-reading the SCSI disks");
                    *self.lock() = attached_in_sysfs(scsi_devices);
                }
                Err(e) => {
                    tracing::error!(error = %e, "no more kernel uevents; disks count as attached once seen");
                    return;
                }
            }
        }
    }

    pub fn apply(&self, event: DiskEvent) {
        tracing::debug!(?event, "SCSI disk uevent");
        match event {
            DiskEvent::Attached(addr) => self.lock().insert(addr),
            DiskEvent::Detached(addr) => self.lock().remove(&addr),
        };
    }

    /// Whether the disk at `target:lun` (channel 0, any host) is attached, or nothing is
    /// heard.
    pub fn attached(&self, target: u32, lun: u32) -> bool {
        !self.listening
            || self
                .lock()
                .iter()
                .any(|a| a.channel == 0 && a.target == target && a.lun == u64::from(lun))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<ScsiAddr>> {
        // The set stays whole whatever a holder did: a poisoned lock is still usable.
        self.attached.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The SCSI devices in `scsi_devices` with a driver and a block device.
fn attached_in_sysfs(scsi_devices: &Path) -> HashSet<ScsiAddr> {
    let Ok(entries) = std::fs::read_dir(scsi_devices) else {
        return HashSet::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().join("driver").exists() && e.path().join("block").is_dir())
        .filter_map(|e| ScsiAddr::parse(e.file_name().to_str()?))
        .collect()
}

/// A netlink socket in the kernel's uevent group.
struct UeventSocket {
    fd: OwnedFd,
}

impl UeventSocket {
    fn open() -> Result<Self, UeventError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .map_err(UeventError::Open)?;
        if let Err(e) = setsockopt(&fd, sockopt::RcvBufForce, &RECEIVE_BUFFER) {
            tracing::debug!(error = %e, "keeping the default uevent receive buffer");
        }
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_UEVENTS)).map_err(UeventError::Open)?;
        Ok(Self { fd })
    }

    /// The next message's length; `None` for one not from the kernel (a process with
    /// CAP_NET_ADMIN can multicast look-alikes).
    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, UeventError> {
        loop {
            match recvfrom::<NetlinkAddr>(self.fd.as_raw_fd(), buf) {
                Ok((len, from)) => return Ok(from.is_some_and(|a| a.pid() == 0).then_some(len)),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(UeventError::Receive(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uevent(fields: &[&str]) -> Vec<u8> {
        let mut msg = b"bind@/devices/x\0".to_vec();
        for f in fields {
            msg.extend_from_slice(f.as_bytes());
            msg.push(0);
        }
        msg
    }

    const DEVPATH: &str =
        "DEVPATH=/devices/pci0000:00/0000:00:03.0/virtio1/host0/target0:0:2/0:0:2:0";

    #[test]
    fn an_sd_bind_of_a_scsi_device_attaches_its_address() {
        let msg = uevent(&[
            "ACTION=bind",
            DEVPATH,
            "SUBSYSTEM=scsi",
            "DEVTYPE=scsi_device",
            "DRIVER=sd",
            "SEQNUM=1234",
        ]);
        let addr = ScsiAddr {
            host: 0,
            channel: 0,
            target: 2,
            lun: 0,
        };
        assert_eq!(disk_event(&msg), Some(DiskEvent::Attached(addr)));
        let removed = uevent(&[
            "ACTION=remove",
            DEVPATH,
            "SUBSYSTEM=scsi",
            "DEVTYPE=scsi_device",
        ]);
        assert_eq!(disk_event(&removed), Some(DiskEvent::Detached(addr)));
    }

    #[test]
    fn other_uevents_say_nothing_about_disks() {
        // The block device's own add comes before the probe ends.
        let block_add = uevent(&[
            "ACTION=add",
            "DEVPATH=/devices/pci0000:00/host0/target0:0:2/0:0:2:0/block/sdb",
            "SUBSYSTEM=block",
            "DEVTYPE=disk",
        ]);
        // Another driver (a SCSI generic or CD-ROM) binding is not the disk's probe.
        let sr_bind = uevent(&[
            "ACTION=bind",
            DEVPATH,
            "SUBSYSTEM=scsi",
            "DEVTYPE=scsi_device",
            "DRIVER=sr",
        ]);
        let target = uevent(&[
            "ACTION=add",
            "DEVPATH=/devices/pci0000:00/host0/target0:0:2",
            "SUBSYSTEM=scsi",
            "DEVTYPE=scsi_target",
        ]);
        for msg in [block_add, sr_bind, target, b"garbage".to_vec(), Vec::new()] {
            assert_eq!(disk_event(&msg), None, "{msg:?}");
        }
        assert_eq!(ScsiAddr::parse("0:0:2:0:1"), None);
        assert_eq!(ScsiAddr::parse("host0"), None);
    }

    #[test]
    fn a_disk_is_attached_from_its_bind_until_it_goes() {
        let probes = ScsiProbes {
            attached: Mutex::new(HashSet::new()),
            listening: true,
        };
        let addr = ScsiAddr {
            host: 1,
            channel: 0,
            target: 3,
            lun: 1,
        };
        assert!(!probes.attached(3, 1));
        probes.apply(DiskEvent::Attached(addr));
        assert!(probes.attached(3, 1));
        assert!(!probes.attached(3, 0));
        probes.apply(DiskEvent::Detached(addr));
        assert!(!probes.attached(3, 1));
        // Hearing nothing, there is nothing to wait for.
        assert!(ScsiProbes::unheard().attached(3, 1));
    }

    #[test]
    fn sysfs_lists_the_disks_with_a_driver_and_a_block_device() {
        let dir = tempfile::tempdir().unwrap();
        let devices = dir.path();
        std::fs::create_dir_all(devices.join("0:0:0:0/block/sda")).unwrap();
        std::fs::create_dir_all(devices.join("0:0:0:0/driver")).unwrap();
        // Probing: a block device, no driver yet.
        std::fs::create_dir_all(devices.join("0:0:1:0/block/sdb")).unwrap();
        std::fs::create_dir_all(devices.join("host0")).unwrap();
        let found = attached_in_sysfs(devices);
        assert_eq!(found.len(), 1);
        assert!(found.contains(&ScsiAddr {
            host: 0,
            channel: 0,
            target: 0,
            lun: 0
        }));
    }

    /// The socket hears the kernel: a synthetic uevent asked of a device through sysfs.
    #[test]
    fn the_socket_hears_the_kernels_uevents() {
        let socket = UeventSocket::open().expect("uevent socket (needs Linux netlink)");
        let timeout = nix::sys::time::TimeVal::new(5, 0);
        setsockopt(&socket.fd, sockopt::ReceiveTimeout, &timeout).unwrap();
        std::fs::write("/sys/class/mem/null/uevent", "change")
            .expect("asking for a uevent needs root");
        let mut buf = vec![0u8; 16 * 1024];
        let heard = loop {
            let got = socket
                .recv(&mut buf)
                .expect("a uevent from the kernel within 5 s");
            let Some(len) = got else { continue };
            let msg = String::from_utf8_lossy(&buf[..len]).into_owned();
            if msg.starts_with("change@/devices/virtual/mem/null") {
                break msg;
            }
        };
        assert!(heard.contains("SUBSYSTEM=mem"), "{heard:?}");
    }
}
