//! The Spry shim through stock containerd 2.x and crictl: a pod is a real microVM, its
//! containers run in it. Needs root, scripts/install-deps.sh, scripts/build-guest.sh and
//! scripts/build-test-images.sh; fails (never skips) without them.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use spry_integration::spry::watch_pod_state;
use spry_integration::{
    require_root, ContainerConfig, Containerd, ContainerdOptions, PodConfig, Registry, SpryHandler,
};

/// Starts containerd with the `spry` runtime handler; Spry's state lives in `state`.
fn containerd_with_spry(
    name: &str,
    registry: &Registry,
    state: &std::path::Path,
    kernel: Option<&str>,
) -> Result<Containerd> {
    let spry = SpryHandler::new(state, "debug", kernel.map(std::path::Path::new))?;
    Containerd::start(
        spry.register(ContainerdOptions::new(name).registry(registry))
            .env("SPRY_LOG", "debug"),
    )
}

/// A pod of `handler` with a running `sleep 3600` container: (pod id, container id).
fn running_sleeper(
    containerd: &Containerd,
    crictl: &spry_integration::Crictl,
    image: &str,
    pod_name: &str,
    handler: &str,
) -> Result<(String, String)> {
    let pod_cfg = PodConfig::new(pod_name).write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, Some(handler))?;
    let cfg = ContainerConfig::new("sleeper", image)
        .command(&["sleep", "3600"])
        .write_to(&containerd.dir())?;
    let ctr = crictl.create(&pod, &cfg, &pod_cfg)?;
    crictl.start(&ctr)?;
    crictl.wait_container_state(&ctr, "CONTAINER_RUNNING", Duration::from_secs(60))?;
    Ok((pod, ctr))
}

#[test]
fn spry_pod_lifecycle_through_crictl() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let state = tempfile::Builder::new()
        .prefix("spry-cri-")
        .tempdir_in("/run")?;
    let containerd = containerd_with_spry("spry-cri", &registry, state.path(), None)?;
    let leaks = watch_pod_state(containerd.leak_check()?, state.path())?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(180));
    let image = registry.image("busybox:1");
    crictl.pull(&image)?;

    let pod_cfg = PodConfig::new("spry-pod")
        .hostname("spry-pod")
        .write_to(&containerd.dir())?;
    let pod = crictl
        .runp(&pod_cfg, Some("spry"))
        .with_context(|| containerd.log_tail(40))?;
    let info = crictl.inspectp(&pod)?;
    ensure!(
        info["status"]["state"] == "SANDBOX_READY",
        "pod not ready: {}",
        info["status"]
    );

    // A container that prints and exits: its logs show the guest kernel, not the host's.
    let echo_cfg = ContainerConfig::new("echo", &image)
        .command(&[
            "sh",
            "-c",
            "echo hello from $GREETING; uname -r; hostname; echo oops >&2; exit 4",
        ])
        .env("GREETING", "spry")
        .write_to(&containerd.dir())?;
    let echo = crictl
        .create(&pod, &echo_cfg, &pod_cfg)
        .with_context(|| containerd.log_tail(40))?;
    crictl.start(&echo)?;
    let exited = crictl.wait_container_state(&echo, "CONTAINER_EXITED", Duration::from_secs(60))?;
    ensure!(
        exited["status"]["exitCode"] == 4,
        "exit code: {}",
        exited["status"]
    );
    let logs = crictl.logs(&echo)?;
    let host_release = nix::sys::utsname::uname()?
        .release()
        .to_string_lossy()
        .to_string();
    ensure!(
        logs.contains("hello from spry") && logs.contains("oops"),
        "logs: {logs:?}"
    );
    ensure!(
        logs.contains("6.1.0-56-cloud-amd64") && !logs.contains(&host_release),
        "not the guest kernel: {logs:?}"
    );
    ensure!(
        logs.contains("spry-pod"),
        "hostname not the pod's: {logs:?}"
    );

    // A long-running container: exec, stats, stop with a grace period.
    let sleeper_cfg = ContainerConfig::new("sleeper", &image)
        // Ignores SIGTERM (SIG_IGN survives exec), so stop must escalate to SIGKILL.
        .command(&["sh", "-c", "trap '' TERM; exec sleep 3600"])
        .write_to(&containerd.dir())?;
    let sleeper = crictl.create(&pod, &sleeper_cfg, &pod_cfg)?;
    crictl.start(&sleeper)?;
    crictl.wait_container_state(&sleeper, "CONTAINER_RUNNING", Duration::from_secs(60))?;
    let out = crictl.exec(&sleeper, &["sh", "-c", "echo in-exec; exit 3"])?;
    ensure!(
        out.code == 3 && out.stdout.trim() == "in-exec",
        "exec: {out:?}"
    );
    // CRI's /etc/hostname and /etc/hosts are host files: copied into the guest.
    let out = crictl.exec(&sleeper, &["cat", "/etc/hostname", "/etc/hosts"])?;
    ensure!(
        out.code == 0 && out.stdout.starts_with("spry-pod") && out.stdout.contains("localhost"),
        "CRI's host files in the container: {out:?}"
    );
    let stats = crictl.stats(&sleeper)?;
    ensure!(
        stats["attributes"]["id"] == sleeper.as_str(),
        "stats: {stats}"
    );
    let started = std::time::Instant::now();
    crictl.stop(&sleeper, 2)?;
    ensure!(
        started.elapsed() >= Duration::from_secs(2),
        "stop did not wait for the grace period"
    );
    let stopped = crictl.inspect(&sleeper)?;
    ensure!(
        stopped["status"]["exitCode"] == 137,
        "stop: {}",
        stopped["status"]
    );
    crictl.rm(&sleeper)?;
    crictl.rm(&echo)?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    ensure!(crictl.pods()?.is_empty(), "pods left after rmp");
    leaks.assert_clean().context("after removing the pod")?;
    ensure!(
        std::fs::read_dir(state.path().join("run/vms"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "VM state left behind"
    );
    Ok(())
}

#[test]
fn missing_kernel_fails_runp_with_the_file_named() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let state = tempfile::Builder::new()
        .prefix("spry-cri-bad-")
        .tempdir_in("/run")?;
    let containerd = containerd_with_spry(
        "spry-nokernel",
        &registry,
        state.path(),
        Some("/nonexistent/spry/vmlinux"),
    )?;
    runp_fails_naming(
        &containerd,
        state.path(),
        "spry",
        "nokernel",
        "/nonexistent/spry/vmlinux",
    )
}

