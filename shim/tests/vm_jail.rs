//! QEMU as a hostile guest's host: jailed (its own uid, no capabilities, its own mount
//! namespace with a read-only root holding only what it runs), and a guest flooding its
//! console cannot fill the host. Needs root and QEMU, like `vm_qemu.rs`.

mod guest_support;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use guest_support::vms::*;
use spry_shim::vm::{AgentEndpoint, Hypervisor, QemuHypervisor, DEFAULT_UID_BASE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_runs_jailed_and_a_console_flood_stays_under_its_cap() {
    let root = state_root();
    let hypervisor = QemuHypervisor::new(root.path());
    let vm = hypervisor
        .start(config(root.path(), "vm-jail"))
        .await
        .unwrap();
    let state_dir = root.path().join("vm-jail");
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
    assert!(status.contains("\nSeccomp:\t2\n"), "{status}");
    assert!(status.contains("\nNoNewPrivs:\t1\n"), "{status}");
    // Jailed: a uid of its own, no capabilities, its own mount namespace whose root holds
    // the system's programs and the VM's boot files, and nothing of the host's state.
    let ids = |key: &str| -> Vec<u32> {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace()
            .skip(1)
            .map(|id| id.parse().unwrap())
            .collect()
    };
    assert!(
        ids("Uid:").iter().all(|&uid| uid >= DEFAULT_UID_BASE),
        "{status}"
    );
    assert!(
        ids("Gid:").iter().all(|&gid| gid == DEFAULT_UID_BASE),
        "{status}"
    );
    assert!(
        status.lines().any(|l| l.trim_end() == "Groups:"),
        "{status}"
    );
    assert!(status.contains("\nCapEff:\t0000000000000000\n"), "{status}");
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_ne!(ns(&vm.pid().to_string()), ns("self"));
    let jail_root = PathBuf::from(format!("/proc/{}/root", vm.pid()));
    assert!(jail_root.join("usr/bin").is_dir());
    assert!(jail_root
        .join(
            guest_support::kernel()
                .vmlinux
                .canonicalize()
                .unwrap()
                .strip_prefix("/")
                .unwrap()
        )
        .is_file());
    let own_state = state_dir.strip_prefix("/").unwrap().to_str().unwrap();
    for hidden in ["etc/shadow", "root", "run", "proc/1", own_state] {
        assert!(
            !jail_root.join(hidden).exists(),
            "{hidden} is in QEMU's jail"
        );
    }
    // The sockets QEMU serves are the shim's: root's, not QEMU's to replace.
    for socket in ["qmp.sock", "agent.sock", "share.sock", "console.log"] {
        let meta = std::fs::symlink_metadata(state_dir.join(socket)).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o077), (0, 0), "{socket}");
    }

    // A guest copying /dev/zero to its console as fast as it can for 60 s (an emulated
    // UART takes ~125 KiB/s under TCG here).
    const FLOOD_SECS: u64 = 60;
    let AgentEndpoint::VirtioSerial { socket } = vm.agent_endpoint() else {
        panic!("expected virtio-serial")
    };
    let mut agent = TestAgent::connect(&socket).await;
    assert_eq!(agent.ask("flood zero").await, "flooding zero");
    let flooding = Instant::now();
    let mut most_held = 0;
    while flooding.elapsed() < Duration::from_secs(FLOOD_SECS) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let meta = std::fs::metadata(vm.console_log()).unwrap();
        most_held = most_held.max(meta.blocks() * 512);
        assert!(vm.is_running());
    }
    let written = std::fs::metadata(vm.console_log()).unwrap().len();
    eprintln!(
        "console flood: {} KiB written in {FLOOD_SECS} s, at most {} KiB held",
        written / 1024,
        most_held / 1024
    );
    // The flood went well past the 1 MiB cap, and the host never held more than the cap
    // plus what one second of flood adds between two trims.
    let per_second = written / FLOOD_SECS;
    assert!(
        written > 2 * 1024 * 1024,
        "the guest wrote only {written} bytes"
    );
    assert!(
        most_held <= 1024 * 1024 + 2 * per_second + 64 * 1024,
        "the console log held {most_held} bytes (flood {per_second} B/s)"
    );
    // Its tail is still the guest's latest output: zeros that are data, not a trimmed hole.
    let log = std::fs::File::open(vm.console_log()).unwrap();
    let tail_at = log.metadata().unwrap().len() - 4096;
    let data_at = nix::unistd::lseek(
        std::os::fd::AsRawFd::as_raw_fd(&log),
        tail_at as i64,
        nix::unistd::Whence::SeekData,
    )
    .unwrap();
    assert_eq!(
        data_at as u64, tail_at,
        "the console's tail was trimmed away"
    );
    let mut last = vec![1u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&log, &mut last, tail_at).unwrap();
    assert!(last.iter().all(|&b| b == 0));
    let pid = vm.pid();
    drop(vm);
    wait_gone(pid).await;
    wait_no_uids_held(root.path()).await;
    assert!(left_behind(root.path()).is_empty());
}
