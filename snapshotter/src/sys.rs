//! The few raw syscalls this crate needs that nix does not wrap.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `lgetxattr(2)`: the value of extended attribute `name` of `path`.
#[allow(dead_code)]
pub fn getxattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let cpath =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let cname = CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated and outlive the call; `buf`
    // is valid for writes of `buf.len()` bytes.
    let n = unsafe {
        libc::lgetxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}