/// `runp` with `handler` fails, its error names `needle`, and the failure leaves nothing.
fn runp_fails_naming(
    containerd: &Containerd,
    state: &std::path::Path,
    handler: &str,
    pod_name: &str,
    needle: &str,
) -> Result<()> {
    let leaks = watch_pod_state(containerd.leak_check()?, state)?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(120));
    let pod_cfg = PodConfig::new(pod_name).write_to(&containerd.dir())?;
    let Err(err) = crictl.runp(&pod_cfg, Some(handler)) else {
        anyhow::bail!("pod {pod_name} started although it should not");
    };
    eprintln!("runp of {pod_name}: {err:#}");
    ensure!(
        format!("{err:#}").contains(needle),
        "error does not name {needle}: {err:#}"
    );
    leaks.assert_clean().context("after the failed runp")
}

/// QEMU not where the config says: runp fails naming the binary, and nothing is left.
#[test]
fn missing_qemu_fails_runp_with_the_binary_named() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let state = tempfile::Builder::new()
        .prefix("spry-noqemu-")
        .tempdir_in("/run")?;
    let spry = SpryHandler::new(state.path(), "debug", None)?;
    // The harness's config ends in its [vm] table: one more key there.
    let config = std::fs::read_to_string(state.path().join("config.toml"))?;
    let no_qemu = state.path().join("config-noqemu.toml");
    std::fs::write(
        &no_qemu,
        format!("{config}qemu = \"/nonexistent/spry/qemu-system-x86_64\"\n"),
    )?;
    let opts = ContainerdOptions::new("spry-noqemu").registry(&registry);
    let containerd = Containerd::start(spry.register_variant(opts, "spry-noqemu", &no_qemu))?;
    runp_fails_naming(
        &containerd,
        state.path(),
        "spry-noqemu",
        "noqemu",
        "/nonexistent/spry/qemu-system-x86_64",
    )
}

