//! Pod volume benchmark through crictl: runc, Spry booting cold ("spry") and Spry restoring
//! from a VM template ("spry_template"), in the same run, each on a hostPath directory and
//! an emptyDir (a directory laid out where kubelet keeps emptyDirs):
//! - `seq_write_mib_s` / `seq_read_mib_s`: one file of `--file-mib` MiB (dd, 1 MiB blocks,
//!   fsync on write; host page cache dropped before the read; the emptyDir read is
//!   O_DIRECT for every runtime, since Spry keeps that volume on a guest disk whose page
//!   cache is the guest's, which the host cannot drop);
//! - `small_files_s`: create, stat and read back `--files` files of 1 KiB;
//! - `configmap_update_p50_ms`: a configMap volume laid out as kubelet's atomic writer does
//!   (`..<ts>/` dirs, `..data` symlink swapped by rename), updated `--updates` times; from
//!   the host's swap until a watcher in the container reports the new value (through a
//!   host directory, polled every millisecond).
//!
//! Exec overhead (an empty `crictl exec`) is measured per pod and subtracted from timed
//! commands. Every entry of `checks` is probed in this run. Writes
//! target/bench/volumes.json and .md. Run by scripts/bench-volumes.sh (root).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use spry_integration::atomic_writer;
use spry_integration::bench::{
    percentile, round, round2, spry_accelerator, write_report, BenchNode,
};
use spry_integration::{require_root, ContainerConfig, Containerd, Crictl, PodConfig};

struct Settings {
    file_mib: u64,
    files: usize,
    updates: usize,
}

fn main() -> Result<()> {
    require_root()?;
    let mut settings = Settings {
        file_mib: 256,
        files: 5000,
        updates: 20,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--file-mib" => settings.file_mib = value()?.parse()?,
            "--files" => settings.files = value()?.parse()?,
            "--updates" => settings.updates = value()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    let root = spry_integration::paths::repo_root();
    let sources = tempfile::Builder::new()
        .prefix("spry-bench-vol-src-")
        .tempdir_in("/var/tmp")?;
    let node = BenchNode::start("bench-vol", &["pause:1", "busybox:1"])?;
    let (containerd, registry, state) = (&node.containerd, &node.registry, &node.state);
    // The census also watches Spry's state dir: a pod's VM dir, file share, rootfs images.
    let leaks = spry_integration::spry::watch_pod_state(containerd.leak_check()?, state.path())?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(600));
    let image = registry.image("busybox:1");
    crictl.pull(&image)?;

    let mut checks = serde_json::Map::new();
    let mut results = serde_json::Map::new();
    for (key, handler) in [
        ("runc", None),
        ("spry", Some("spry-cold")),
        ("spry_template", Some("spry-template")),
    ] {
        let pod = VolumePod::start(containerd, &crictl, &image, key, handler, sources.path())?;
        let mut result = serde_json::Map::new();
        for (volume, dir, direct) in [("host_path", "/hp", false), ("empty_dir", "/ed", true)] {
            let (write, read) = pod.sequential(dir, settings.file_mib, direct)?;
            let small = pod.small_files(dir, settings.files)?;
            eprintln!("{key} {volume}: write {write:.1} MiB/s, read {read:.1} MiB/s, small files {small:.2} s");
            result.insert(
                volume.into(),
                json!({
                    "seq_write_mib_s": round(write),
                    "seq_read_mib_s": round(read),
                    "small_files_s": round2(small),
                }),
            );
        }
        let (update_ms, torn) = pod.configmap_updates(settings.updates)?;
        result.insert(
            "configmap_update_p50_ms".into(),
            json!(round(percentile(&update_ms, 50.0))),
        );
        result.insert(
            "configmap_update_max_ms".into(),
            json!(round(update_ms.iter().cloned().fold(0.0, f64::max))),
        );
        result.insert(
            "exec_overhead_ms".into(),
            json!(round(pod.exec_overhead_ms)),
        );
        checks.insert(format!("{key}_configmap_no_torn_read"), json!(!torn));
        if handler.is_some() {
            pod.probe_checks(key, &mut checks)?;
        }
        pod.remove()?;
        results.insert(key.into(), Value::Object(result));
    }
    checks.insert("leaks".into(), json!(leaks.count_printed()?));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let report = json!({
        "machine": {
            "cpus": cpus,
            "accelerator": spry_accelerator(&state.path().join("run")),
            "file_mib": settings.file_mib,
            "files": settings.files,
            "updates": settings.updates,
            "spry_volumes": "hostPath through the file share (FUSE in the guest over virtio-serial, fuse-backend-rs passthrough on the host); emptyDir on the pod's guest ext4 disk (a sparse image in kubelet's emptyDir dir); configMap synced into a guest tmpfs",
        },
        "checks": checks,
        "runc": results["runc"],
        "spry": results["spry"],
        "spry_template": results["spry_template"],
    });
    write_report(
        &root.join("target/bench"),
        "volumes",
        &report,
        &markdown(&report),
    )
}

