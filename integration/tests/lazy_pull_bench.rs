//! The lazy-pulling benchmark (stargz hello-bench style), run by
//! `scripts/bench-lazypull.sh`; `#[ignore]`d in normal test runs.
//!
//! For each image, link (100 Mbit/s through a netns + veth + tc, or
//! unlimited), mode (overlayfs full pull, lazy, lazy with recorded
//! prefetch) and runtime (runc; Spry, whose VM reads a lazy layer through the
//! snapshotter's erofs image of it, `vm_images`), it times pull, create and
//! run-until-ready from a cold start: a fresh containerd (empty content store)
//! and a fresh snapshotter (empty chunk cache) every run; the pod (and for
//! Spry its VM) is up before the clock starts. Writes
//! target/bench/lazypull.{json,md}.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use spry_integration::containerd_config::proxy_snapshotter_toml;
use spry_integration::slow_link::SlowLink;
use spry_integration::{
    paths, require_root, ContainerConfig, Containerd, ContainerdOptions, PodConfig, Registry,
};

mod lazy_pull_support;
use lazy_pull_support::{
    convert, convert_as, push_layout, recorded_reads, snapshotter_bin, CountingProxy, Snapshotter,
};

struct Workload {
    image: &'static str,
    argv: &'static [&'static str],
    ready: &'static str,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        image: "python",
        argv: &[
            "python3",
            "-c",
            "import json, numpy; print('ready', numpy.__version__)",
        ],
        ready: "ready",
    },
    Workload {
        image: "busybox",
        argv: &["sh", "-c", "cat /spry/hello.txt && echo ready"],
        ready: "ready",
    },
];

struct Run {
    pull_s: f64,
    create_s: f64,
    run_s: f64,
    bytes_before_ready: u64,
}

