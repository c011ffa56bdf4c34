//! Swapping a container's image in a running pod, through stock containerd 2.x:
//! - kubelet's own sequence (StopContainer, PullImage, CreateContainer with attempt + 1,
//!   StartContainer) in a cold and a template Spry pod: the same QEMU, the same IP, the
//!   pod's /dev/shm kept, attempt 0's log kept, the new image reported;
//! - `spry upgrade`: the same checks, a broken image rolled back, and bad input refused
//!   before anything changes; in a Spry pod and a runc pod (the flow is plain CRI);
//! - containers of one image in one pod share its read-only layer disk (a container
//!   started in a running pod plugs only its writable layer), never their writes.
//!
//! Needs root, scripts/install-deps.sh, scripts/build-guest.sh and
//! scripts/build-test-images.sh; fails (never skips) without them.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use spry_integration::{require_root, spry::SpryNode, system, ContainerConfig, Crictl, PodConfig};

/// Serves as "A" in busybox, as "B" where python3 exists, and cannot start without a shell.
const SCRIPT: &str =
    "if [ -x /usr/bin/python3 ]; then echo serving B; else echo serving A; fi; exec sleep 3600";

#[test]
fn spry_upgrade_swaps_a_container_in_place_rolls_back_and_refuses_bad_input() -> Result<()> {
    require_root()?;
    let node = SpryNode::start("upgrade", false)?;
    let leaks = node.leak_check()?;
    for runtime in [Some("spry"), None] {
        upgrade_in_pod(&node, runtime)
            .with_context(|| format!("in a {} pod", runtime.unwrap_or("runc")))?;
    }
    node.containerd.crictl().rmp_all_force()?;
    leaks.assert_clean()?;
    Ok(())
}

#[test]
fn kubelets_sequence_swaps_the_image_inside_the_same_vm() -> Result<()> {
    require_root()?;
    let node = SpryNode::start("inplace", true)?;
    let leaks = node.leak_check()?;
    for runtime in ["spry", "spry-cold"] {
        kubelet_swap(&node, runtime).with_context(|| format!("in a {runtime} pod"))?;
    }
    leaks.assert_clean()?;
    Ok(())
}

#[test]
fn containers_of_one_image_share_the_layer_disk_but_not_their_writes() -> Result<()> {
    require_root()?;
    let node = SpryNode::start("shared-layer", false)?;
    let leaks = node.leak_check()?;
    let crictl = node.containerd.crictl();
    let pod_cfg = PodConfig::new("shared-layer").write_to(&node.containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, Some("spry"))?;
    let start = |name: &str| -> Result<String> {
        let cfg = ContainerConfig::new(name, &node.image)
            .command(&["sleep", "3600"])
            .write_to(&node.containerd.dir())?;
        let id = crictl.create(&pod, &cfg, &pod_cfg)?;
        crictl.start(&id)?;
        Ok(id)
    };
    // The guest's disks: sysfs is not namespaced, a container sees the VM's. Counted once
    // the VM has idled past the shim's wait before it plugs the next writable disk (100
    // ms), which is then always one of them.
    let disks = |id: &str| -> Result<usize> {
        std::thread::sleep(Duration::from_millis(500));
        let out = crictl.exec_ok(id, &["ls", "/sys/block"])?;
        let plugged = out
            .split_whitespace()
            .filter(|d| d.starts_with("sd"))
            .count();
        Ok(plugged.saturating_sub(1))
    };
    let first = start("first")?;
    ensure!(disks(&first)? == 2, "one layer disk + one writable disk");
    let second = start("second")?;
    ensure!(
        disks(&second)? == 3,
        "the second container plugged its own layer disk: {} disks",
        disks(&second)?
    );
    crictl.exec_ok(&first, &["sh", "-c", "echo mine > /etc/first-only"])?;
    let seen = crictl.exec(&second, &["cat", "/etc/first-only"])?;
    ensure!(seen.code != 0, "a write crossed containers: {seen:?}");
    // The first goes; the disk stays for the second, which still reads its image.
    crictl.stop(&first, 1)?;
    crictl.rm(&first)?;
    crictl.exec_ok(&second, &["sh", "-c", "cat /bin/* > /dev/null"])?;
    ensure!(disks(&second)? == 2, "the first container's disks stayed");
    crictl.stop(&second, 1)?;
    crictl.rm(&second)?;
    // The last user gone, the layer disk was unplugged: a new container plugs it again.
    let third = start("third")?;
    ensure!(
        disks(&third)? == 2,
        "a layer disk without users stayed plugged"
    );
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    leaks.assert_clean()?;
    Ok(())
}

