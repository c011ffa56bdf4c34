//! Reading extended attributes without following symlinks, which nix does not wrap.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The xattrs (full name, value) of the entry `name` of the directory `dir`, the entry
/// itself even when it is a symlink. An entry listxattrat(2) finds none on costs that
/// one call; others are read through `/proc/self/fd/<dir>/<name>`, so the path is
/// resolved from `dir` and never leaves it.
pub fn list_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    // Most entries have none: one listxattrat(2) says so without resolving a /proc path
    // (a tenth of packing python's image was that lookup).
    if has_none_at(dir, name) {
        return Ok(Vec::new());
    }
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name.to_bytes());
    let path = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    read_all(
        // SAFETY: `path` is NUL-terminated; the buffer is valid for `len` bytes (or null
        // with 0, which asks for the size).
        |buf, len| unsafe { libc::llistxattr(path.as_ptr(), buf.cast(), len) },
        |attr, buf, len| {
            // SAFETY: as above; `attr` is NUL-terminated.
            unsafe { libc::lgetxattr(path.as_ptr(), attr.as_ptr(), buf.cast(), len) }
        },
    )
}

/// listxattrat(2)'s number (Linux 6.13; the same on every architecture).
const SYS_LISTXATTRAT: libc::c_long = 465;
/// Set once the call is refused: ENOSYS from a kernel before 6.13, EPERM from a seccomp
/// profile that does not know it. Either way only the /proc path is left, and a refused
/// call per entry would be wasted.
static NO_LISTXATTRAT: AtomicBool = AtomicBool::new(false);

/// Whether `name` in `dir` surely has no xattrs; false when unsure (the caller looks).
fn has_none_at(dir: BorrowedFd<'_>, name: &CStr) -> bool {
    if NO_LISTXATTRAT.load(Ordering::Relaxed) {
        return false;
    }
    // SAFETY: `name` is NUL-terminated and `dir` open for the call; a null list of size
    // 0 asks only for the size.
    let size = unsafe {
        libc::syscall(
            SYS_LISTXATTRAT,
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
            std::ptr::null_mut::<libc::c_char>(),
            0usize,
        )
    };
    if size < 0
        && matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOSYS | libc::EPERM)
        )
    {
        NO_LISTXATTRAT.store(true, Ordering::Relaxed);
    }
    size == 0
}

/// The xattrs (full name, value) of the open file `fd`.
pub fn list_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let fd = fd.as_raw_fd();
    read_all(
        // SAFETY: `fd` is open for the call; the buffer is valid for `len` bytes (or null
        // with 0, which asks for the size).
        |buf, len| unsafe { libc::flistxattr(fd, buf.cast(), len) },
        |attr, buf, len| {
            // SAFETY: as above; `attr` is NUL-terminated.
            unsafe { libc::fgetxattr(fd, attr.as_ptr(), buf.cast(), len) }
        },
    )
}

/// Lists the names, then reads each value, sizing buffers by asking first and retrying
/// when a value grew in between (ERANGE).
fn read_all(
    list: impl Fn(*mut u8, usize) -> isize,
    get: impl Fn(&CStr, *mut u8, usize) -> isize,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = sized_read(list)?;
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let c_name = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let value = match sized_read(|buf, len| get(&c_name, buf, len)) {
            Ok(value) => value,
            // Removed between the listing and the read.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(e),
        };
        out.push((name.to_vec(), value));
    }
    Ok(out)
}

fn sized_read(call: impl Fn(*mut u8, usize) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let size = call(std::ptr::null_mut(), 0);
        if size < 0 {
            let e = io::Error::last_os_error();
            // A file system without xattrs has none to list.
            return match e.raw_os_error() {
                Some(libc::ENOTSUP) => Ok(Vec::new()),
                _ => Err(e),
            };
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size as usize];
        let got = call(buf.as_mut_ptr(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
}

/// Sets an xattr on `path` itself (a symlink too), for tests that build trees.
#[cfg(test)]
pub fn set(path: &std::path::Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let name = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: both strings are NUL-terminated; `value` is valid for its length.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn lists_an_entrys_own_xattrs_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let (plain, tagged, link) = (
            dir.path().join("plain"),
            dir.path().join("tagged"),
            dir.path().join("link"),
        );
        std::fs::write(&plain, "").unwrap();
        std::fs::write(&tagged, "").unwrap();
        std::os::unix::fs::symlink("tagged", &link).unwrap();
        set(&tagged, b"user.spry", b"yes").unwrap();
        let fd = std::fs::File::open(dir.path()).unwrap();
        let list = |name: &str| list_at(fd.as_fd(), &CString::new(name).unwrap()).unwrap();
        assert_eq!(list("plain"), Vec::<(Vec<u8>, Vec<u8>)>::new());
        assert_eq!(
            list("tagged"),
            vec![(b"user.spry".to_vec(), b"yes".to_vec())]
        );
        // The symlink itself, not what it points to.
        assert_eq!(list("link"), Vec::<(Vec<u8>, Vec<u8>)>::new());
        let missing = list_at(fd.as_fd(), c"missing").unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
    }
}
