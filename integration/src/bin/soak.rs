//! Soak: pod lifecycles through crictl, over and over, on one containerd, counting what
//! they leave behind. Each cycle: runp (template and cold pods in turn, on the CNI
//! network), create (with a host volume), start, exec (reading the volume), logs, stop, rm,
//! stopp, rmp. A long-lived pod runs alongside the whole time. After
//! every 50 cycles (and at the end) a census: processes, mounts, named netns, taps, state
//! dirs and containerd's open fds against the start, the host's available memory, and the
//! memory of the long-lived pod's shim and QEMU.
//!
//! Writes target/bench/soak.json and .md. Run by scripts/soak.sh (root):
//! `{"cycles", "failures", "leaked": {"processes", "mounts", "netns", "taps", "state_dirs",
//! "fds"}, "host_mem_growth_mib", "cycles_per_min", "census": [...]}`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use spry_integration::bench::{round, round2, spry_accelerator, write_report, BenchNode};
use spry_integration::leak::LeakCheck;
use spry_integration::pod_usage::PodProcesses;
use spry_integration::{require_root, system, ContainerConfig, Containerd, Crictl, PodConfig};

const CENSUS_EVERY: usize = 50;

fn main() -> Result<()> {
    require_root()?;
    let (mut cycles, mut parallel) = (500usize, 1usize);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cycles" => cycles = args.next().context("--cycles needs a number")?.parse()?,
            "--parallel" => parallel = args.next().context("--parallel needs a number")?.parse()?,
            other => bail!("unknown argument {other} (usage: soak [--cycles N] [--parallel P])"),
        }
    }
    ensure!(
        cycles > 0 && parallel > 0,
        "--cycles and --parallel must be positive"
    );
    let node = BenchNode::start("soak", &["pause:1", "busybox:1"])?;
    let (containerd, registry, state) = (&node.containerd, &node.registry, &node.state);
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(300));
    let image = registry.image("busybox:1");
    crictl.pull(&image)?;
    // The template is built on first use: before the baseline.
    let warm = cycle(containerd, &crictl, &image, "warmup", "spry-template")?;
    drop(warm);
    let long_lived = start_long_lived(containerd, &crictl, &image)?;
    let run_dir = state.path().join("run");
    let baseline = LeakCheck::capture(containerd.leak_scope())?
        .watch_dir(&run_dir.join("vms"), 1)?
        .watch_dir(&run_dir.join("layer-images"), 1)?
        .watch_dir(&run_dir.join("shares"), 1)?
        .watch_dir(&run_dir.join("rootfs"), 1)?
        .settle(Duration::from_secs(20));
    let fds_before = containerd_fds(containerd)?;
    let mem_before = mem_available_mib()?;

    let failures = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let mut census = Vec::new();
    let started = Instant::now();
    let mut next = 0usize;
    while next < cycles {
        let batch_end = (next + CENSUS_EVERY).min(cycles);
        std::thread::scope(|s| {
            for worker in 0..parallel {
                let (crictl, image, failures, done) = (&crictl, &image, &failures, &done);
                s.spawn(move || {
                    let mut i = next + worker;
                    while i < batch_end {
                        let handler = ["spry-template", "spry-cold"][i % 2];
                        if let Err(err) =
                            cycle(containerd, crictl, image, &format!("soak-{i}"), handler)
                        {
                            failures.fetch_add(1, Ordering::Relaxed);
                            eprintln!("cycle {i} ({handler}) failed: {err:#}");
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                        i += parallel;
                    }
                });
            }
        });
        next = batch_end;
        // The long-lived pod stays; everything else must be gone.
        let _ = system::wait_for(Duration::from_secs(20), || {
            Ok(baseline.leaks()?.is_empty().then_some(()))
        });
        let leaks = baseline.leaks()?;
        for leak in &leaks {
            eprintln!("leak after {next} cycles: {leak}");
        }
        let entry = json!({
            "cycles": next,
            "failures": failures.load(Ordering::Relaxed),
            "leaked": leaked(&leaks, containerd_fds(containerd)?.saturating_sub(fds_before)),
            "host_mem_growth_mib": round(mem_before - mem_available_mib()?),
            "long_lived_pod_pss_mib": round(long_lived_pss(containerd)?),
            "elapsed_s": round(started.elapsed().as_secs_f64()),
        });
        eprintln!("census: {entry}");
        census.push(entry);
    }
    let elapsed_min = started.elapsed().as_secs_f64() / 60.0;
    let last = census.last().cloned().context("no census")?;
    let report = json!({
        "cycles": cycles,
        "parallel": parallel,
        "failures": failures.load(Ordering::Relaxed),
        "leaked": last["leaked"],
        "host_mem_growth_mib": last["host_mem_growth_mib"],
        "cycles_per_min": round2(done.load(Ordering::Relaxed) as f64 / elapsed_min),
        "long_lived_pod_pss_mib": {
            "first": census.first().map(|c| c["long_lived_pod_pss_mib"].clone()),
            "last": last["long_lived_pod_pss_mib"],
        },
        "census": census,
        "machine": {
            "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "accelerator": spry_accelerator(&run_dir),
        },
    });
    let md = markdown(&report);
    let root = spry_integration::paths::repo_root();
    write_report(&root.join("target/bench"), "soak", &report, &md)?;
    crictl.stopp(&long_lived)?;
    crictl.rmp(&long_lived)?;
    Ok(())
}

