//! Real-VM tests of the QEMU hypervisor layer: boot the pinned kernel with a
//! busybox test initramfs, talk over the agent channel, hot-plug disks, kill
//! QEMU and check that nothing is left behind. Needs root, QEMU, the network
//! to apt (first run only), busybox-static and erofs-utils: fails otherwise.

mod guest_support;

use guest_support::vms::*;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spry_shim::vm::{
    AccelChoice, AgentEndpoint, HostRelease, Hypervisor, NetNamespace, QemuHypervisor, ScsiAddr,
    VmConfig, VmError,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_talks_hotplugs_and_stops_cleanly() {
    let root = state_root();
    let hypervisor = QemuHypervisor::new(root.path());
    let started = Instant::now();
    let vm = hypervisor
        .start(config(root.path(), "vm-full"))
        .await
        .unwrap();
    let state_dir = root.path().join("vm-full");
    assert!(state_dir.join("qmp.sock").exists());
    // QEMU runs under its seccomp filter (mode 2), with no new privileges.
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
    assert!(status.contains("\nSeccomp:\t2\n"), "{status}");
    assert!(status.contains("\nNoNewPrivs:\t1\n"), "{status}");
    wait_console(vm.as_ref(), "SPRY-TEST-INIT", BOOT_TIMEOUT).await;
    let to_init = started.elapsed();
    wait_console(vm.as_ref(), "SPRY-MODULES-LOADED", BOOT_TIMEOUT).await;
    let text = std::fs::read_to_string(vm.console_log()).unwrap();
    assert!(
        !text.contains("SPRY-INSMOD-FAILED"),
        "a module failed to load:\n{text}"
    );

    // The agent channel: a unix socket on the host, a virtio port in the guest.
    let AgentEndpoint::VirtioSerial { socket } = vm.agent_endpoint() else {
        panic!("expected virtio-serial")
    };
    let mut agent = TestAgent::connect(&socket).await;
    let answered = agent.ask("ping 42").await;
    assert_eq!(answered, "pong 42");
    let to_answer = started.elapsed();

    let first = guest_support::erofs_image(&fixture().images, "first", "hello-first");
    let plug_started = Instant::now();
    let addr = vm.hotplug_disk(&first, true).await.unwrap();
    let plug_qmp = plug_started.elapsed();
    assert_eq!(addr, ScsiAddr { target: 0, lun: 0 });
    let line = wait_console(vm.as_ref(), "SPRY-DISK 0:0:0:0", Duration::from_secs(30)).await;
    let plug_guest = plug_started.elapsed();
    assert!(line.ends_with("hello-first"), "{line}");

    let second = guest_support::erofs_image(&fixture().images, "second", "hello-second");
    let addr2 = vm.hotplug_disk(&second, true).await.unwrap();
    assert_eq!(addr2, ScsiAddr { target: 1, lun: 0 });
    let line = wait_console(vm.as_ref(), "SPRY-DISK 0:0:1:0", Duration::from_secs(30)).await;
    assert!(line.ends_with("hello-second"), "{line}");

    vm.unplug_disk(addr, HostRelease::Awaited).await.unwrap();
    wait_console(
        vm.as_ref(),
        "SPRY-DISK-GONE 0:0:0:0",
        Duration::from_secs(30),
    )
    .await;
    assert!(matches!(
        vm.unplug_disk(addr, HostRelease::Awaited).await,
        Err(VmError::UnknownDisk { .. })
    ));
    // The freed target is reused.
    let again = vm.hotplug_disk(&first, true).await.unwrap();
    assert_eq!(again, addr);
    let missing = vm
        .hotplug_disk(Path::new("/nonexistent/disk.img"), true)
        .await;
    assert!(
        matches!(missing, Err(VmError::DiskImage { .. })),
        "{missing:?}"
    );
    // A container stop's unplug: the guest loses the disk at once, QEMU frees it after.
    vm.unplug_disk(addr2, HostRelease::Background)
        .await
        .unwrap();
    assert!(matches!(
        vm.unplug_disk(addr2, HostRelease::Background).await,
        Err(VmError::UnknownDisk { .. })
    ));
    wait_console(
        vm.as_ref(),
        "SPRY-DISK-GONE 0:0:1:0",
        Duration::from_secs(30),
    )
    .await;
    let freed_by = Instant::now() + Duration::from_secs(10);
    loop {
        let plugged = vm.hotplug_disk(&second, true).await.unwrap();
        if plugged == addr2 {
            break;
        }
        assert!(
            Instant::now() < freed_by,
            "target 1 was never freed after a background unplug"
        );
        vm.unplug_disk(plugged, HostRelease::Awaited).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    eprintln!(
        "MEASURE boot_to_init_ms={} boot_to_port_answer_ms={} hotplug_qmp_ms={} hotplug_guest_visible_ms={}",
        to_init.as_millis(),
        to_answer.as_millis(),
        plug_qmp.as_millis(),
        plug_guest.as_millis()
    );

    // The guest never powers off on its own: stop falls back to QMP quit.
    let pid = vm.pid();
    let stop_started = Instant::now();
    let exit = vm.stop(Duration::from_millis(200)).await.unwrap();
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert!(stop_started.elapsed() < Duration::from_secs(5));
    assert!(!state_dir.exists(), "stop must remove the state dir");
    drop(vm);
    wait_gone(pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_is_reported_within_a_second_and_drop_cleans_up() {
    let root = state_root();
    let hypervisor = QemuHypervisor::new(root.path());
    let vm = hypervisor
        .start(config(root.path(), "vm-kill"))
        .await
        .unwrap();
    wait_console(vm.as_ref(), "SPRY-TEST-INIT", BOOT_TIMEOUT).await;
    let mut watch = vm.exit_watch();
    assert!(watch.borrow().is_none());
    let pid = vm.pid();
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(1), watch.wait_for(Option::is_some))
        .await
        .expect("the exit was not reported within 1 s")
        .unwrap();
    let latency = killed.elapsed();
    let exit = watch.borrow().clone().unwrap();
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    assert!(
        exit.console_tail.contains("SPRY-TEST-INIT"),
        "console tail: {}",
        exit.console_tail
    );
    assert!(!vm.is_running());
    assert!(matches!(
        vm.hotplug_disk(
            &guest_support::erofs_image(&fixture().images, "late", "x"),
            true
        )
        .await,
        Err(VmError::Exited { .. })
    ));
    eprintln!(
        "MEASURE sigkill_to_exit_report_ms={:.1}",
        latency.as_secs_f64() * 1000.0
    );
    drop(vm);
    wait_gone(pid).await;
    assert!(
        !root.path().join("vm-kill").exists(),
        "drop must remove the state dir"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_running_vm_kills_qemu() {
    let root = state_root();
    let hypervisor = QemuHypervisor::new(root.path());
    let vm = hypervisor
        .start(config(root.path(), "vm-drop"))
        .await
        .unwrap();
    let pid = vm.pid();
    assert!(process_exists(pid));
    drop(vm);
    wait_gone(pid).await;
    assert!(!root.path().join("vm-drop").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_fail_before_spawning_and_leave_nothing() {
    let root = state_root();
    let hypervisor = QemuHypervisor::new(root.path());

    let missing_kernel = VmConfig {
        kernel: "/nonexistent/vmlinux".into(),
        ..config(root.path(), "bad-1")
    };
    match hypervisor.start(missing_kernel).await {
        Err(VmError::MissingFile {
            what: "kernel",
            path,
        }) => assert_eq!(path, Path::new("/nonexistent/vmlinux")),
        other => panic!("unexpected {:?}", other.map(|vm| vm.pid())),
    }
    let missing_qemu = VmConfig {
        qemu: "/nonexistent/qemu".into(),
        ..config(root.path(), "bad-2")
    };
    assert!(matches!(
        hypervisor.start(missing_qemu).await,
        Err(VmError::MissingFile {
            what: "QEMU binary",
            ..
        })
    ));
    let bad_id = config(root.path(), "has space");
    assert!(matches!(
        hypervisor.start(bad_id).await,
        Err(VmError::InvalidId { .. })
    ));
    let long = VmConfig {
        state_dir: root.path().join("x".repeat(120)),
        ..config(root.path(), "bad-3")
    };
    assert!(matches!(
        hypervisor.start(long).await,
        Err(VmError::SocketPathTooLong { .. })
    ));

    std::fs::create_dir(root.path().join("taken")).unwrap();
    assert!(matches!(
        hypervisor.start(config(root.path(), "taken")).await,
        Err(VmError::StateDirExists { .. })
    ));
    std::fs::remove_dir(root.path().join("taken")).unwrap();

    // QEMU itself refuses this one: its stderr must come back.
    let too_many_cpus = VmConfig {
        cpus: 10_000,
        ..config(root.path(), "bad-4")
    };
    match hypervisor.start(too_many_cpus).await {
        Err(VmError::StartupExit { stderr, exit, .. }) => {
            assert!(stderr.to_lowercase().contains("cpu"), "stderr: {stderr}");
            assert_ne!(exit.code, Some(0));
        }
        other => panic!("unexpected {:?}", other.map(|vm| vm.pid())),
    }
    let left = left_behind(root.path());
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_accel_probes_once_and_caches_the_verdict() {
    let root = state_root();
    let hypervisor = QemuHypervisor::new(root.path());
    let auto = |id: &str| VmConfig {
        accel: AccelChoice::Auto,
        ..config(root.path(), id)
    };
    let probe_started = Instant::now();
    let vm = hypervisor.start(auto("auto-1")).await.unwrap();
    let first = probe_started.elapsed();
    let accel = vm.accel();
    let cache = std::fs::read_to_string(root.path().join("accel-probe.json"))
        .expect("the probe verdict is cached");
    assert!(cache.contains(&format!("\"accel\":\"{accel}\"")), "{cache}");
    // Whatever the verdict, the VM must actually boot with it.
    wait_console(vm.as_ref(), "SPRY-TEST-INIT", BOOT_TIMEOUT).await;
    drop(vm);

    let second_started = Instant::now();
    let vm = hypervisor.start(auto("auto-2")).await.unwrap();
    let second = second_started.elapsed();
    assert_eq!(vm.accel(), accel, "the cached verdict is reused");
    eprintln!(
        "MEASURE accel={accel} first_start_with_probe_ms={} cached_start_ms={}",
        first.as_millis(),
        second.as_millis()
    );
    drop(vm);
    wait_no_uids_held(root.path()).await;
    let left: Vec<_> = left_behind(root.path())
        .into_iter()
        .filter(|name| name != "accel-probe.json")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A named network namespace, deleted on drop.
struct NetNs(String);

impl NetNs {
    fn create(name: &str) -> Self {
        let status = std::process::Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("the test needs ip (apt-get install iproute2)");
        assert!(status.success(), "ip netns add {name} failed");
        Self(name.to_owned())
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_runs_inside_the_given_netns() {
    use std::os::unix::fs::MetadataExt;
    let root = state_root();
    let hypervisor = QemuHypervisor::new(root.path());
    let netns = NetNs::create(&format!("spry-vmt-{}", std::process::id()));
    let in_netns = VmConfig {
        netns: NetNamespace::Join(netns.path()),
        nics: vec![spry_shim::network::nic_for(0)],
        ..config(root.path(), "vm-netns")
    };
    let vm = hypervisor.start(in_netns).await.unwrap();
    let qemu_ns = std::fs::metadata(format!("/proc/{}/ns/net", vm.pid()))
        .unwrap()
        .ino();
    assert_eq!(qemu_ns, std::fs::metadata(netns.path()).unwrap().ino());
    assert_ne!(
        qemu_ns,
        std::fs::metadata("/proc/self/ns/net").unwrap().ino(),
        "the test itself must not move"
    );
    // The NIC's tap was made in the pod's namespace, not in ours.
    let tap_in = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .args(["link", "show", "spry-tap0"])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(tap_in(&["-n", &netns.0]), "no tap in the pod netns");
    assert!(!tap_in(&[]), "a tap in the host netns");
    let pid = vm.pid();
    drop(vm);
    wait_gone(pid).await;
    assert!(!tap_in(&["-n", &netns.0]), "the tap outlived QEMU");

    let no_netns = VmConfig {
        nics: vec![spry_shim::network::nic_for(0)],
        ..config(root.path(), "vm-nicnons")
    };
    assert!(matches!(
        hypervisor.start(no_netns).await,
        Err(VmError::NicsWithoutNetns { .. })
    ));

    let missing = VmConfig {
        netns: NetNamespace::Join("/run/netns/spry-no-such-ns".into()),
        ..config(root.path(), "vm-nons")
    };
    assert!(matches!(
        hypervisor.start(missing).await,
        Err(VmError::NetNs { .. })
    ));
    assert!(!root.path().join("vm-nons").exists());
}