/// Spry's state dir on a full filesystem: whatever step runs out of space (a template
/// cannot be built, so the pod boots cold; the container's layer image, packed at start,
/// does not fit) fails saying so, and removing the pod leaves nothing (no QEMU, no mount,
/// no state).
#[test]
fn a_full_state_filesystem_fails_clearly_and_leaves_nothing() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let state = tempfile::Builder::new()
        .prefix("spry-full-")
        .tempdir_in("/run")?;
    // 64 KiB: room for a VM's sockets and logs, not for a template or a layer image.
    let run = TinyFs::mount(&state.path().join("run"), "size=64k")?;
    let containerd = containerd_with_spry("spry-full", &registry, state.path(), None)?;
    let leaks = watch_pod_state(containerd.leak_check()?, state.path())?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(180));
    let image = registry.image("busybox:1");
    crictl.pull(&image)?;
    let pod_cfg = PodConfig::new("full").write_to(&containerd.dir())?;
    let failure = match crictl.runp(&pod_cfg, Some("spry")) {
        Err(err) => err,
        Ok(pod) => {
            let cfg = ContainerConfig::new("app", &image)
                .command(&["sleep", "3600"])
                .write_to(&containerd.dir())?;
            // containerd creates the task (and Spry packs the layer image) at start.
            let started = crictl
                .create(&pod, &cfg, &pod_cfg)
                .and_then(|ctr| crictl.start(&ctr).map(|()| ctr));
            crictl.stopp(&pod)?;
            crictl.rmp(&pod)?;
            match started {
                Err(err) => err,
                Ok(ctr) => anyhow::bail!("container {ctr} started on a full state filesystem"),
            }
        }
    };
    eprintln!("on a full state filesystem: {failure:#}");
    let said = format!("{failure:#}");
    ensure!(
        said.contains("MiB free") || said.contains("No space left on device"),
        "the error does not say the disk is full: {said}"
    );
    // A layer image that does not fit is the node running out, not a bug: CRI's code says so.
    ensure!(
        !said.contains("MiB free") || said.contains("ResourceExhausted"),
        "a full state dir is not reported as ResourceExhausted: {said}"
    );
    leaks.assert_clean().context("after the failure")?;
    let left: Vec<_> = std::fs::read_dir(&run.path)?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    eprintln!("left in the state dir: {left:?}");
    Ok(())
}

/// A small tmpfs, unmounted when dropped (also when the test fails).
struct TinyFs {
    path: std::path::PathBuf,
}

