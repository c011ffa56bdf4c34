//! The tree a Spry pod sees through the snapshotter's erofs images of lazy layers, in cold
//! and template pods, and of unpacked layers (built after their commit), against the tree
//! a runc container sees of the same image: busybox, and python with two layers of
//! xattrs, hard links and whiteouts on top.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use spry_integration::{ContainerConfig, PodConfig};

use super::lazy_pull_support::{check_edge_listing, edge_layers, image_with_layers, EDGE_LIST};
use super::{run_listing, spry_lazy_busybox, spry_lazy_layout, Cluster, TREE_SCRIPT};

/// Lazy layers, read on demand only: nothing fetches but the pod's own reads.
const ON_DEMAND: &str = "[lazy]\nbackground_fetch = false\nprefetch = false\nvm_images = true\n";

#[test]
fn a_spry_pod_reads_lazy_layers_through_the_snapshotters_erofs_images() -> Result<()> {
    let (c, spry_state, image) = spry_lazy_busybox("lazy-img", ON_DEMAND)?;
    // The tree a runc container sees through the snapshotter's FUSE layers.
    let want = runc_tree(&c, "lazy-img-runc", &image, TREE_SCRIPT, 100)?;
    build_template(&c)?;
    for handler in ["spry-cold", "spry"] {
        tree_in_a_vm(
            &c,
            handler,
            &image,
            TREE_SCRIPT,
            &want,
            spry_state.path(),
            true,
        )
        .with_context(|| format!("in a {handler} pod"))?;
    }
    Ok(())
}

/// The python image plus the edge layers, read lazily through its layers' erofs images in a
/// cold and in a template Spry VM, is the same tree as its normal pull in a runc pod:
/// contents, modes, owners, sizes, mtimes, symlinks of thousands of files over five layers,
/// and under /edge xattrs, hard-link groups, a file capability, setuid, a fifo, whiteouts of
/// a file and of a directory, an opaque directory.
#[test]
fn spry_pods_read_the_python_estargz_image_with_its_xattrs_links_and_whiteouts() -> Result<()> {
    let layouts = tempfile::tempdir()?;
    let layout = layouts.path().join("python-edge");
    image_with_layers("python", &layout, &edge_layers()?)?;
    let (c, spry_state, image) = spry_lazy_layout("lazy-py", ON_DEMAND, &layout, "python-edge")?;
    let crictl = c.containerd.crictl().with_timeout(Duration::from_secs(300));
    let normal = c.registry.image("python-edge:1");
    crictl.pull(&normal)?;
    let script = format!("{TREE_SCRIPT}; python3 {EDGE_LIST}");
    let want = runc_tree(&c, "lazy-py-runc", &normal, &script, 5000)?;
    check_edge_listing(&want).context("the normal pull in a runc pod")?;

    // The normal pull's layers were unpacked: the snapshotter built their images after
    // each commit, and a VM reads those (the shim packs nothing).
    tree_in_a_vm(
        &c,
        "spry-cold",
        &normal,
        &script,
        &want,
        spry_state.path(),
        false,
    )
    .context("the normal pull's unpacked layers in a cold pod")?;

    let fetched_before = c.proxy.served();
    tree_in_a_vm(
        &c,
        "spry-cold",
        &image,
        &script,
        &want,
        spry_state.path(),
        true,
    )
    .context("in a cold pod")?;
    ensure!(
        c.proxy.served() > fetched_before,
        "the VM's reads fetched nothing: it did not read the lazy layers"
    );
    build_template(&c)?;
    tree_in_a_vm(&c, "spry", &image, &script, &want, spry_state.path(), true)
        .context("in a template pod")
}