fn kubelet_swap(node: &SpryNode, runtime: &str) -> Result<()> {
    let crictl = node.containerd.crictl();
    let pod_cfg = PodConfig::new(&format!("ip-{runtime}")).write_to(&node.containerd.dir())?;
    let logs = node
        .containerd
        .dir()
        .join("logs")
        .join(format!("ip-{runtime}"));
    let pod = crictl.runp(&pod_cfg, Some(runtime))?;
    let app = |image: &str, attempt: u32| {
        ContainerConfig::new("app", image)
            .command(&["sh", "-c", SCRIPT])
            .log_path(&format!("app/{attempt}.log"))
            .patch(serde_json::json!({ "metadata": { "attempt": attempt } }))
            .write_to(&node.containerd.dir())
    };
    let a = crictl.create(&pod, &app(&node.image, 0)?, &pod_cfg)?;
    crictl.start(&a)?;
    wait_log(&logs.join("app/0.log"), "serving A")?;
    crictl.exec_ok(&a, &["sh", "-c", "echo kept > /dev/shm/pod-file"])?;
    let vm = vms(node)?;
    ensure!(vm.len() == 1, "one VM expected: {vm:?}");
    let ip = pod_ip(&crictl, &pod)?;
    ensure!(!ip.is_empty(), "the pod has no IP");
    let image_ref_a = crictl.inspect(&a)?["status"]["imageRef"].clone();

    // What kubelet does when only the image changed (the pull comes after the stop).
    crictl.stop(&a, 2)?;
    let python = node.registry.image("python:1");
    crictl.pull(&python)?;
    let b = crictl.create(&pod, &app(&python, 1)?, &pod_cfg)?;
    crictl.start(&b)?;
    wait_log(&logs.join("app/1.log"), "serving B")?;

    ensure!(vms(node)? == vm, "the pod's VM was replaced");
    ensure!(pod_ip(&crictl, &pod)? == ip, "the pod's IP changed");
    let kept = crictl.exec_ok(&b, &["cat", "/dev/shm/pod-file"])?;
    ensure!(kept == "kept", "the pod's /dev/shm lost its file: {kept:?}");
    let status = &crictl.inspect(&b)?["status"];
    ensure!(
        status["imageRef"] != image_ref_a && status["state"] == "CONTAINER_RUNNING",
        "the new container does not report the new image: {status}"
    );
    let attempt0 = std::fs::read_to_string(logs.join("app/0.log"))?;
    ensure!(
        attempt0.contains("serving A"),
        "attempt 0's log: {attempt0:?}"
    );
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    Ok(())
}

