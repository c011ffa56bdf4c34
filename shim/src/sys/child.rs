//! What a spawned child does between fork and exec: die with us, join its cgroups, enter a
//! network namespace, take the fds handed to it at fixed numbers, and (QEMU) enter its jail.
//!
//! Everything here runs in the forked child of a multi-threaded process, so it makes raw
//! syscalls only, on data prepared before the fork: no allocation, no locks.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;

/// The network namespace a spawned child runs in.
#[derive(Debug, Clone, Copy)]
pub enum ChildNetns {
    Inherit,
    /// Enter the namespace behind this fd (kept open by the caller until the spawn).
    Join(RawFd),
    /// A new, empty namespace of the child's own, gone when the child is.
    New,
}

/// Most fds a child can be handed.
pub const MAX_PASSED_FDS: usize = 32;
/// Passed fds are first parked at or above this number, so that moving one to its
/// target cannot close another still to be moved. Targets must stay below it.
pub const PARK_FDS_AT: RawFd = 64;

/// One step of building a jail's root, in order. Every `path` is the host path inside the
/// jail's root mount: the root dir joined with the path the jailed process will see.
#[derive(Debug)]
pub enum JailEntry {
    Dir {
        path: CString,
    },
    Symlink {
        target: CString,
        path: CString,
    },
    /// Binds `source` at `path` (made first, as a dir or an empty file), read-only unless
    /// `writable`; device nodes work only with `devices`, programs run only with `exec`.
    Bind {
        source: CString,
        path: CString,
        is_dir: bool,
        writable: bool,
        devices: bool,
        exec: bool,
    },
}

/// A jail: a mount namespace whose root is a small read-only tmpfs holding only the
/// entries, entered as an unprivileged uid with no supplementary groups.
#[derive(Debug)]
pub struct Jail {
    /// An existing empty dir; the child mounts its root tmpfs there, in its own namespace.
    pub root: CString,
    pub entries: Vec<JailEntry>,
    pub uid: u32,
    pub gid: u32,
}

/// How a spawned child is set up before exec.
#[derive(Debug)]
pub struct ChildSetup {
    pub netns: ChildNetns,
    /// `(fd here, number the child gets it at)`; targets 3..[`PARK_FDS_AT`]. The child's
    /// copies lose close-on-exec; ours are untouched.
    pub fds: Vec<(RawFd, RawFd)>,
    pub jail: Option<Jail>,
    /// `cgroup.procs` files, open for writing, that the child joins before anything else
    /// (so all it ever allocates is charged there), while still privileged.
    pub cgroups: Vec<RawFd>,
}

/// Each dir's `cgroup.procs`, open for writing, for [`ChildSetup::cgroups`] (close-on-exec:
/// the child's program does not keep them). The error names the file that would not open.
pub fn open_cgroup_procs(dirs: &[PathBuf]) -> Result<Vec<File>, (PathBuf, io::Error)> {
    dirs.iter()
        .map(|dir| {
            let procs = dir.join("cgroup.procs");
            OpenOptions::new()
                .write(true)
                .open(&procs)
                .map_err(|e| (procs, e))
        })
        .collect()
}

