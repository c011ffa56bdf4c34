//! Opening a tap device: the fd QEMU's virtio-net backend reads and writes frames on.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// `_IOW('T', 202, int)` of linux/if_tun.h.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags.
#[repr(C)]
struct TapRequest {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the tap `name` in the calling thread's network namespace and returns the fd
/// that holds it: the tap lives as long as that fd (or a copy of it) is open. Frames
/// carry a virtio-net header, so QEMU keeps checksum and segmentation offloads.
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name"),
        ));
    }
    let tun: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?
        .into();
    let mut request = TapRequest {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    for (slot, byte) in request.name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads one ifreq-sized struct from the valid pointer (and may write
    // the final name back into it); the fd is ours and open.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut request as *mut TapRequest) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_kernel_would_refuse_are_refused_here() {
        for name in ["", "a-name-of-16-chr", "nul\0"] {
            assert_eq!(
                open_tap(name).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
        }
    }
}