fn upgrade_in_pod(node: &SpryNode, runtime: Option<&str>) -> Result<()> {
    let crictl = node.containerd.crictl();
    let name = format!("up-{}", runtime.unwrap_or("runc"));
    let pod_cfg = PodConfig::new(&name).write_to(&node.containerd.dir())?;
    let logs = node.containerd.dir().join("logs").join(&name);
    let pod = crictl.runp(&pod_cfg, runtime)?;
    let cfg = ContainerConfig::new("app", &node.image)
        .command(&["sh", "-c", SCRIPT])
        .log_path("app/0.log")
        .write_to(&node.containerd.dir())?;
    let a = crictl.create(&pod, &cfg, &pod_cfg)?;
    crictl.start(&a)?;
    wait_log(&logs.join("app/0.log"), "serving A")?;
    crictl.exec_ok(&a, &["sh", "-c", "echo kept > /dev/shm/pod-file"])?;
    let vm = vms(node)?;
    let ip = pod_ip(&crictl, &pod)?;
    ensure!(!ip.is_empty(), "the pod has no IP");
    let upgrade = |args: &[&str]| spry_upgrade(node, &pod, args);

    // Bad input: a clear error and nothing changed.
    let out = spry_upgrade(node, "no-such-pod", &["--image", &node.image])?;
    expect(&out, 2, "no ready pod \"no-such-pod\"")?;
    let out = spry(
        node,
        &[
            "upgrade",
            "--pod",
            &pod,
            "--container",
            "web",
            "--image",
            &node.image,
        ],
    )?;
    expect(&out, 2, "runs no container \"web\" (running: app)")?;
    let missing = node.registry.image("no-such-image:1");
    expect(&upgrade(&["--image", &missing])?, 3, "nothing was changed")?;
    let out = upgrade(&["--image", &node.image, "--dry-run"])?;
    expect(&out, 0, "dry run: nothing changed")?;
    let all = crictl.ps(true)?;
    ensure!(
        all.iter()
            .filter(|c| c["podSandboxId"] == pod.as_str())
            .count()
            == 1
            && crictl.container_state(&a)? == "CONTAINER_RUNNING",
        "bad input changed the pod: {all:?}"
    );

    // A -> B: swapped in place.
    let python = node.registry.image("python:1");
    let image_ref_a = crictl.inspect(&a)?["status"]["imageRef"].clone();
    let out = upgrade(&[
        "--image",
        &python,
        "--ready-log",
        "serving B",
        "--grace",
        "1s",
        "--timeout",
        "180s",
    ])?;
    expect(&out, 0, "upgraded")?;
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    let b = running_app(&crictl, &pod)?;
    if runtime.is_some() {
        // B's layer image was built before the stop, and the shim used that one.
        expect(&out, 0, "(layer image built: ")?;
        let log = node.containerd.log();
        let built_by = |id: &str| {
            log.lines()
                .any(|l| l.contains("layer image built") && l.contains(id))
        };
        // The probe sees the shim's builds: A's, at its start.
        ensure!(built_by(&a), "no shim build of A's layer image in the log");
        ensure!(
            !built_by(&b),
            "the shim built B's layer image again at start"
        );
    }
    ensure!(b != a, "the old container still runs");
    let status = &crictl.inspect(&b)?["status"];
    ensure!(
        status["image"]["image"]
            .as_str()
            .unwrap_or("")
            .contains("python")
            && status["imageRef"] != image_ref_a,
        "the new container does not report the new image: {status}"
    );
    ensure!(crictl.container_state(&a)? == "CONTAINER_EXITED");
    wait_log(&logs.join("app/0.log"), "serving A")?;
    wait_log(&logs.join("app/1.log"), "serving B")?;
    ensure!(vms(node)? == vm, "the pod's VM changed: {vm:?}");
    ensure!(pod_ip(&crictl, &pod)? == ip, "the pod's IP changed");
    let kept = crictl.exec_ok(&b, &["cat", "/dev/shm/pod-file"])?;
    ensure!(kept == "kept", "the pod's /dev/shm lost its file: {kept:?}");

    // B -> an image without a shell: it cannot start; B is back.
    let pause = node.registry.image("pause:1");
    let out = upgrade(&[
        "--image",
        &pause,
        "--ready-log",
        "serving",
        "--grace",
        "1s",
        "--timeout",
        "60s",
    ])?;
    expect(&out, 4, "rolled back")?;
    eprintln!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let again = running_app(&crictl, &pod)?;
    let status = &crictl.inspect(&again)?["status"];
    ensure!(
        status["image"]["image"]
            .as_str()
            .unwrap_or("")
            .contains("python"),
        "the rollback does not run the old image: {status}"
    );
    wait_log(&logs.join("app/3.log"), "serving B")?;
    ensure!(vms(node)? == vm, "the rollback changed the pod's VM");
    if runtime.is_some() {
        // B's layer image outlived B's container (kept unused): the rollback plugs it.
        let log = node.containerd.log();
        ensure!(
            !log.lines()
                .any(|l| l.contains("layer image built") && l.contains(&again)),
            "the rollback packed B's layers again"
        );
    }

    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    Ok(())
}

fn spry(node: &SpryNode, args: &[&str]) -> Result<Output> {
    let bin = spry_integration::spry::bin_dir("debug").join("spry");
    let socket = node.containerd.socket();
    Command::new(&bin)
        .args(args)
        .arg("--config")
        .arg(node.state.path().join("config.toml"))
        .arg("--runtime-endpoint")
        .arg(&socket)
        .output()
        .with_context(|| format!("running {}", bin.display()))
}

fn spry_upgrade(node: &SpryNode, pod: &str, args: &[&str]) -> Result<Output> {
    let mut all = vec!["upgrade", "--pod", pod, "--container", "app"];
    all.extend_from_slice(args);
    spry(node, &all)
}

fn expect(out: &Output, code: i32, says: &str) -> Result<()> {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.code() == Some(code) && text.contains(says),
        "expected exit {code} saying {says:?}, got {:?}:\n{text}",
        out.status.code()
    );
    Ok(())
}

fn running_app(crictl: &Crictl, pod: &str) -> Result<String> {
    let running: Vec<String> = crictl
        .ps(false)?
        .iter()
        .filter(|c| c["podSandboxId"] == pod && c["metadata"]["name"] == "app")
        .filter_map(|c| c["id"].as_str().map(str::to_owned))
        .collect();
    ensure!(running.len() == 1, "running app containers: {running:?}");
    Ok(running[0].clone())
}

fn pod_ip(crictl: &Crictl, pod: &str) -> Result<String> {
    Ok(crictl.inspectp(pod)?["status"]["network"]["ip"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

fn vms(node: &SpryNode) -> Result<Vec<i32>> {
    Ok(node.containerd.qemus()?.iter().map(|p| p.pid).collect())
}

fn wait_log(file: &Path, needle: &str) -> Result<()> {
    let found = system::wait_for(std::time::Duration::from_secs(60), || {
        Ok(std::fs::read_to_string(file)
            .unwrap_or_default()
            .contains(needle)
            .then_some(()))
    })?;
    found.with_context(|| format!("{needle:?} never reached {}", file.display()))
}
