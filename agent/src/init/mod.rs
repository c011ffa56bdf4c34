//! PID 1 duties: the early filesystems, kernel modules, console, power off.

pub mod cmdline;
pub mod kmod;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;

pub use cmdline::KernelParams;

/// Errors of PID-1 setup.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("failed to create {path}")]
    Mkdir { path: PathBuf, source: nix::Error },
    #[error("failed to mount {fstype} at {target}")]
    Mount {
        fstype: String,
        target: PathBuf,
        source: nix::Error,
    },
    #[error("failed to open the console")]
    Console { source: std::io::Error },
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

struct EarlyMount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// The filesystems every guest needs, in mount order.
const EARLY_MOUNTS: &[EarlyMount] = &[
    EarlyMount {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    EarlyMount {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    EarlyMount {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    EarlyMount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    },
    EarlyMount {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    EarlyMount {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    EarlyMount {
        fstype: "tmpfs",
        target: "/tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    EarlyMount {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
];

/// Controllers enabled for the containers' cgroups.
pub const CGROUP_CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "io"];

/// Where the initramfs root is bind-mounted before it becomes `/`.
const PIVOTABLE_ROOT: &str = "/.spry-root";

/// Makes `/` a mount that has a parent. The initramfs root (rootfs) has none, and the kernel
/// refuses `pivot_root` in any mount namespace whose root is such a mount (EINVAL), which is
/// what libcontainer does for every container. Binding the initramfs onto a directory of
/// itself and moving that bind over `/` (switch_root's trick, without copying anything) gives
/// a root with a parent. Call first, before anything else is mounted.
pub fn make_root_pivotable() -> Result<(), InitError> {
    let target = Path::new(PIVOTABLE_ROOT);
    mkdir_if_missing(target)?;
    let mount_err = |source| InitError::Mount {
        fstype: "bind".into(),
        target: target.to_path_buf(),
        source,
    };
    mount(
        Some("/"),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err)?;
    nix::unistd::chdir(target).map_err(mount_err)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(mount_err)?;
    nix::unistd::chroot(".").map_err(mount_err)?;
    nix::unistd::chdir("/").map_err(mount_err)?;
    Ok(())
}

fn mkdir_if_missing(path: &Path) -> Result<(), InitError> {
    match nix::unistd::mkdir(path, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(source) => Err(InitError::Mkdir {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Mounts the early filesystems. A target that is already mounted is fine.
pub fn mount_early_filesystems() -> Result<(), InitError> {
    for early in EARLY_MOUNTS {
        let target = Path::new(early.target);
        mkdir_if_missing(target)?;
        match mount(
            Some(early.fstype),
            target,
            Some(early.fstype),
            early.flags,
            early.data,
        ) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(source) => {
                return Err(InitError::Mount {
                    fstype: early.fstype.to_string(),
                    target: target.to_path_buf(),
                    source,
                })
            }
        }
    }
    // /dev/ptmx must use the new devpts instance.
    let _ = std::fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    Ok(())
}

/// Enables the container controllers in the root cgroup; returns the ones that failed (the
/// kernel may lack one).
pub fn enable_cgroup_controllers(cgroup_root: &Path) -> Vec<&'static str> {
    let control = cgroup_root.join("cgroup.subtree_control");
    CGROUP_CONTROLLERS
        .iter()
        .copied()
        .filter(|controller| std::fs::write(&control, format!("+{controller}")).is_err())
        .collect()
}

/// Points stdin/stdout/stderr at /dev/console (the kernel may have started us without them).
pub fn attach_console() -> Result<(), InitError> {
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .map_err(|source| InitError::Console { source })?;
    for target in 0..=2 {
        if console.as_raw_fd() != target {
            nix::unistd::dup2(console.as_raw_fd(), target)
                .map_err(|e| InitError::Console { source: e.into() })?;
        }
    }
    Ok(())
}

/// Reads the agent's kernel parameters.
pub fn kernel_params() -> Result<KernelParams, InitError> {
    let path = PathBuf::from("/proc/cmdline");
    let text = std::fs::read_to_string(&path).map_err(|source| InitError::Read { path, source })?;
    Ok(cmdline::parse(&text))
}

/// Loads the modules listed in the initramfs; logs the ones that fail.
pub fn load_modules() {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let modules_dir = Path::new("/lib/modules").join(release);
    match kmod::load_all(Path::new(kmod::MODULE_LIST), &modules_dir) {
        Ok(failures) => {
            for failure in failures {
                tracing::error!(error = %crate::error_chain(&failure), "module not loaded");
            }
        }
        Err(err) => tracing::warn!(error = %crate::error_chain(&err), "no kernel modules loaded"),
    }
}

/// Syncs and powers the VM off (QEMU runs with -no-reboot and exits). Never returns.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF).unwrap_err();
    tracing::error!(error = %err, "power off failed");
    // PID 1 must not exit (that panics the kernel); park instead.
    loop {
        std::thread::park();
    }
}
