//! Measurements of the QEMU layer (not part of the normal test run):
//! `cargo test -p spry-shim --test vm_bench -- --ignored --nocapture --test-threads=1`.
//! Prints medians of cold boot to /init, to an answer on the agent port,
//! hot-plug latency, and the memory of an idle VM; compares a gzip initramfs.

mod guest_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spry_shim::vm::{
    AccelChoice, AgentEndpoint, HostRelease, Hypervisor, QemuHypervisor, Vm, VmConfig,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const RUNS: usize = 5;
const TIMEOUT: Duration = Duration::from_secs(120);

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn summary(name: &str, values: Vec<f64>, unit: &str) {
    let shown: Vec<String> = values.iter().map(|v| format!("{v:.0}")).collect();
    eprintln!(
        "MEASURE {name}: median {:.0} {unit} (runs: {})",
        median(values),
        shown.join(", ")
    );
}

async fn wait_console(vm: &dyn Vm, needle: &str) {
    wait_console_count(vm, needle, 1).await;
}

/// Waits until `needle` has appeared `count` times (targets are reused).
async fn wait_console_count(vm: &dyn Vm, needle: &str, count: usize) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
        if text.matches(needle).count() >= count {
            return;
        }
        assert!(vm.is_running(), "the VM died waiting for {needle}");
        assert!(
            Instant::now() < deadline,
            "no {needle} within {TIMEOUT:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn port_answer(vm: &dyn Vm) {
    let AgentEndpoint::VirtioSerial { socket } = vm.agent_endpoint() else {
        panic!("virtio-serial expected")
    };
    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (read_half, mut write_half) = stream.into_split();
    let mut lines = BufReader::new(read_half).lines();
    loop {
        write_half.write_all(b"ping 1\n").await.unwrap();
        let wait = tokio::time::timeout(Duration::from_millis(100), lines.next_line()).await;
        if let Ok(Ok(Some(_))) = wait {
            return;
        }
    }
}

fn config(root: &Path, id: &str, initramfs: &Path) -> VmConfig {
    VmConfig {
        id: id.into(),
        state_dir: root.join(id),
        kernel: guest_support::kernel().vmlinux.clone(),
        initramfs: initramfs.to_owned(),
        cpus: 1,
        memory_mib: 256,
        accel: AccelChoice::Tcg,
        ..VmConfig::default()
    }
}

/// (Rss, Pss) in KiB from /proc/<pid>/smaps_rollup.
fn memory_kib(pid: u32) -> (f64, f64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let field = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap()
    };
    (field("Rss:"), field("Pss:"))
}