/// One cold run: fresh containerd and snapshotter, pull, create, start, wait for the ready line.
fn cold_run(
    registry: &Registry,
    link: &SlowLink,
    w: &Workload,
    (runtime, mode): (&str, &str),
    image_bytes: u64,
) -> Result<Run> {
    let image = match mode {
        "overlayfs" => format!("{}/{}:1", link.addr(), w.image),
        "lazy" => format!("{}/{}:estargz", link.addr(), w.image),
        _ => format!("{}/{}:prefetch", link.addr(), w.image),
    };
    let proxy = CountingProxy::start(link.addr())?;
    let lazy_cfg = format!(
        // Background fetching is off so that "bytes before ready" is what the
        // workload needed (and timings are on-demand fetching alone).
        "[lazy]\nprefetch = {}\nbackground_fetch = false\nvm_images = {}\n[registry.hosts.{:?}]\ninsecure = true\nendpoint = {:?}\n",
        mode == "lazy-prefetch",
        runtime != "runc",
        link.addr(),
        proxy.addr
    );
    let snapshotter = if mode == "overlayfs" {
        None
    } else {
        Some(Snapshotter::start(&lazy_cfg)?)
    };
    let mut opts = ContainerdOptions::new(&format!("bench-{mode}")).registry(registry);
    if let Some(s) = &snapshotter {
        opts = opts
            .snapshotter("spry")
            .extra_toml(&proxy_snapshotter_toml("spry", &s.socket()));
    }
    let spry_state = tempfile::Builder::new()
        .prefix("spry-bench-lazy-")
        .tempdir_in("/run")?;
    // `spry`: a cold-booted VM; `spry_template`: a clone of the template a first pod built.
    let handler = match runtime {
        "runc" => None,
        "spry" => Some("spry-cold"),
        _ => Some("spry"),
    };
    if handler.is_some() {
        opts = with_spry(opts, spry_state.path())?;
    }
    let containerd = Containerd::start(opts)?;
    link.trust_from(&containerd.certs_dir())?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(600));
    if runtime == "spry_template" {
        let warm_cfg = PodConfig::new("template").write_to(&containerd.dir())?;
        let warm = crictl.runp(&warm_cfg, handler)?;
        crictl.stopp(&warm)?;
        crictl.rmp(&warm)?;
    }
    let pod_cfg = PodConfig::new("bench").write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, handler)?;
    let log_file = containerd.dir().join("logs/bench/app.log");

    let t0 = Instant::now();
    crictl.pull(&image)?;
    let t1 = Instant::now();
    let cfg = ContainerConfig::new("app", &image)
        .command(w.argv)
        .log_path("app.log")
        .write_to(&containerd.dir())?;
    let id = crictl.create(&pod, &cfg, &pod_cfg)?;
    let t2 = Instant::now();
    crictl.start(&id)?;
    loop {
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        if log.lines().any(|l| l.contains(w.ready)) {
            break;
        }
        if t2.elapsed() > Duration::from_secs(300) {
            bail!("no ready line after 300 s; log: {log}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let t3 = Instant::now();
    let bytes = if mode == "overlayfs" {
        image_bytes
    } else {
        proxy.served()
    };
    let _ = crictl.stopp(&pod);
    let _ = crictl.rmp(&pod);
    drop(containerd);
    drop(snapshotter);
    Ok(Run {
        pull_s: (t1 - t0).as_secs_f64(),
        create_s: (t2 - t1).as_secs_f64(),
        run_s: (t3 - t2).as_secs_f64(),
        bytes_before_ready: bytes,
    })
}

/// `opts` with Spry's release shim as `spry` (templates on) and `spry-cold` (a VM booted
/// for each pod), its state under `state`.
fn with_spry(opts: ContainerdOptions, state: &Path) -> Result<ContainerdOptions> {
    let spry = spry_integration::SpryHandler::new(state, "release", None)?;
    let cold = spry.variant("cold", "template = \"off\"")?;
    Ok(spry.register_variant(spry.register(opts), "spry-cold", &cold))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Records the reads the workload makes (lazy run with access recording) in a `runtime`
/// pod (`runc`, or `spry`: a cold Spry VM reading the layers' erofs images) and converts the
/// image again with those bytes marked for prefetch, as `<image>:prefetch`. Returns how many
/// files were read.
fn record_and_convert(
    registry: &Registry,
    w: &Workload,
    runtime: &str,
    out_dir: &Path,
) -> Result<usize> {
    let proxy = CountingProxy::start(registry.addr())?;
    let cfg = format!(
        "[lazy]\nrecord_accesses = true\nprefetch = false\nbackground_fetch = false\nvm_images = {}\n[registry.hosts.{:?}]\ninsecure = true\nendpoint = {:?}\n",
        runtime == "spry",
        registry.host(),
        proxy.addr
    );
    let snapshotter = Snapshotter::start(&cfg)?;
    let mut opts = ContainerdOptions::new("bench-record")
        .registry(registry)
        .snapshotter("spry")
        .extra_toml(&proxy_snapshotter_toml("spry", &snapshotter.socket()));
    let spry_state = tempfile::Builder::new()
        .prefix("spry-bench-record-")
        .tempdir_in("/run")?;
    let handler = match runtime {
        "runc" => None,
        "spry" => {
            opts = with_spry(opts, spry_state.path())?;
            Some("spry-cold")
        }
        other => bail!("cannot record in {other:?}: runc or spry"),
    };
    let containerd = Containerd::start(opts)?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(600));
    let image = registry.image(&format!("{}:estargz", w.image));
    crictl.pull(&image)?;
    let pod_cfg = PodConfig::new("record").write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, handler)?;
    let cfg = ContainerConfig::new("rec", &image)
        .command(w.argv)
        .write_to(&containerd.dir())?;
    let id = crictl.create(&pod, &cfg, &pod_cfg)?;
    crictl.start(&id)?;
    crictl.wait_container_state(&id, "CONTAINER_EXITED", Duration::from_secs(300))?;
    // The reads each layer served (readahead included): only those bytes are prefetched.
    let reads = recorded_reads(&snapshotter)?;
    let mut files: Vec<&str> = reads
        .lines()
        .filter_map(|l| l.splitn(3, ' ').nth(2))
        .collect();
    files.sort_unstable();
    files.dedup();
    let files = files.len();
    let _ = crictl.stopp(&pod);
    let _ = crictl.rmp(&pod);
    drop(containerd);
    drop(snapshotter);
    ensure!(files > 0, "recording saw no reads");
    // Kept with the report: what the prefetch of `<image>:prefetch` was made from.
    let list = out_dir.join(format!("lazypull-{}-reads.txt", w.image));
    std::fs::write(&list, reads)?;
    convert_as(
        registry,
        w.image,
        "prefetch",
        &["--prefetch-ranges".as_ref(), list.as_os_str()],
    )?;
    Ok(files)
}

/// Sequential read throughput of every file under `dir` in a container of `image`.
/// How the read benchmark's image is served.
#[derive(Clone, Copy, PartialEq)]
enum ReadMode {
    Overlayfs,
    /// Lazy layers, fully cached (and verified by `warm --all`): mounted natively as erofs
    /// images (the default).
    Lazy,
    /// Lazy layers, fully cached, over FUSE with passthrough (`lazy.native_mounts = false`):
    /// what a layer still being fetched reads through.
    LazyPassthrough,
    /// Lazy layers, fully cached, every read through the daemon (`lazy.passthrough = false`).
    LazyDaemon,
    /// In a Spry pod: the normal image, its layers packed into an erofs disk by the shim.
    VmErofsDisk,
    /// In a Spry pod: lazy layers, fully cached, read through the snapshotter's erofs
    /// images (`lazy.vm_images`).
    VmLazy,
}

/// One sequential read of `dir`.
struct ReadSample {
    mib_s: f64,
    /// Passthrough opens the layer daemons counted (0 for overlayfs and native mounts).
    passthrough_opens: u64,
    /// Layers mounted natively while the reader ran.
    native_mounts: usize,
}

fn read_throughput(registry: &Registry, mode: ReadMode, dir: &str) -> Result<ReadSample> {
    let proxy = CountingProxy::start(registry.addr())?;
    let mut cfg = format!(
        "[registry.hosts.{:?}]\ninsecure = true\nendpoint = {:?}\n",
        registry.host(),
        proxy.addr
    );
    match mode {
        ReadMode::LazyPassthrough => cfg.push_str("[lazy]\nnative_mounts = false\n"),
        ReadMode::LazyDaemon => {
            cfg.push_str("[lazy]\nnative_mounts = false\npassthrough = false\n")
        }
        ReadMode::VmLazy => cfg.push_str("[lazy]\nvm_images = true\n"),
        _ => {}
    }
    let (mut snapshotter, image) = match mode {
        ReadMode::Overlayfs | ReadMode::VmErofsDisk => (None, "python:1"),
        _ => (Some(Snapshotter::start(&cfg)?), "python:estargz"),
    };
    let mut opts = ContainerdOptions::new("bench-read").registry(registry);
    // Spry pods boot cold (no template to build): the read is what is measured.
    let spry_state = tempfile::Builder::new()
        .prefix("spry-bench-read-")
        .tempdir_in("/run")?;
    let handler = matches!(mode, ReadMode::VmErofsDisk | ReadMode::VmLazy).then_some("spry-cold");
    if handler.is_some() {
        let spry = spry_integration::SpryHandler::new(spry_state.path(), "release", None)?;
        let cold = spry.variant("cold", "template = \"off\"")?;
        opts = spry.register_variant(opts, "spry-cold", &cold);
    }
    if let Some(s) = &snapshotter {
        // Fill the cache completely first: the measurement is of the FS, not the network.
        let out = Command::new(snapshotter_bin()?)
            .arg("--config")
            .arg(s.config())
            .args(["warm", "--all", &registry.image(image)])
            .output()?;
        ensure!(
            out.status.success(),
            "warm: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        opts = opts
            .snapshotter("spry")
            .extra_toml(&proxy_snapshotter_toml("spry", &s.socket()));
    }
    let containerd = Containerd::start(opts)?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(600));
    let image = registry.image(image);
    crictl.pull(&image)?;
    let pod_cfg = PodConfig::new("read").write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, handler)?;
    let script = format!(
        "import os, time\nt=time.time(); n=0\nfor r, ds, fs in os.walk('{dir}'):\n  for f in fs:\n    p=os.path.join(r, f)\n    if os.path.islink(p) or not os.path.isfile(p): continue\n    with open(p, 'rb') as h:\n      while True:\n        b=h.read(1<<20)\n        if not b: break\n        n+=len(b)\nprint('MIBS', n/(1<<20)/(time.time()-t), n)\n"
    );
    let cfg = ContainerConfig::new("reader", &image)
        .command(&["sleep", "600"])
        .write_to(&containerd.dir())?;
    let id = crictl.create(&pod, &cfg, &pod_cfg)?;
    crictl.start(&id)?;
    // Written back first: drop_caches keeps dirty pages, and a freshly unpacked layer
    // (overlayfs) would otherwise be read from memory.
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3")?;
    let native_mounts = snapshotter.as_ref().map_or(0, |s| s.native_mounts().len());
    let out = crictl.exec_sync(&id, &["python3", "-c", &script], Duration::from_secs(600))?;
    let _ = crictl.stopp(&pod);
    let _ = crictl.rmp(&pod);
    drop(containerd);
    // Each layer daemon logs `passthrough_opens=N` when it unmounts.
    let logs = snapshotter
        .as_mut()
        .map(|s| s.shut_down())
        .unwrap_or_default();
    drop(snapshotter);
    for line in logs.lines().filter(|l| l.contains("passthrough")).take(20) {
        eprintln!("  layer daemon: {line}");
    }
    let passthrough_opens = logs
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("passthrough_opens="))
        .filter_map(|n| n.parse::<u64>().ok())
        .sum();
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("MIBS"))
        .with_context(|| format!("reader printed: {out:?}"))?;
    let mibs = line
        .split_whitespace()
        .nth(1)
        .context("no MiB/s")?
        .parse()?;
    Ok(ReadSample {
        mib_s: mibs,
        passthrough_opens,
        native_mounts,
    })
}