/// One pod's whole life; returns its id (already removed).
fn cycle(
    containerd: &Containerd,
    crictl: &Crictl,
    image: &str,
    name: &str,
    handler: &str,
) -> Result<String> {
    let dir = containerd.dir().join(name);
    std::fs::create_dir_all(&dir)?;
    let pod_cfg = PodConfig::new(name).write_to(&dir)?;
    let pod = crictl.runp(&pod_cfg, Some(handler))?;
    let lived = (|| -> Result<()> {
        // A host volume too: the pod's file share and its server come and go every cycle.
        let volume = dir.join("volume");
        std::fs::create_dir_all(&volume)?;
        std::fs::write(volume.join("from-host"), format!("{name}\n"))?;
        let ctr_cfg = ContainerConfig::new("app", image)
            .command(&["sh", "-c", "echo ready; exec sleep 3600"])
            .mount(&volume, "/data", false)
            .write_to(&dir)?;
        let ctr = crictl.create(&pod, &ctr_cfg, &pod_cfg)?;
        crictl.start(&ctr)?;
        let out = crictl.exec(&ctr, &["sh", "-c", "cat /data/from-host; echo in-exec"])?;
        ensure!(
            out.code == 0 && out.stdout.split_whitespace().eq([name, "in-exec"]),
            "exec: {out:?}"
        );
        let logged = system::wait_for(Duration::from_secs(60), || {
            Ok(crictl.logs(&ctr)?.contains("ready").then_some(()))
        })?;
        ensure!(logged.is_some(), "no log line from {name}");
        crictl.stop(&ctr, 1)?;
        crictl.rm(&ctr)?;
        crictl.stopp(&pod)?;
        crictl.rmp(&pod)
    })();
    if lived.is_err() {
        // Only this cycle's pod: the long-lived one must stay.
        let _ = crictl.run(&["rmp", "--force", pod.as_str()]);
    }
    lived?;
    std::fs::remove_dir_all(&dir)?;
    Ok(pod)
}

fn start_long_lived(containerd: &Containerd, crictl: &Crictl, image: &str) -> Result<String> {
    let dir = containerd.dir().join("long-lived");
    std::fs::create_dir_all(&dir)?;
    let pod_cfg = PodConfig::new("long-lived").write_to(&dir)?;
    let pod = crictl.runp(&pod_cfg, Some("spry-template"))?;
    let ctr_cfg = ContainerConfig::new("app", image)
        .command(&["sleep", "36000"])
        .write_to(&dir)?;
    let ctr = crictl.create(&pod, &ctr_cfg, &pod_cfg)?;
    crictl.start(&ctr)?;
    Ok(pod)
}

/// PSS of the pods' processes at a census, when only the long-lived pod is up.
fn long_lived_pss(containerd: &Containerd) -> Result<f64> {
    Ok(PodProcesses::of(containerd)?
        .pss_mib_by_name()
        .values()
        .sum())
}

/// The census's leak lines, counted by kind.
fn leaked(leaks: &[String], fds: usize) -> serde_json::Value {
    let count = |prefix: &str| leaks.iter().filter(|l| l.starts_with(prefix)).count();
    json!({
        "processes": count("process "),
        "mounts": count("mount "),
        "netns": count("netns "),
        "taps": count("tap device "),
        "state_dirs": count("state entry "),
        "fds": fds,
    })
}

fn containerd_fds(containerd: &Containerd) -> Result<usize> {
    let pid = containerd.pid().context("containerd is not running")?;
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

fn mem_available_mib() -> Result<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("MemAvailable in /proc/meminfo")?;
    Ok(kib / 1024.0)
}

fn markdown(report: &serde_json::Value) -> String {
    let mut md = format!(
        "# Soak ({} cycles, {} at a time, {})\n\n",
        report["cycles"], report["parallel"], report["machine"]["accelerator"]
    );
    md.push_str(&format!(
        "failures {}, leaked {}, host memory growth {} MiB, {} cycles/min\n\n",
        report["failures"],
        report["leaked"],
        report["host_mem_growth_mib"],
        report["cycles_per_min"]
    ));
    md.push_str("| after cycles | failures | leaked | host mem growth MiB | long-lived pod PSS MiB |\n|---|---|---|---|---|\n");
    for c in report["census"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            c["cycles"],
            c["failures"],
            c["leaked"],
            c["host_mem_growth_mib"],
            c["long_lived_pod_pss_mib"]
        ));
    }
    md
}