/// With background fetch on (the default), a layer's rest arrives without anyone reading
/// it: a Spry pod started afterwards reads its image through the VM's layer disks and the
/// snapshotter fetches nothing more; the layer was verified and switched to native beside
/// the image the VM reads.
#[test]
fn a_spry_pod_reads_what_the_background_fetch_brought_without_fetching() -> Result<()> {
    let (c, spry_state, image) =
        spry_lazy_busybox("lazy-bg", "[lazy]\nprefetch = false\nvm_images = true\n")?;
    let started = std::time::Instant::now();
    while c.snapshotter.native_mounts().is_empty() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        !c.snapshotter.native_mounts().is_empty(),
        "the background fetch did not complete (no native mount); snapshotter log:\n{}",
        c.snapshotter.log()
    );
    let fetched = c.proxy.served();
    let crictl = c.containerd.crictl().with_timeout(Duration::from_secs(180));
    let pod_cfg = PodConfig::new("lazy-bg").write_to(&c.containerd.dir())?;
    let pod = crictl
        .runp(&pod_cfg, Some("spry-cold"))
        .with_context(|| c.containerd.log_tail(40))?;
    let out = run_listing(
        &c,
        &pod,
        &pod_cfg,
        "reader",
        &image,
        "cat /spry/hello.txt; echo busybox $(cat /bin/busybox | wc -c) bytes",
    )?;
    let packed = packed_layer_images(spry_state.path());
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    let busybox_bytes: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("busybox ")?.split(' ').next()?.parse().ok())
        .unwrap_or(0);
    ensure!(
        out.contains("hello from spry busybox image") && busybox_bytes > 100_000,
        "the pod did not read the image: {out}"
    );
    ensure!(
        packed.is_empty(),
        "the shim packed a layer image: {packed:?}"
    );
    ensure!(
        c.proxy.served() == fetched,
        "the pod's reads fetched {} bytes after the background fetch had brought the layer",
        c.proxy.served() - fetched
    );
    Ok(())
}

/// Builds the `spry` handler's template with a first pod, so the next one is a clone.
fn build_template(c: &Cluster) -> Result<()> {
    let crictl = c.containerd.crictl().with_timeout(Duration::from_secs(180));
    let warm_cfg = PodConfig::new("lazy-img-warm").write_to(&c.containerd.dir())?;
    let warm = crictl.runp(&warm_cfg, Some("spry"))?;
    crictl.stopp(&warm)?;
    crictl.rmp(&warm)?;
    Ok(())
}

/// `script`'s listing of `image` in a runc pod named `pod_name`, at least `min_lines`
/// long: the reference a VM's tree is compared with.
fn runc_tree(
    c: &Cluster,
    pod_name: &str,
    image: &str,
    script: &str,
    min_lines: usize,
) -> Result<String> {
    let crictl = c.containerd.crictl().with_timeout(Duration::from_secs(300));
    let pod_cfg = PodConfig::new(pod_name).write_to(&c.containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, None)?;
    let tree = run_listing(c, &pod, &pod_cfg, "ref", image, script)?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    ensure!(
        tree.lines().count() > min_lines,
        "the reference tree is too short:\n{tree}"
    );
    Ok(tree)
}

/// `got` (a VM's `TREE_SCRIPT` listing) has the lines of `want` (a runc container's), no
/// more and no fewer.
fn ensure_vm_tree(got: &str, want: &str) -> Result<()> {
    let want_lines: std::collections::HashSet<&str> = want.lines().collect();
    let got_lines: std::collections::HashSet<&str> = got.lines().collect();
    let missing: Vec<_> = want_lines.difference(&got_lines).take(20).collect();
    let extra: Vec<_> = got_lines.difference(&want_lines).take(20).collect();
    ensure!(
        missing.is_empty() && extra.is_empty(),
        "the VM's tree differs from the runc container's: missing {missing:?}, extra {extra:?}"
    );
    Ok(())
}