/// Medians of `runs` reads per mode, the modes taking turns (drift hits all alike), and
/// whether the layer daemons really passed files through (on) and did not (off).
fn read_report(registry: &Registry, runs: usize) -> Result<Value> {
    let mut modes = vec![
        ("overlayfs", ReadMode::Overlayfs),
        ("lazy", ReadMode::Lazy),
        ("lazy_passthrough", ReadMode::LazyPassthrough),
        ("lazy_daemon", ReadMode::LazyDaemon),
    ];
    let guest = std::env::var("SPRY_BENCH_RUNTIMES").map_or(true, |r| r != "runc");
    if guest {
        modes.push(("vm_erofs_disk", ReadMode::VmErofsDisk));
        modes.push(("vm_lazy", ReadMode::VmLazy));
    }
    let mut samples: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut opens: BTreeMap<&str, u64> = BTreeMap::new();
    let mut native: BTreeMap<&str, usize> = BTreeMap::new();
    for i in 0..runs {
        for &(name, mode) in &modes {
            let r = read_throughput(registry, mode, "/usr/lib")?;
            eprintln!(
                "read /usr/lib {name} #{i}: {:.0} MiB/s, {} passthrough opens, {} native layer mounts",
                r.mib_s, r.passthrough_opens, r.native_mounts
            );
            samples.entry(name).or_default().push(r.mib_s);
            *opens.entry(name).or_default() += r.passthrough_opens;
            *native.entry(name).or_default() += r.native_mounts;
        }
    }
    let med = |name: &str| samples.get(name).map_or(f64::NAN, |s| median(s.clone()));
    Ok(json!({
        // Inside a Spry pod's VM: a fully fetched lazy layer through the snapshotter's
        // image against the shim's packed erofs disk.
        "guest_read_mib_s": {
            "erofs_disk": med("vm_erofs_disk"),
            "lazy_fetched": med("vm_lazy"),
        },
        "read_throughput_mib_s": {
            "overlayfs": med("overlayfs"),
            "lazy": med("lazy"),
            "lazy_passthrough": med("lazy_passthrough"),
            "lazy_daemon": med("lazy_daemon"),
        },
        "read_samples_mib_s": samples,
        "read_lazy_vs_overlayfs": med("lazy") / med("overlayfs"),
        "read_lazy_passthrough_vs_overlayfs": med("lazy_passthrough") / med("overlayfs"),
        "checks": {
            // Every run of `lazy` read natively mounted layers, and no run of the FUSE modes.
            "native_mounts_used": native["lazy"] >= runs,
            "fuse_modes_not_native": native["lazy_passthrough"] + native["lazy_daemon"] == 0,
            "passthrough_used": opens["lazy_passthrough"] > 0,
            "daemon_path_without_passthrough": opens["lazy_daemon"] == 0,
        },
    }))
}

