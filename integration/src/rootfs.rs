//! A minimal busybox root filesystem for VM tests and benchmarks (from Debian's
//! busybox-static), without going through an image registry.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use tempfile::TempDir;

pub fn busybox_rootfs() -> Result<TempDir> {
    let busybox = Path::new("/bin/busybox");
    ensure!(
        busybox.is_file(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
    let dir = tempfile::Builder::new().prefix("spry-rootfs-").tempdir()?;
    for sub in ["bin", "etc", "proc", "sys", "dev", "tmp", "root"] {
        std::fs::create_dir_all(dir.path().join(sub))?;
    }
    std::fs::copy(busybox, dir.path().join("bin/busybox")).context("copying /bin/busybox")?;
    // Relative links: `busybox --install` would point them at this host path.
    let applets = Command::new(busybox).arg("--list").output()?;
    ensure!(applets.status.success(), "busybox --list failed");
    for applet in String::from_utf8_lossy(&applets.stdout)
        .lines()
        .filter(|a| *a != "busybox")
    {
        std::os::unix::fs::symlink("busybox", dir.path().join("bin").join(applet))?;
    }
    std::fs::write(
        dir.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    std::fs::write(
        dir.path().join("etc/group"),
        "root:x:0:\nnogroup:x:65534:\n",
    )?;
    Ok(dir)
}
