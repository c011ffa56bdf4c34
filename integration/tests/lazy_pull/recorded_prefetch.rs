//! Chunk-granular prefetch end to end: a workload's reads recorded by the snapshotter
//! (`lazy.record_accesses`), the image converted with them (`convert --prefetch-ranges`),
//! then a cold start that prefetches only what was read.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use spry_integration::{ContainerConfig, PodConfig};

use super::lazy_pull_support::{
    busybox_with_file, convert_layout, noise, push_layout_dir, recorded_reads,
};
use super::{cluster, ensure_same_tree, run_tree, Cluster};

/// The large file's size.
const BIG: usize = 8 << 20;
/// Busybox runs the workload (its binary is read whole) and reads 8 KiB at 4 MiB of the
/// big file.
const WORKLOAD: &str =
    "cat /spry/hello.txt; dd if=/data/big.bin of=/dev/null bs=4096 skip=1024 count=2 2>/dev/null";

/// The test image (busybox plus `/data/big.bin`) in `registry` as `bigfile:1`.
fn image_with_big_file(c: &Cluster, layout: &Path) -> Result<()> {
    if !layout.exists() {
        busybox_with_file(layout, "data/big.bin", &noise(BIG))?;
    }
    push_layout_dir(&c.registry, layout, "bigfile")
}

/// Runs `script` from the pulled `image` in a fresh pod of `handler` until it exits.
fn run_workload(c: &Cluster, image: &str, handler: Option<&str>, script: &str) -> Result<()> {
    let crictl = c.containerd.crictl().with_timeout(Duration::from_secs(180));
    let pod_cfg = PodConfig::new("rec").write_to(&c.containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, handler)?;
    let cfg = ContainerConfig::new("work", image)
        .command(&["sh", "-c", script])
        .write_to(&c.containerd.dir())?;
    let id = crictl.create(&pod, &cfg, &pod_cfg)?;
    crictl.start(&id)?;
    crictl.wait_container_state(&id, "CONTAINER_EXITED", Duration::from_secs(120))?;
    let logs = crictl.logs(&id)?;
    crictl.rm(&id)?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    ensure!(
        logs.contains("hello from spry busybox image"),
        "unexpected output: {logs}"
    );
    Ok(())
}

#[test]
fn a_recorded_workloads_reads_are_what_a_cold_start_prefetches() -> Result<()> {
    let work = tempfile::tempdir()?;
    let layout = work.path().join("bigfile");

    // 1. Record: nothing prefetched, nothing fetched in the background.
    let rec = cluster(
        "lazy-record",
        "[lazy]\nrecord_accesses = true\nprefetch = false\nbackground_fetch = false\n",
    )?;
    image_with_big_file(&rec, &layout)?;
    convert_layout(&rec.registry, &layout, "bigfile:estargz", &[])?;
    let image = rec.registry.image("bigfile:estargz");
    rec.containerd.crictl().pull(&image)?;
    run_workload(&rec, &image, None, WORKLOAD)?;
    let reads = recorded_reads(&rec.snapshotter)?;
    let big_reads: Vec<&str> = reads
        .lines()
        .filter(|l| l.ends_with(" data/big.bin"))
        .collect();
    ensure!(
        reads.lines().any(|l| l.ends_with(" bin/busybox")) && !big_reads.is_empty(),
        "the reads of bin/busybox and data/big.bin were not recorded:\n{reads}"
    );
    drop(rec);

    // 2. A cold start of the image converted with those reads (into a fresh registry, by a
    //    fresh snapshotter): prefetch on, no background fetch.
    let c = cluster(
        "lazy-marked",
        "[lazy]\nprefetch = true\nbackground_fetch = false\n",
    )?;
    image_with_big_file(&c, &layout)?;
    let list = work.path().join("ranges.txt");
    std::fs::write(&list, &reads)?;
    let converted = convert_layout(
        &c.registry,
        &layout,
        "bigfile:prefetch",
        &["--prefetch-ranges".as_ref(), list.as_os_str()],
    )?;
    let image_size: u64 = converted["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["size"].as_u64())
        .sum();
    let image = c.registry.image("bigfile:prefetch");
    c.containerd.crictl().pull(&image)?;
    // Each mount prefetches its marked chunks in the background; once both are done, the
    // workload needs nothing more from the registry.
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.snapshotter.daemon_logs().matches("prefetched").count() < 2 {
        ensure!(
            Instant::now() < deadline,
            "the mounts did not both prefetch in 30 s; layer daemon logs:\n{}",
            c.snapshotter.daemon_logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let prefetched = c.proxy.served();
    run_workload(&c, &image, None, WORKLOAD)?;
    let on_demand = c.proxy.served() - prefetched;
    eprintln!(
        "recorded {} reads ({} of data/big.bin); pull + prefetch fetched {prefetched} of {image_size} bytes, the workload {on_demand} more",
        reads.lines().count(),
        big_reads.len()
    );
    ensure!(
        on_demand == 0,
        "the workload fetched {on_demand} bytes on demand after the prefetch: the recorded reads were not all prefetched; layer daemon logs:\n{}",
        c.snapshotter.daemon_logs()
    );
    // Of the 8 MiB file only the pages read (with the kernel's readahead) were fetched.
    ensure!(
        prefetched + (BIG as u64 * 3 / 4) < image_size,
        "pull + prefetch fetched {prefetched} of {image_size} bytes: more than the reads recorded"
    );

    // 3. Cut at the recorded edges, the layers' tree is still the normal pull's.
    let crictl = c.containerd.crictl();
    let pod_cfg = PodConfig::new("tree").write_to(&c.containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, None)?;
    let tree = run_tree(&c, &pod, &pod_cfg, "tree-marked", &image)?;
    let normal = c.registry.image("bigfile:1");
    crictl.pull(&normal)?;
    let normal_tree = run_tree(&c, &pod, &pod_cfg, "tree-normal", &normal)?;
    ensure_same_tree("chunked at recorded reads", &tree, &normal_tree)?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    Ok(())
}

/// A Spry pod's reads of the lazy layers' erofs images are recorded as the reads of the
/// files they cover, so a workload can be recorded in the pod kind it runs in.
#[test]
fn a_spry_pods_reads_are_recorded_as_its_files_reads() -> Result<()> {
    let (c, _spry_state, image) = super::spry_lazy_busybox(
        "lazy-rec-vm",
        "[lazy]\nrecord_accesses = true\nprefetch = false\nbackground_fetch = false\nvm_images = true\n",
    )?;
    run_workload(&c, &image, Some("spry-cold"), "cat /spry/hello.txt")?;
    // No runc container ran: every recorded read is the VM's, by file, from offset 0.
    let reads = recorded_reads(&c.snapshotter)?;
    ensure!(
        reads
            .lines()
            .any(|l| l.starts_with("0 ") && l.ends_with(" bin/busybox"))
            && reads
                .lines()
                .any(|l| l.starts_with("0 ") && l.ends_with(" spry/hello.txt")),
        "the VM's reads of bin/busybox and spry/hello.txt were not recorded:\n{reads}"
    );
    Ok(())
}