#[test]
#[ignore = "benchmark: run scripts/bench-lazypull.sh"]
fn lazy_pull_benchmark() -> Result<()> {
    require_root()?;
    let runs: usize = std::env::var("SPRY_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let out_dir = PathBuf::from(std::env::var("SPRY_BENCH_OUT").unwrap_or_else(|_| {
        paths::repo_root()
            .join("target/bench")
            .display()
            .to_string()
    }));
    std::fs::create_dir_all(&out_dir)?;
    let storage = tempfile::Builder::new()
        .prefix("spry-bench-reg-")
        .tempdir_in("/var/tmp")?;
    let registry = Registry::start_with_storage(storage.path())?;
    push_layout(&registry, "pause")?;
    if std::env::var("SPRY_BENCH_READ_ONLY").is_ok_and(|v| v == "1") {
        // Only the read-throughput part (quick; for measuring the FS path alone).
        push_layout(&registry, "python")?;
        convert(&registry, "python", &[])?;
        let report = read_report(&registry, runs)?;
        std::fs::write(
            out_dir.join("lazypull-read.json"),
            serde_json::to_string_pretty(&report)?,
        )?;
        std::fs::write(out_dir.join("lazypull-read.md"), read_markdown(&report))?;
        eprintln!("{}", read_markdown(&report));
        return Ok(());
    }
    let mut image_bytes = BTreeMap::new();
    let mut recorded = BTreeMap::new();
    let selected: Vec<&Workload> = match std::env::var("SPRY_BENCH_IMAGES") {
        Ok(list) => WORKLOADS
            .iter()
            .filter(|w| list.split(',').any(|i| i == w.image))
            .collect(),
        Err(_) => WORKLOADS.iter().collect(),
    };
    let links: Vec<(&str, Option<&str>)> = match std::env::var("SPRY_BENCH_LINKS").as_deref() {
        Ok("unlimited") => vec![("unlimited", None)],
        Ok("100mbit") => vec![("100mbit", Some("100mbit"))],
        _ => vec![("100mbit", Some("100mbit")), ("unlimited", None)],
    };
    // Where the workload's reads are recorded for `lazy-prefetch`.
    let record_in = std::env::var("SPRY_BENCH_RECORD_IN").unwrap_or_else(|_| "runc".into());
    for w in &selected {
        push_layout(&registry, w.image)?;
        convert(&registry, w.image, &[])?;
        image_bytes.insert(w.image, oci_image_bytes(w.image)?);
        recorded.insert(
            w.image,
            record_and_convert(&registry, w, &record_in, &out_dir)?,
        );
        eprintln!(
            "{}: {} bytes, {} files recorded",
            w.image, image_bytes[w.image], recorded[w.image]
        );
    }
    // The timed part begins with the pod up: what differs between cold and template pods
    // is the guest (a clone has its boot-time code paths translated and page cache warm).
    const RUNTIMES: [&str; 3] = ["runc", "spry", "spry_template"];
    let runtimes: Vec<&str> = match std::env::var("SPRY_BENCH_RUNTIMES").as_deref() {
        Ok("all") | Err(_) => RUNTIMES.to_vec(),
        Ok(list) => {
            let wanted: Vec<&str> = list.split(',').collect();
            for w in &wanted {
                ensure!(
                    RUNTIMES.contains(w),
                    "unknown runtime {w:?} in SPRY_BENCH_RUNTIMES; known: {RUNTIMES:?}"
                );
            }
            RUNTIMES
                .iter()
                .copied()
                .filter(|r| wanted.contains(r))
                .collect()
        }
    };
    let link = SlowLink::start(storage.path())?;
    let mut results = Vec::new();
    for (link_name, rate) in links {
        link.set_rate(rate)?;
        for w in &selected {
            for (runtime, mode) in runtimes
                .iter()
                .flat_map(|r| ["overlayfs", "lazy", "lazy-prefetch"].map(|m| (*r, m)))
            {
                let mut samples = Vec::new();
                for i in 0..runs {
                    let r = cold_run(&registry, &link, w, (runtime, mode), image_bytes[w.image])?;
                    eprintln!(
                        "{} {link_name} {runtime} {mode} #{i}: pull {:.2}s create {:.2}s run {:.2}s, {} bytes before ready",
                        w.image, r.pull_s, r.create_s, r.run_s, r.bytes_before_ready
                    );
                    samples.push(r);
                }
                let m = |f: fn(&Run) -> f64| median(samples.iter().map(f).collect());
                results.push(json!({
                    "runtime": runtime,
                    "image": w.image,
                    "image_bytes": image_bytes[w.image],
                    "link": link_name,
                    "mode": mode,
                    "pull_s": m(|r| r.pull_s),
                    "create_s": m(|r| r.create_s),
                    "run_s": m(|r| r.run_s),
                    "total_s": m(|r| r.pull_s + r.create_s + r.run_s),
                    "bytes_fetched_before_ready": m(|r| r.bytes_before_ready as f64) as u64,
                }));
            }
        }
    }
    link.set_rate(None)?;
    drop(link);
    let mut report = json!({
        "runs": results,
        "runs_per_median": runs,
        "recorded_files": recorded,
        "recorded_in": record_in,
    });
    if selected.iter().any(|w| w.image == "python") {
        for (k, v) in read_report(&registry, runs)?
            .as_object()
            .context("read report")?
        {
            report[k] = v.clone();
        }
    }
    std::fs::write(
        out_dir.join("lazypull.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(out_dir.join("lazypull.md"), markdown(&report))?;
    eprintln!("{}", markdown(&report));
    Ok(())
}

/// Compressed size of the normal image's layers, from its OCI layout.
fn oci_image_bytes(name: &str) -> Result<u64> {
    let layout = paths::repo_root().join("build/images").join(name);
    let index: Value = serde_json::from_str(&std::fs::read_to_string(layout.join("index.json"))?)?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .context("no manifest")?;
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(
        layout.join("blobs").join(digest.replace(':', "/")),
    )?)?;
    Ok(manifest["layers"]
        .as_array()
        .context("no layers")?
        .iter()
        .filter_map(|l| l["size"].as_u64())
        .sum())
}