/// Makes a spawned child die with us (SIGKILL when our thread exits) and sets it up as
/// `setup` says before exec. A failed step writes its name to the child's stderr.
///
/// Parent-death is tied to the *thread* that forks: spawn from a thread that
/// lives as long as the process (the VM layer has one for this).
pub fn configure_child(command: &mut tokio::process::Command, setup: ChildSetup) -> io::Result<()> {
    let bad_fd = setup
        .fds
        .iter()
        .any(|&(source, target)| source < 0 || !(3..PARK_FDS_AT).contains(&target));
    if setup.fds.len() > MAX_PASSED_FDS || bad_fd {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut parked: [RawFd; MAX_PASSED_FDS] = [-1; MAX_PASSED_FDS];
    // SAFETY: the closure runs in the forked child before exec. It makes only
    // async-signal-safe syscalls on data owned by the closure, allocates nothing, and
    // every pointer it passes is to a NUL-terminated string or array that outlives the call.
    unsafe {
        command.pre_exec(move || {
            let step = |name: &str, rc: libc::c_int| -> io::Result<()> {
                if rc == 0 {
                    return Ok(());
                }
                let error = io::Error::last_os_error();
                let message = b"spry: setting up QEMU's sandbox failed at: ";
                libc::write(2, message.as_ptr().cast(), message.len());
                libc::write(2, name.as_ptr().cast(), name.len());
                libc::write(2, b"\n".as_ptr().cast(), 1);
                Err(error)
            };
            step(
                "parent-death signal",
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
            )?;
            for &procs in &setup.cgroups {
                // "0" is the writer itself, in cgroup v1 and v2 alike.
                let written = libc::write(procs, b"0".as_ptr().cast(), 1);
                step(
                    "joining the pod's cgroup",
                    if written == 1 { 0 } else { -1 },
                )?;
            }
            let rc = match setup.netns {
                ChildNetns::Inherit => 0,
                ChildNetns::Join(fd) => libc::setns(fd, libc::CLONE_NEWNET),
                ChildNetns::New => libc::unshare(libc::CLONE_NEWNET),
            };
            step("network namespace", rc)?;
            for (slot, &(source, _)) in parked.iter_mut().zip(&setup.fds) {
                *slot = libc::fcntl(source, libc::F_DUPFD_CLOEXEC, PARK_FDS_AT);
                step("parking a passed fd", if *slot < 0 { -1 } else { 0 })?;
            }
            for (&parked, &(_, target)) in parked.iter().zip(&setup.fds) {
                // dup2 clears close-on-exec on the target; the parked copy closes at exec.
                let rc = libc::dup2(parked, target);
                step("passing an fd", if rc < 0 { -1 } else { 0 })?;
            }
            if let Some(jail) = &setup.jail {
                enter_jail(jail, &step)?;
            }
            Ok(())
        });
    }
    Ok(())
}

/// Builds the jail's root and enters it. Runs in the forked child.
///
/// # Safety
/// Only between fork and exec, with `jail` prepared before the fork.
unsafe fn enter_jail(
    jail: &Jail,
    step: &impl Fn(&str, libc::c_int) -> io::Result<()>,
) -> io::Result<()> {
    let none = std::ptr::null::<libc::c_char>();
    // SAFETY: (for the whole function) see `configure_child`: raw syscalls on
    // NUL-terminated strings owned by `jail`, in the child.
    unsafe {
        step(
            "mount namespace",
            libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC),
        )?;
        // Nothing mounted from here on may reach the host's namespace.
        step(
            "private mounts",
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
        )?;
        step(
            "root tmpfs",
            libc::mount(
                c"tmpfs".as_ptr(),
                jail.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"mode=0755,size=256k,nr_inodes=512".as_ptr().cast(),
            ),
        )?;
        for entry in &jail.entries {
            match entry {
                JailEntry::Dir { path } => step("jail dir", libc::mkdir(path.as_ptr(), 0o755))?,
                JailEntry::Symlink { target, path } => step(
                    "jail symlink",
                    libc::symlink(target.as_ptr(), path.as_ptr()),
                )?,
                JailEntry::Bind {
                    source,
                    path,
                    is_dir,
                    writable,
                    devices,
                    exec,
                } => {
                    if *is_dir {
                        step("bind target dir", libc::mkdir(path.as_ptr(), 0o755))?;
                    } else {
                        let fd = libc::open(
                            path.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o644,
                        );
                        step("bind target file", if fd < 0 { -1 } else { 0 })?;
                        libc::close(fd);
                    }
                    step(
                        "bind mount",
                        libc::mount(
                            source.as_ptr(),
                            path.as_ptr(),
                            none,
                            libc::MS_BIND,
                            std::ptr::null(),
                        ),
                    )?;
                    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID;
                    if !writable {
                        flags |= libc::MS_RDONLY;
                    }
                    if !devices {
                        flags |= libc::MS_NODEV;
                    }
                    if !exec {
                        flags |= libc::MS_NOEXEC;
                    }
                    step(
                        "bind remount",
                        libc::mount(none, path.as_ptr(), none, flags, std::ptr::null()),
                    )?;
                }
            }
        }
        // pivot_root(".", ".") stacks the old root on the new one; detaching it leaves
        // only the jail (the way runc does it).
        step("enter the jail root", libc::chdir(jail.root.as_ptr()))?;
        step(
            "pivot_root",
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
        )?;
        step(
            "detach the host root",
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
        )?;
        step("chdir /", libc::chdir(c"/".as_ptr()))?;
        step(
            "read-only root",
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
        )?;
        step("drop groups", libc::setgroups(0, std::ptr::null()))?;
        step("set gid", libc::setresgid(jail.gid, jail.gid, jail.gid))?;
        // With every uid non-zero, the kernel drops all capabilities here.
        step("set uid", libc::setresuid(jail.uid, jail.uid, jail.uid))?;
        // A credential change clears the parent-death signal: set it again.
        step(
            "parent-death signal after setuid",
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
        )?;
        step(
            "no new privileges",
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
        )?;
    }
    Ok(())
}