impl TinyFs {
    fn mount(path: &std::path::Path, options: &str) -> Result<Self> {
        std::fs::create_dir_all(path)?;
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(options),
        )?;
        Ok(TinyFs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Two pods with two containers each, a container restarted within its pod (kubelet's
/// attempt+1 in the same sandbox), and a containerd restart while the pods run; the
/// image's packed layers outlive both pods and serve a third without packing again.
#[test]
fn two_pods_restart_in_pod_and_containerd_restart() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let state = tempfile::Builder::new()
        .prefix("spry-cri2-")
        .tempdir_in("/run")?;
    let mut containerd = containerd_with_spry("spry-cri2", &registry, state.path(), None)?;
    let leaks = watch_pod_state(containerd.leak_check()?, state.path())?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(180));
    let image = registry.image("busybox:1");
    crictl.pull(&image)?;

    let mut pods = Vec::new();
    for p in 0..2 {
        let name = format!("pod{p}");
        let pod_cfg = PodConfig::new(&name)
            .hostname(&name)
            .write_to(&containerd.dir())?;
        let pod = crictl.runp(&pod_cfg, Some("spry"))?;
        let mut containers = Vec::new();
        for c in 0..2 {
            let cfg = ContainerConfig::new(&format!("c{c}"), &image)
                .command(&["sh", "-c", &format!("echo {name}-c{c}; exec sleep 3600")])
                .write_to(&containerd.dir().join(&name))?;
            let id = crictl.create(&pod, &cfg, &pod_cfg)?;
            crictl.start(&id)?;
            containers.push(id);
        }
        pods.push((pod, pod_cfg, containers));
    }
    for (p, (_, _, containers)) in pods.iter().enumerate() {
        for (c, id) in containers.iter().enumerate() {
            crictl.wait_container_state(id, "CONTAINER_RUNNING", Duration::from_secs(60))?;
            let out = crictl.exec(id, &["hostname"])?;
            ensure!(
                out.stdout.trim() == format!("pod{p}"),
                "container {c} of pod {p}: {out:?}"
            );
            ensure!(
                crictl.logs(id)?.contains(&format!("pod{p}-c{c}")),
                "logs of pod{p}-c{c}"
            );
        }
    }
    // Two pods are two VMs.
    let qemus = containerd.qemus()?.len();
    ensure!(qemus == 2, "expected 2 VMs, found {qemus}");
    // All four containers run on one erofs image of busybox's layers, built once.
    let layer_images = std::fs::read_dir(state.path().join("run/layer-images"))
        .context("the shared layer image dir")?
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "erofs"))
        .count();
    ensure!(
        layer_images == 1,
        "expected 1 shared layer image, found {layer_images}"
    );
    let built = containerd.log().matches("layer image built").count();
    ensure!(built == 1, "layer image built {built} times for one image");

    // containerd restarts; the pods stay listed and controllable.
    containerd.restart()?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(180));
    ensure!(
        crictl.pods()?.len() == 2,
        "pods lost across the containerd restart"
    );
    let (pod, pod_cfg, containers) = &pods[0];
    let out = crictl.exec(&containers[0], &["echo", "still-here"])?;
    ensure!(
        out.stdout.trim() == "still-here",
        "exec after restart: {out:?}"
    );
    // Events still reach the restarted containerd: an OOM kill is known to CRI only
    // through the shim's /tasks/oom event (its exit alone reads as an error exit).
    let hog = ContainerConfig::new("hog", &image)
        .command(&["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"])
        .patch(serde_json::json!({"linux": {"resources": {"memory_limit_in_bytes": 33554432}}}))
        .write_to(&containerd.dir().join("pod0-hog"))?;
    let hog = crictl.create(pod, &hog, pod_cfg)?;
    crictl.start(&hog)?;
    crictl.wait_container_state(&hog, "CONTAINER_EXITED", Duration::from_secs(60))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let reason = loop {
        let reason = crictl.inspect(&hog)?["status"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if reason == "OOMKilled" || std::time::Instant::now() > deadline {
            break reason;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(
        reason == "OOMKilled",
        "an OOM kill after the containerd restart reads as {reason:?}"
    );
    crictl.rm(&hog)?;

    // Restart a container within its pod: stop, remove, create attempt 1, start.
    crictl.stop(&containers[1], 2)?;
    crictl.rm(&containers[1])?;
    let cfg = ContainerConfig::new("c1", &image)
        .command(&["sh", "-c", "echo restarted; exec sleep 3600"])
        .patch(serde_json::json!({"metadata": {"name": "c1", "attempt": 1}}))
        .write_to(&containerd.dir().join("pod0-retry"))?;
    let again = crictl.create(pod, &cfg, pod_cfg)?;
    crictl.start(&again)?;
    crictl.wait_container_state(&again, "CONTAINER_RUNNING", Duration::from_secs(60))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut logs = crictl.logs(&again)?;
    while !logs.contains("restarted") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        logs = crictl.logs(&again)?;
    }
    ensure!(
        logs.contains("restarted"),
        "restarted container's logs: {logs:?}"
    );

    for (pod, _, _) in &pods {
        crictl.stopp(pod)?;
        crictl.rmp(pod)?;
    }
    leaks.assert_clean().context("after removing both pods")?;
    // The layer image outlives its last container, unheld, for the next one of its image.
    let layer_images = state.path().join("run/layer-images");
    let kept: Vec<_> = std::fs::read_dir(&layer_images)
        .context("the kept layer image's dir")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "erofs"))
        .collect();
    ensure!(kept.len() == 1, "kept layer images: {kept:?}");
    ensure!(
        std::fs::File::open(&kept[0])?.try_lock().is_ok(),
        "no container runs, yet {} is held",
        kept[0].display()
    );
    let pod_cfg = PodConfig::new("pod2").write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, Some("spry"))?;
    let cfg = ContainerConfig::new("c0", &image)
        .command(&["sh", "-c", "echo from-kept; exec sleep 3600"])
        .write_to(&containerd.dir().join("pod2"))?;
    let id = crictl.create(&pod, &cfg, &pod_cfg)?;
    crictl.start(&id)?;
    crictl.wait_container_state(&id, "CONTAINER_RUNNING", Duration::from_secs(60))?;
    let built = containerd.log().matches("layer image built").count();
    ensure!(
        built == 1,
        "a new pod of the same image packed it again ({built} builds)"
    );
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    leaks
        .assert_clean()
        .context("after the pod on the kept image")?;
    Ok(())
}