fn markdown(report: &Value) -> String {
    let mut md = format!(
        "# Lazy pull benchmark\n\nMedians of cold runs (fresh containerd content store and chunk cache each run); `lazy-prefetch` prefetches the reads recorded in a {} pod.\n\n",
        report["recorded_in"].as_str().unwrap_or("runc")
    );
    md.push_str("| runtime | image | link | mode | pull s | create s | run s | total s | vs overlayfs | MB fetched before ready |\n|---|---|---|---|---|---|---|---|---|---|\n");
    let runs = report["runs"].as_array().cloned().unwrap_or_default();
    for r in &runs {
        let base = runs
            .iter()
            .find(|b| {
                b["image"] == r["image"]
                    && b["link"] == r["link"]
                    && b["runtime"] == r["runtime"]
                    && b["mode"] == "overlayfs"
            })
            .and_then(|b| b["total_s"].as_f64())
            .unwrap_or(f64::NAN);
        let total = r["total_s"].as_f64().unwrap_or(f64::NAN);
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2}x | {:.1} of {:.1} |\n",
            r["runtime"].as_str().unwrap_or(""),
            r["image"].as_str().unwrap_or(""),
            r["link"].as_str().unwrap_or(""),
            r["mode"].as_str().unwrap_or(""),
            r["pull_s"].as_f64().unwrap_or(0.0),
            r["create_s"].as_f64().unwrap_or(0.0),
            r["run_s"].as_f64().unwrap_or(0.0),
            total,
            base / total,
            r["bytes_fetched_before_ready"].as_f64().unwrap_or(0.0) / 1e6,
            r["image_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        ));
    }
    md.push_str(&read_markdown(report));
    md
}

