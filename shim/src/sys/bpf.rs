//! The four bpf(2) commands the pod network's port-forward uses: a SOCKMAP, its update, a
//! BPF_PROG_TYPE_SK_LOOKUP program and its link to a network namespace.
//!
//! `union bpf_attr` is passed as a zeroed 128-byte buffer with the fields each command
//! reads written at their offsets from `<linux/bpf.h>`; the kernel requires every byte past
//! the fields it knows to be zero, which the buffer guarantees.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
const BPF_SK_LOOKUP: u32 = 36;
const BPF_ANY: u64 = 0;

/// `union bpf_attr`, as bytes.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }

    fn u32_at(&mut self, offset: usize, value: u32) -> &mut Self {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn u64_at(&mut self, offset: usize, value: u64) -> &mut Self {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }
}

fn bpf(command: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable, 8-byte-aligned 128-byte `union bpf_attr`
    // whose pointer fields (set by the callers) point to memory that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn owned_fd(rc: libc::c_long) -> io::Result<OwnedFd> {
    let fd = RawFd::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this new fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A SOCKMAP of `entries` sockets: u32 keys, u64 values (socket fds in, cookies out).
pub fn create_sockmap(entries: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32_at(0, BPF_MAP_TYPE_SOCKMAP)
        .u32_at(4, 4)
        .u32_at(8, 8)
        .u32_at(12, entries);
    owned_fd(bpf(BPF_MAP_CREATE, &mut attr)?)
}

/// Puts `socket` at `key` of the SOCKMAP `map`.
pub fn sockmap_insert(map: BorrowedFd<'_>, key: u32, socket: BorrowedFd<'_>) -> io::Result<()> {
    let value = socket.as_raw_fd() as u64;
    let mut attr = Attr::new();
    attr.u32_at(0, map.as_raw_fd() as u32)
        .u64_at(8, &key as *const u32 as u64)
        .u64_at(16, &value as *const u64 as u64)
        .u64_at(24, BPF_ANY);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Loads an SK_LOOKUP program (`code`: eBPF instructions, 8 bytes each). On refusal the
/// verifier's log is returned in the error.
pub fn load_sk_lookup(code: &[u8]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = Attr::new();
    attr.u32_at(0, BPF_PROG_TYPE_SK_LOOKUP)
        .u32_at(4, (code.len() / 8) as u32)
        .u64_at(8, code.as_ptr() as u64)
        .u64_at(16, license.as_ptr() as u64)
        .u32_at(24, 1)
        .u32_at(28, log.len() as u32)
        .u64_at(32, log.as_mut_ptr() as u64)
        .u32_at(68, BPF_SK_LOOKUP);
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(rc) => owned_fd(rc),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let verifier = String::from_utf8_lossy(&log[..end]);
            Err(io::Error::new(
                e.kind(),
                format!("{e}; verifier: {}", verifier.trim()),
            ))
        }
    }
}

/// Attaches an SK_LOOKUP program to the network namespace behind `netns`. The program
/// stays attached as long as the returned link fd is open (and no longer: a process that
/// dies takes its links with it).
pub fn link_sk_lookup(program: BorrowedFd<'_>, netns: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32_at(0, program.as_raw_fd() as u32)
        .u32_at(4, netns.as_raw_fd() as u32)
        .u32_at(8, BPF_SK_LOOKUP);
    owned_fd(bpf(BPF_LINK_CREATE, &mut attr)?)
}