/// An entrypoint that does not exist and a config with an unknown key both fail with an
/// error that says why, and leave nothing behind.
#[test]
fn bad_entrypoint_and_bad_config_are_named() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let state = tempfile::Builder::new()
        .prefix("spry-cri-bad2-")
        .tempdir_in("/run")?;
    let spry = SpryHandler::new(state.path(), "debug", None)?;
    let containerd =
        Containerd::start(spry.register(ContainerdOptions::new("spry-bad2").registry(&registry)))?;
    let leaks = watch_pod_state(containerd.leak_check()?, state.path())?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(180));
    let image = registry.image("busybox:1");
    crictl.pull(&image)?;

    let pod_cfg = PodConfig::new("badentry").write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, Some("spry"))?;
    let cfg = ContainerConfig::new("nope", &image)
        .command(&["/no/such/entrypoint"])
        .write_to(&containerd.dir())?;
    let failed = match crictl.create(&pod, &cfg, &pod_cfg) {
        Err(e) => Err(e),
        Ok(id) => crictl.start(&id),
    };
    let err = format!("{:#}", failed.expect_err("a missing entrypoint started"));
    ensure!(
        err.contains("/no/such/entrypoint"),
        "error does not name the entrypoint: {err}"
    );
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;

    // An unknown key in Spry's config: RunPodSandbox fails naming it.
    let mut text = std::fs::read_to_string(&spry.config)?;
    text.push_str("memory_mb = 512\n");
    std::fs::write(&spry.config, text)?;
    let pod_cfg = PodConfig::new("badconfig").write_to(&containerd.dir())?;
    let err = crictl
        .runp(&pod_cfg, Some("spry"))
        .expect_err("a bad config was accepted");
    ensure!(
        format!("{err:#}").contains("memory_mb"),
        "error does not name the key: {err:#}"
    );
    leaks.assert_clean().context("after the failures")?;
    Ok(())
}

#[test]
fn exec_it_and_attach_through_crictl() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let state = tempfile::Builder::new()
        .prefix("spry-cri-tty-")
        .tempdir_in("/run")?;
    let containerd = containerd_with_spry("spry-cri-tty", &registry, state.path(), None)?;
    let leaks = watch_pod_state(containerd.leak_check()?, state.path())?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(180));
    let image = registry.image("busybox:1");
    crictl.pull(&image)?;
    let pod_cfg = PodConfig::new("tty-pod").write_to(&containerd.dir())?;
    let pod = crictl
        .runp(&pod_cfg, Some("spry"))
        .with_context(|| containerd.log_tail(40))?;

    // A container that reads one line from its stdin (attach -i feeds it).
    let reader_cfg = ContainerConfig::new("reader", &image)
        .command(&["sh", "-c", "read line; echo got:$line; exec sleep 3600"])
        .stdin(true)
        .write_to(&containerd.dir())?;
    let reader = crictl.create(&pod, &reader_cfg, &pod_cfg)?;
    crictl.start(&reader)?;
    crictl.wait_container_state(&reader, "CONTAINER_RUNNING", Duration::from_secs(60))?;
    let attach = crictl.output_with_stdin(&["attach", "-i", reader.as_str()], b"hello-attach\n")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let logs = crictl.logs(&reader)?;
        if logs.contains("got:hello-attach") {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "attach did not deliver stdin: logs {logs:?}, attach {:?}",
            String::from_utf8_lossy(&attach.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // (crictl attach returns when its stdin closes, often before the echo comes back, as
    // with runc; the log above is the proof that the line went through.)

    // exec -it: the process gets a terminal, and its output comes back on ours.
    let out = crictl.output_in_terminal(
        &[
            "exec",
            "-it",
            reader.as_str(),
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo tty-yes; echo $((6*7))",
        ],
        b"",
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("tty-yes") && text.contains("42"),
        "exec -it: {out:?}"
    );

    crictl.stop(&reader, 1)?;
    crictl.rm(&reader)?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    leaks.assert_clean()?;
    Ok(())
}

/// A shim killed with its pod running (a handler with its own state dir and log level,
/// through `ConfigPath`): QEMU dies with it, containerd's `shim delete` cleans the pod's
/// state and the shared layer image it was the last user of (this handler keeps no unused
/// layer images), and the pod can be removed.
#[test]
fn a_killed_shim_is_cleaned_up_in_its_own_state_dir() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let state = tempfile::Builder::new()
        .prefix("spry-kill-")
        .tempdir_in("/run")?;
    let spry = SpryHandler::new(state.path(), "debug", None)?;
    // Not the default config's state dir: only the handler's config names it.
    let own_run = state.path().join("own-run");
    let default_config = std::fs::read_to_string(state.path().join("config.toml"))?;
    let own_config = state.path().join("config-own.toml");
    std::fs::write(
        &own_config,
        format!(
            "log_level = \"spry_shim=debug,info\"\n{}",
            default_config.replace(
                &format!("\"{}\"", state.path().join("run").display()),
                &format!("\"{}\"", own_run.display()),
            )
        ) + "[rootfs]\nkeep_unused_mib = 0\n",
    )?;
    // No SPRY_LOG: the shim's log level comes from the handler's config.
    let opts = ContainerdOptions::new("spry-kill").registry(&registry);
    let opts = spry.register_variant(opts, "spry-own", &own_config);
    let containerd = Containerd::start(spry.register(opts))?;
    let leaks = watch_pod_state(containerd.leak_check()?, state.path())?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(180));
    let image = registry.image("busybox:1");
    crictl.pull(&image)?;

    let (pod, ctr) = running_sleeper(&containerd, &crictl, &image, "victim", "spry-own")?;
    let entries =
        |dir: &std::path::Path| -> usize { std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0) };
    ensure!(entries(&own_run.join("vms")) == 1, "the pod's VM dir");
    ensure!(
        containerd.log().contains("rootfs disk attached"),
        "no debug line from the shim although the handler's config asks for them"
    );
    ensure!(
        entries(&own_run.join("layer-images")) >= 1,
        "the container's layer image"
    );
    ensure!(
        !state.path().join("run/vms").exists() || entries(&state.path().join("run/vms")) == 0,
        "the default state dir is not this handler's"
    );

    containerd.kill_shim_of(&pod)?;
    // containerd sees the shim go, runs `shim delete` and reports the tasks gone.
    crictl.wait_container_state(&ctr, "CONTAINER_EXITED", Duration::from_secs(60))?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    leaks
        .assert_clean()
        .context("after the killed shim's pod")?;
    ensure!(
        entries(&own_run.join("vms")) == 0,
        "VM state left in {}",
        own_run.join("vms").display()
    );
    ensure!(
        !own_run.join("layer-images").exists(),
        "the layer image its dead shim held outlived it"
    );
    Ok(())
}