fn read_markdown(report: &Value) -> String {
    let t = &report["read_throughput_mib_s"];
    let mibs = |k: &str| t[k].as_f64().unwrap_or(f64::NAN);
    let g = |k: &str| report["guest_read_mib_s"][k].as_f64().unwrap_or(f64::NAN);
    // The VM figures exist only when a Spry runtime was benchmarked.
    let vm = if g("erofs_disk").is_nan() {
        String::new()
    } else {
        format!(
            " In a Spry pod's VM: the packed erofs disk {:.1} MiB/s, the lazy layers' images {:.1} MiB/s ({:.0}%).",
            g("erofs_disk"),
            g("lazy_fetched"),
            100.0 * g("lazy_fetched") / g("erofs_disk"),
        )
    };
    format!(
        "\nSequential read of /usr/lib of the python image, fully cached, page cache dropped (medians): overlayfs {:.0} MiB/s, lazy (fully fetched layers mounted natively) {:.0} MiB/s ({:.0}% of overlayfs), lazy over FUSE with passthrough {:.0} MiB/s ({:.0}%), lazy through the daemon {:.0} MiB/s ({:.0}%).{vm} Checks: {}.\n",
        mibs("overlayfs"),
        mibs("lazy"),
        100.0 * mibs("lazy") / mibs("overlayfs"),
        mibs("lazy_passthrough"),
        100.0 * mibs("lazy_passthrough") / mibs("overlayfs"),
        mibs("lazy_daemon"),
        100.0 * mibs("lazy_daemon") / mibs("overlayfs"),
        report["checks"],
    )
}