struct VolumePod<'a> {
    crictl: &'a Crictl,
    pod: String,
    container: String,
    base: PathBuf,
    exec_overhead_ms: f64,
}

impl<'a> VolumePod<'a> {
    fn start(
        containerd: &Containerd,
        crictl: &'a Crictl,
        image: &str,
        name: &str,
        handler: Option<&str>,
        sources: &Path,
    ) -> Result<Self> {
        let base = sources.join(name);
        let empty_dir = base.join("volumes/kubernetes.io~empty-dir/scratch");
        for dir in [base.join("hp"), empty_dir.clone(), base.join("out")] {
            std::fs::create_dir_all(dir)?;
        }
        let cfg = base.join("volumes/kubernetes.io~configmap/cfg");
        atomic_writer::write_version(&cfg, "v0")?;
        let dir = containerd.dir();
        let pod_name = format!("vol-{}", name.replace('_', "-"));
        let pod_cfg = PodConfig::new(&pod_name).write_to(&dir)?;
        let ctr_cfg = ContainerConfig::new(&format!("{pod_name}-c"), image)
            .command(&["sh", "-c", atomic_writer::WATCHER])
            .mount(&base.join("hp"), "/hp", false)
            .mount(&empty_dir, "/ed", false)
            .mount(&cfg, "/cfg", true)
            .mount(&base.join("out"), "/out", false)
            .write_to(&dir)?;
        let pod = crictl.runp(&pod_cfg, handler)?;
        let container = crictl.create(&pod, &ctr_cfg, &pod_cfg)?;
        crictl.start(&container)?;
        let mut this = Self {
            crictl,
            pod,
            container,
            base,
            exec_overhead_ms: 0.0,
        };
        let overheads: Vec<f64> = (0..5)
            .map(|_| this.timed("true").map(|d| d.as_secs_f64() * 1000.0))
            .collect::<Result<_>>()?;
        this.exec_overhead_ms = percentile(&overheads, 50.0);
        Ok(this)
    }

    /// Runs `script` in the container; its wall time as the host sees it.
    fn timed(&self, script: &str) -> Result<Duration> {
        let started = Instant::now();
        let out = self.crictl.exec_sync(
            &self.container,
            &["sh", "-c", script],
            Duration::from_secs(600),
        )?;
        ensure!(out.code == 0, "{script}: {} {}", out.stdout, out.stderr);
        Ok(started.elapsed())
    }

    /// Seconds `script` took, exec overhead subtracted.
    fn seconds(&self, script: &str) -> Result<f64> {
        let ms = self.timed(script)?.as_secs_f64() * 1000.0 - self.exec_overhead_ms;
        Ok(ms.max(1.0) / 1000.0)
    }

    /// Write then read MiB/s of one `mib` MiB file; `direct`: read with O_DIRECT.
    fn sequential(&self, dir: &str, mib: u64, direct: bool) -> Result<(f64, f64)> {
        let write = self.seconds(&format!(
            "dd if=/dev/zero of={dir}/big bs=1M count={mib} conv=fsync 2>/dev/null"
        ))?;
        drop_host_caches()?;
        let flag = if direct { "iflag=direct" } else { "" };
        let read = self.seconds(&format!(
            "dd if={dir}/big of=/dev/null bs=1M {flag} 2>/dev/null"
        ))?;
        self.timed(&format!("rm {dir}/big"))?;
        Ok((mib as f64 / write, mib as f64 / read))
    }

    fn small_files(&self, dir: &str, files: usize) -> Result<f64> {
        let script = format!(
            "mkdir {dir}/small && cd {dir}/small && i=0; \
             while [ $i -lt {files} ]; do printf '%1024s' > f$i; i=$((i+1)); done; \
             ls -l > /dev/null && cat * > /dev/null"
        );
        let seconds = self.seconds(&script)?;
        self.timed(&format!("rm -r {dir}/small"))?;
        Ok(seconds)
    }

    /// Latencies of `updates` atomic configMap swaps, and whether the watcher saw a torn one.
    fn configmap_updates(&self, updates: usize) -> Result<(Vec<f64>, bool)> {
        let cfg = self.base.join("volumes/kubernetes.io~configmap/cfg");
        let seen = self.base.join("out/seen");
        wait_for_line(&seen, "v0", Duration::from_secs(60))?;
        let mut latencies = Vec::new();
        for n in 1..=updates {
            let value = format!("v{n}");
            let started = Instant::now();
            atomic_writer::write_version(&cfg, &value)?;
            wait_for_line(&seen, &value, Duration::from_secs(30))?;
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            std::thread::sleep(Duration::from_millis(100));
        }
        let torn = std::fs::read_to_string(&seen)?.lines().any(|l| l == "torn");
        Ok((latencies, torn))
    }