fn gzip_copy(image: &Path) -> PathBuf {
    let out = image.with_extension("img.gz");
    let file = std::fs::File::create(&out).unwrap();
    let status = std::process::Command::new("gzip")
        .args(["-c", "-6"])
        .arg(image)
        .stdout(file)
        .status()
        .unwrap();
    assert!(status.success());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run explicitly"]
async fn measure_boot_hotplug_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let initramfs = guest_support::test_initramfs(dir.path());
    let gz = gzip_copy(&initramfs);
    eprintln!(
        "initramfs: {} bytes uncompressed, {} bytes gzip",
        std::fs::metadata(&initramfs).unwrap().len(),
        std::fs::metadata(&gz).unwrap().len()
    );
    let root = tempfile::Builder::new()
        .prefix("spry-bench-")
        .tempdir_in("/tmp")
        .unwrap();
    let hypervisor = QemuHypervisor::new(root.path());

    for (label, image) in [("plain", &initramfs), ("gzip", &gz)] {
        let (mut to_start, mut to_init, mut to_answer) = (vec![], vec![], vec![]);
        for run in 0..RUNS {
            let started = Instant::now();
            let vm = hypervisor
                .start(config(root.path(), &format!("b-{label}-{run}"), image))
                .await
                .unwrap();
            to_start.push(started.elapsed().as_secs_f64() * 1000.0);
            wait_console(vm.as_ref(), "SPRY-TEST-INIT").await;
            to_init.push(started.elapsed().as_secs_f64() * 1000.0);
            port_answer(vm.as_ref()).await;
            to_answer.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        summary(
            &format!("{label} initramfs: start() returned"),
            to_start,
            "ms",
        );
        summary(
            &format!("{label} initramfs: cold boot to /init"),
            to_init,
            "ms",
        );
        summary(
            &format!("{label} initramfs: cold boot to agent-port answer (after insmod)"),
            to_answer,
            "ms",
        );
    }

    let vm = hypervisor
        .start(config(root.path(), "b-hotplug", &initramfs))
        .await
        .unwrap();
    wait_console(vm.as_ref(), "SPRY-MODULES-LOADED").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss, pss) = memory_kib(vm.pid());
    eprintln!(
        "MEASURE idle VM (256 MiB guest, TCG, 3 s after boot): Rss {rss:.0} KiB, Pss {pss:.0} KiB"
    );
    let (mut qmp, mut visible, mut unplug) = (vec![], vec![], vec![]);
    for run in 0..RUNS {
        let image =
            guest_support::erofs_image(dir.path(), &format!("disk{run}"), &format!("hello{run}"));
        let started = Instant::now();
        let addr = vm.hotplug_disk(&image, true).await.unwrap();
        qmp.push(started.elapsed().as_secs_f64() * 1000.0);
        wait_console_count(
            vm.as_ref(),
            &format!("SPRY-DISK 0:0:{}:0 ", addr.target),
            run + 1,
        )
        .await;
        visible.push(started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        vm.unplug_disk(addr, HostRelease::Awaited).await.unwrap();
        unplug.push(started.elapsed().as_secs_f64() * 1000.0);
        // Let the guest notice before the target is reused.
        wait_console_count(
            vm.as_ref(),
            &format!("SPRY-DISK-GONE 0:0:{}:0", addr.target),
            run + 1,
        )
        .await;
    }
    summary("hotplug: QMP blockdev-add + device_add", qmp, "ms");
    summary(
        "hotplug: until the guest mounted the erofs disk",
        visible,
        "ms",
    );
    summary(
        "unplug: device_del + DEVICE_DELETED + blockdev-del",
        unplug,
        "ms",
    );
    let (rss, pss) = memory_kib(vm.pid());
    eprintln!("MEASURE VM after 5 hot-plugs: Rss {rss:.0} KiB, Pss {pss:.0} KiB");
}

/// With the real guest (`scripts/build-guest.sh` output, or `SPRY_GUEST_DIR`):
/// cold boot until the agent answers its version handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run explicitly"]
async fn measure_boot_to_agent_check() {
    use spry_shim::agent_client::{AgentClient, VirtioSerialTransport};

    let guest = std::env::var_os("SPRY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| guest_support::repo_root().join("build/guest/current"));
    let assets = spry_shim::assets::load_current(guest.parent().unwrap())
        .expect("build the guest first: scripts/build-guest.sh");
    let root = tempfile::Builder::new()
        .prefix("spry-bench-")
        .tempdir_in("/tmp")
        .unwrap();
    let hypervisor = QemuHypervisor::new(root.path());
    let (mut to_check, mut to_poweroff): (Vec<f64>, Vec<f64>) = (vec![], vec![]);
    for run in 0..RUNS {
        let config = VmConfig {
            kernel: assets.vmlinux.clone(),
            ..config(root.path(), &format!("agent-{run}"), &assets.initramfs)
        };
        let started = Instant::now();
        let vm = hypervisor.start(config).await.unwrap();
        let AgentEndpoint::VirtioSerial { socket } = vm.agent_endpoint() else {
            panic!("virtio-serial expected")
        };
        let client = AgentClient::connect(&VirtioSerialTransport { socket }, TIMEOUT).await;
        let client = client.unwrap_or_else(|e| {
            let console = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
            panic!("the agent did not answer: {e}\n{console}")
        });
        to_check.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(client.info.kernel_release, assets.manifest.kernel_release);
        if run == 0 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let (rss, pss) = memory_kib(vm.pid());
            eprintln!(
                "MEASURE idle VM with the agent (256 MiB, TCG): Rss {rss:.0} KiB, Pss {pss:.0} KiB"
            );
        }
        // The agent powers the VM off by itself: QEMU must exit without a quit.
        let shutdown_started = Instant::now();
        let _ = client.shutdown().await;
        let mut exit = vm.exit_watch();
        tokio::time::timeout(TIMEOUT, exit.wait_for(Option::is_some))
            .await
            .expect("the VM did not power off after Shutdown")
            .unwrap();
        to_poweroff.push(shutdown_started.elapsed().as_secs_f64() * 1000.0);
        let exit = vm.stop(Duration::from_secs(1)).await.unwrap();
        assert_eq!(exit.code, Some(0), "{exit:?}");
    }
    summary("cold boot to agent Check answered", to_check, "ms");
    summary("agent Shutdown until QEMU exited", to_poweroff, "ms");
}