/// Runs the listing `script` in a `handler` pod on `image` and compares it with `want`; the
/// VM must read the snapshotter's images (`lazy`: served over FUSE, read with its
/// readahead; else built of unpacked layers), and a template pod must be a clone.
fn tree_in_a_vm(
    c: &Cluster,
    handler: &str,
    image: &str,
    script: &str,
    want: &str,
    spry_state: &Path,
    lazy: bool,
) -> Result<()> {
    let crictl = c.containerd.crictl().with_timeout(Duration::from_secs(180));
    let pod_cfg = PodConfig::new(&format!("lazy-img-{handler}")).write_to(&c.containerd.dir())?;
    let pod = crictl
        .runp(&pod_cfg, Some(handler))
        .with_context(|| c.containerd.log_tail(40))?;
    // This pod's QEMU (other tests may run VMs meanwhile): named after the sandbox.
    let ours = format!("spry-{}", &pod[..12]);
    let (qemu, cmdline) = qemus()?
        .into_iter()
        .find(|(_, l)| l.contains(&ours))
        .context("no QEMU for the pod")?;
    let clone = cmdline.contains("/templates/");
    ensure!(
        clone == (handler == "spry"),
        "{handler} pod: template clone {clone}"
    );
    let cfg = ContainerConfig::new("sleeper", image)
        .command(&["sleep", "600"])
        .write_to(&c.containerd.dir())?;
    let sleeper = crictl.create(&pod, &cfg, &pod_cfg)?;
    crictl
        .start(&sleeper)
        .with_context(|| c.containerd.log_tail(40))?;
    // The VM reads the snapshotter's images: the shim packed nothing.
    let packed = packed_layer_images(spry_state);
    ensure!(
        packed.is_empty(),
        "the shim packed a layer image: {packed:?}"
    );
    let served = open_files(&qemu)?
        .into_iter()
        .filter(|f| f.ends_with("erofs/layer.erofs"))
        .count();
    ensure!(served >= 1, "QEMU holds no image the snapshotter serves");
    // The guest reads each lazy layer's disk with the snapshotter's readahead (32 KiB by
    // default; the kernel's own is 128), the writable disk and built images with its own.
    let out = crictl.exec_sync(
        &sleeper,
        &[
            "sh",
            "-c",
            "for d in /sys/block/sd*; do echo \"$d $(cat $d/queue/read_ahead_kb)\"; done",
        ],
        Duration::from_secs(60),
    )?;
    let lazy_disks = out.stdout.lines().filter(|l| l.ends_with(" 32")).count();
    ensure!(
        out.code == 0 && lazy_disks == if lazy { served } else { 0 },
        "{served} lazy layer disks, {lazy_disks} read 32 KiB ahead: {out:?}\n{}",
        c.containerd.log_tail(60)
    );
    let got = run_listing(c, &pod, &pod_cfg, "tree", image, script)?;
    ensure_vm_tree(&got, want)?;
    crictl.stop(&sleeper, 0)?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    ensure!(
        !qemus()?.iter().any(|(_, l)| l.contains(&ours)),
        "the pod's VM outlived it"
    );
    Ok(())
}

/// The layer images the shim of `spry_state` packed (none when VMs read the snapshotter's).
fn packed_layer_images(spry_state: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(spry_state.join("run/layer-images"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default()
}

/// Every QEMU process: its /proc dir and command line.
fn qemus() -> Result<Vec<(std::path::PathBuf, String)>> {
    let mut found = Vec::new();
    for proc in std::fs::read_dir("/proc")?.flatten() {
        let comm = std::fs::read_to_string(proc.path().join("comm")).unwrap_or_default();
        if comm.starts_with("qemu-system") {
            let cmdline = std::fs::read(proc.path().join("cmdline")).unwrap_or_default();
            found.push((
                proc.path(),
                String::from_utf8_lossy(&cmdline).replace('\0', " "),
            ));
        }
    }
    Ok(found)
}

/// The files the process at `proc_dir` has open.
fn open_files(proc_dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    Ok(std::fs::read_dir(proc_dir.join("fd"))?
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .collect())
}
