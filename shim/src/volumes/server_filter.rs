//! The file server's seccomp filter: the system calls that serving FUSE from the confined
//! share takes, and nothing else.
//!
//! Why: the server parses what a hostile guest sends and runs as root on the host. Its
//! mount namespace and `pivot_root` hide the host's files, but root's other powers are
//! still there (loading a module, mounting a fresh `/proc` whose `1/root` is the host's
//! root, `open_by_handle_at` past any mount, signalling host processes, `ptrace`). The
//! filter takes those away from a server the guest may have taken over: a call outside
//! the list kills the server (`SIGSYS`; the kernel's audit log names the call), as
//! virtiofsd and Firecracker do.
//!
//! The list is what fuse-backend-rs's passthrough file system, Rust's runtime and the
//! attach thread (`attach.rs`) were seen making under the volume tests (`strace -f`),
//! less what the server never needs (exec, sockets, namespaces, file handles, xattrs:
//! the server turns them off). `mount` is allowed only as a propagation change (what the
//! attach thread does to a tree it attached), never to mount a file system.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Failures to build or install the filter.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("the file server has no seccomp filter for this architecture ({arch})")]
    Arch { arch: &'static str },
    #[error("cannot build the file server's seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("cannot install the file server's seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// Allowed whatever their arguments (syscall numbers are `i64` on the 64-bit targets
/// seccompiler supports).
const ALLOWED: &[i64] = &[
    // Requests in, replies out; the attach thread's control socket.
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    // The passthrough file system's operations.
    libc::SYS_openat,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_fcntl,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_umask,
    // A request runs with the guest caller's uid and gid (per thread), then back to root.
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_geteuid,
    libc::SYS_getegid,
    libc::SYS_getpid,
    libc::SYS_gettid,
    // Attaching a volume's tree at its placeholder, or taking it off again.
    libc::SYS_move_mount,
    libc::SYS_umount2,
    // Rust's runtime: memory, locks, signals, time, randomness, the end.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
    // The attach thread's own start, which may still be running when the filter goes on.
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_sched_getaffinity,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The attach thread's propagation changes: `mount(NULL, target, NULL, flags, NULL)`
/// with exactly these flags.
const PROPAGATION_CHANGES: [u64; 2] = [
    libc::MS_SLAVE | libc::MS_REC,
    libc::MS_PRIVATE | libc::MS_REC,
];

fn target_arch() -> Result<TargetArch, FilterError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|_| FilterError::Arch {
        arch: std::env::consts::ARCH,
    })
}

/// The filter as a BPF program for this machine's architecture.
pub fn program() -> Result<BpfProgram, FilterError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&call| (call, Vec::new())).collect();
    let propagation = PROPAGATION_CHANGES
        .iter()
        .map(|&flags| {
            let flags_are =
                SeccompCondition::new(3, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, flags)?;
            SeccompRule::new(vec![flags_are])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(FilterError::Build)?;
    rules.insert(libc::SYS_mount, propagation);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        target_arch()?,
    )
    .map_err(FilterError::Build)?;
    BpfProgram::try_from(filter).map_err(FilterError::Build)
}

/// Installs the filter on every thread of the process (it also sets no_new_privs).
pub fn install() -> Result<(), FilterError> {
    seccompiler::apply_filter_all_threads(&program()?).map_err(FilterError::Install)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    /// Set in the child that installs the filter (never in the test harness itself: the
    /// filter would bind all of its threads).
    const CHILD: &str = "SPRY_SERVER_FILTER_CHILD";
    const SERVED: &str = "file operations served under the filter";

    #[test]
    fn the_filter_compiles_for_this_machine() {
        assert!(!program().unwrap().is_empty());
    }

    /// The child's half of the test below; does nothing in a normal run.
    #[test]
    fn filtered_child() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let dir = std::path::PathBuf::from(std::env::var_os(CHILD).unwrap());
        install().unwrap();
        // What the passthrough file system does for a guest, through the calls it uses
        // (the *at() family: std's rename or unlink would take other ones): create, write,
        // read back, list.
        let file = dir.join("a");
        std::fs::write(&file, b"served").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"served");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        println!("{SERVED}");
        std::io::stdout().flush().unwrap();
        // A server taken over by the guest opening a socket: killed on the spot.
        let _ = std::net::UdpSocket::bind("127.0.0.1:0");
        println!("still alive after socket()");
    }

    #[test]
    fn file_operations_pass_and_a_call_outside_the_list_kills_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "volumes::server_filter::tests::filtered_child"])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD, dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(SERVED),
            "file operations failed under the filter: {out:?}"
        );
        assert!(!stdout.contains("still alive"), "{stdout}");
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{out:?}");
    }
}