/// QEMU killed while an exec runs: the container and the exec end together, containerd may
/// delete the container first, and the shim must still be there for the exec's Delete
/// (issue 17: containerd logged `Failed to delete exec process ... ttrpc: closed`).
#[test]
fn qemu_killed_during_an_exec_leaves_containerd_nothing_to_clean_up_after() -> Result<()> {
    require_root()?;
    let registry = Registry::start()?;
    let state = tempfile::Builder::new()
        .prefix("spry-execdeath-")
        .tempdir_in("/run")?;
    let containerd = containerd_with_spry("spry-execdeath", &registry, state.path(), None)?;
    // The emptied shim goes at once: an exec containerd failed to delete kept it 10 s.
    let leaks =
        watch_pod_state(containerd.leak_check()?, state.path())?.settle(Duration::from_secs(5));
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(180));
    let image = registry.image("busybox:1");
    crictl.pull(&image)?;
    let (pod, ctr) = running_sleeper(&containerd, &crictl, &image, "execdeath", "spry")?;

    let mut exec = crictl
        .command(&[
            "exec",
            ctr.as_str(),
            "sh",
            "-c",
            "echo started; exec sleep 600",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(exec.stdout.take().context("exec stdout")?),
        &mut line,
    )?;
    ensure!(line.trim() == "started", "the exec did not start: {line:?}");
    let qemu = containerd
        .qemus()?
        .into_iter()
        .next()
        .context("the pod's QEMU")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu.pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let status = exec.wait()?;
    ensure!(!status.success(), "the exec outlived its VM: {status}");
    crictl.wait_container_state(&ctr, "CONTAINER_EXITED", Duration::from_secs(60))?;
    crictl.rm(&ctr)?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    leaks
        .assert_clean()
        .context("after the pod whose QEMU died")?;
    // containerd's exec Delete reached a shim that had already gone, or was cut off by
    // the container's Delete answered first.
    ensure!(
        !containerd.log().contains("Failed to delete exec process"),
        "containerd could not delete the exec:\n{}",
        containerd.log_tail(40)
    );
    Ok(())
}