    /// Host → guest, guest → host, read-only enforcement, probed on this pod.
    fn probe_checks(&self, key: &str, checks: &mut serde_json::Map<String, Value>) -> Result<()> {
        std::fs::write(self.base.join("hp/from-host"), "host")?;
        let out = self.crictl.exec_sync(
            &self.container,
            &["cat", "/hp/from-host"],
            Duration::from_secs(60),
        )?;
        checks.insert(
            format!("{key}_guest_sees_host_write"),
            json!(out.stdout.trim() == "host"),
        );
        self.timed("echo guest > /hp/from-guest")?;
        let host_sees =
            std::fs::read_to_string(self.base.join("hp/from-guest")).unwrap_or_default();
        checks.insert(
            format!("{key}_host_sees_guest_write"),
            json!(host_sees.trim() == "guest"),
        );
        let out = self.crictl.exec_sync(
            &self.container,
            &["sh", "-c", "echo x > /cfg/intruder"],
            Duration::from_secs(60),
        )?;
        let blocked = out.code != 0
            && !self
                .base
                .join("volumes/kubernetes.io~configmap/cfg/intruder")
                .exists();
        checks.insert(format!("{key}_readonly_enforced"), json!(blocked));
        // The emptyDir is the guest disk: ext4 in the guest, only its image on the host.
        let mounts = self.crictl.exec_sync(
            &self.container,
            &["cat", "/proc/mounts"],
            Duration::from_secs(60),
        )?;
        self.timed("echo x > /ed/in-guest")?;
        let empty_dir = self.base.join("volumes/kubernetes.io~empty-dir/scratch");
        let on_disk = mounts.stdout.lines().any(|l| l.contains(" /ed ext4 "))
            && !empty_dir.join("in-guest").exists()
            && empty_dir.join(".spry-empty-dir.img").is_file();
        checks.insert(format!("{key}_empty_dir_on_guest_disk"), json!(on_disk));
        Ok(())
    }

    fn remove(&self) -> Result<()> {
        self.crictl.stopp(&self.pod)?;
        self.crictl.rmp(&self.pod)
    }
}

fn wait_for_line(file: &Path, line: &str, limit: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(file) {
            if text.lines().any(|l| l == line) {
                return Ok(());
            }
        }
        ensure!(
            started.elapsed() < limit,
            "{line:?} never showed in {}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn drop_host_caches() -> Result<()> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the host's page cache")
}

fn markdown(report: &Value) -> String {
    let machine = &report["machine"];
    let mut md = String::from("# Pod volumes: runc vs Spry (cold) vs Spry (template)\n\n");
    md.push_str(&format!(
        "{} CPUs, accelerator {}; a {} MiB file, {} files of 1 KiB, {} configMap updates. \
         Spry volumes: {}. × runc is Spry ÷ runc: under 1 is slower for throughput, over 1 is slower for times.\n\n",
        machine["cpus"],
        machine["accelerator"],
        machine["file_mib"],
        machine["files"],
        machine["updates"],
        machine["spry_volumes"].as_str().unwrap_or_default()
    ));
    md.push_str("| runtime | volume | seq write MiB/s | × runc | seq read MiB/s | × runc | small files s | × runc |\n|---|---|---|---|---|---|---|---|\n");
    for runtime in ["runc", "spry", "spry_template"] {
        for volume in ["host_path", "empty_dir"] {
            let r = &report[runtime][volume];
            let base = &report["runc"][volume];
            let ratio = |key: &str| {
                round2(r[key].as_f64().unwrap_or(f64::NAN) / base[key].as_f64().unwrap_or(f64::NAN))
            };
            md.push_str(&format!(
                "| {runtime} | {volume} | {} | {} | {} | {} | {} | {} |\n",
                r["seq_write_mib_s"],
                ratio("seq_write_mib_s"),
                r["seq_read_mib_s"],
                ratio("seq_read_mib_s"),
                r["small_files_s"],
                ratio("small_files_s"),
            ));
        }
    }
    md.push_str("\n| runtime | configMap update p50 (ms) | max (ms) | exec overhead (ms) |\n|---|---|---|---|\n");
    for runtime in ["runc", "spry", "spry_template"] {
        let r = &report[runtime];
        md.push_str(&format!(
            "| {runtime} | {} | {} | {} |\n",
            r["configmap_update_p50_ms"], r["configmap_update_max_ms"], r["exec_overhead_ms"]
        ));
    }
    md.push_str("\nChecks (each probed in this run):\n\n");
    if let Some(checks) = report["checks"].as_object() {
        for (name, value) in checks {
            md.push_str(&format!("- {name}: {value}\n"));
        }
    }
    md
}
