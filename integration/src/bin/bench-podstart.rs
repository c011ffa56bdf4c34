//! Pod start benchmark through crictl: runc, Spry booting cold ("spry"), Spry restoring
//! from a VM template ("spry_template") and Spry taking a VM from a warm pool of
//! `POOL_SIZE` ("spry_pool", the pool refilled before each of the pods started one after
//! another), in the same run, on one containerd:
//! - runp → create → start → first log line, p50/p95 of N pods one after another and of
//!   N pods started at once;
//! - host memory per idle pod: PSS of every process under the pod's shim (shim, QEMU,
//!   container processes), and how much of it is QEMU's translated code under TCG;
//! - host CPU per idle pod (all those processes, over 10 s), and the machine's CPU seconds
//!   per pod while they start (one after another, and all at once).
//!
//! Writes target/bench/podstart.json and .md. Run by scripts/bench-podstart.sh (root).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use spry_integration::bench::{
    percentile, round, round2, spry_accelerator, write_report, BenchNode, LOG_POLL, POOL_SIZE,
};
use spry_integration::{
    pod_usage::{HostCpu, PodProcesses},
    require_root, ContainerConfig, Containerd, Crictl, PodConfig,
};

/// How long idle pods are watched for the CPU they use.
const IDLE_CPU_WINDOW: Duration = Duration::from_secs(10);

struct Run {
    serial_ms: Vec<f64>,
    /// Per serial pod: how its start time splits up.
    phases: Vec<Phases>,
    /// A second container in each (already running) serial pod: create → first log line.
    second_container_ms: Vec<f64>,
    parallel_ms: Vec<f64>,
    idle_pod_pss_mib: f64,
    /// Per idle pod: the part of QEMU's PSS that is translated guest code (TCG only).
    idle_pod_tcg_code_mib: f64,
    /// Per idle pod: CPU of all its processes, % of one core.
    idle_pod_cpu_percent: f64,
    /// The machine's CPU seconds per pod while pods start one after another (each kept
    /// running) and while they all start at once: N pods at once on C cores cannot all be
    /// up before N x this / C.
    serial_cpu_s_per_pod: f64,
    parallel_cpu_s_per_pod: f64,
    /// Per pod, by process name (shim, QEMU, container processes).
    pss_by_process_mib: std::collections::BTreeMap<String, f64>,
    /// Warm pool only: PSS of one idle spare (its shim and QEMU).
    pooled_vm_idle_pss_mib: Option<f64>,
}

fn main() -> Result<()> {
    require_root()?;
    let mut pods = 10usize;
    let mut only: Option<Vec<String>> = None;
    let mut image_name = "busybox:1".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--pods" => pods = args.next().context("--pods needs a number")?.parse()?,
            // Any test image with sh and sleep, e.g. python:1 (the 256 MB Debian one).
            "--image" => image_name = args.next().context("--image needs a name")?,
            // For profiling one runtime; the report then lacks the others' columns.
            "--only" => {
                only = Some(
                    args.next()
                        .context("--only needs runc,spry,spry_template,spry_pool")?
                        .split(',')
                        .map(str::to_string)
                        .collect(),
                )
            }
            other => bail!("unknown argument {other}"),
        }
    }
    ensure!(
        pods >= 5,
        "--pods must be at least 5 for a p95 to mean anything"
    );
    let root = spry_integration::paths::repo_root();
    let node = BenchNode::start("bench", &["pause:1", image_name.as_str()])?;
    let (containerd, registry, state) = (&node.containerd, &node.registry, &node.state);
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(300));
    let image = registry.image(&image_name);
    crictl.pull(&image)?;
    // The census also watches Spry's state dir (a pod's VM dir, file share, rootfs images);
    // it is counted after the warm pool is drained.
    let leaks = spry_integration::spry::watch_pod_state(containerd.leak_check()?, state.path())?;

    let mut results = serde_json::Map::new();
    let mut accel = "n/a".to_string();
    let mut template = json!(null);
    for (runtime, handler) in [
        ("runc", None),
        ("spry", Some("spry-cold")),
        ("spry_template", Some("spry-template")),
        ("spry_pool", Some("spry-pool")),
    ] {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|r| r == runtime))
        {
            continue;
        }
        if runtime == "spry_template" {
            // Template built on first use, outside the measured pods.
            let started = Instant::now();
            let (_, pod, _) = start_pod(containerd, &crictl, &image, handler, "tpl-warmup")?;
            remove_pods(&crictl, &[pod])?;
            template = template_facts(&state.path().join("run/templates"), started.elapsed())?;
        }
        let pool = (runtime == "spry_pool").then(|| state.path().join("run/pool"));
        if let Some(pool) = &pool {
            // The first pod fills the pool; it and the template build are not measured.
            let (_, pod, _) = start_pod(containerd, &crictl, &image, handler, "pool-warmup")?;
            remove_pods(&crictl, &[pod])?;
            wait_for_spares(pool)?;
        }
        let run = measure(
            containerd,
            &crictl,
            &image,
            (runtime, handler),
            pods,
            pool.as_deref(),
        )?;
        if runtime == "spry" {
            accel = spry_accelerator(&state.path().join("run"));
        }
        results.insert(
            runtime.to_string(),
            json!({
                "serial_p50_ms": round(percentile(&run.serial_ms, 50.0)),
                "serial_p95_ms": round(percentile(&run.serial_ms, 95.0)),
                "parallel_p50_ms": round(percentile(&run.parallel_ms, 50.0)),
                "parallel_p95_ms": round(percentile(&run.parallel_ms, 95.0)),
                "idle_pod_pss_mib": round(run.idle_pod_pss_mib),
                "serial_phases_p50_ms": {
                    "runp": round(percentile(&run.phases.iter().map(|p| p.runp_ms).collect::<Vec<_>>(), 50.0)),
                    "create": round(percentile(&run.phases.iter().map(|p| p.create_ms).collect::<Vec<_>>(), 50.0)),
                    "start": round(percentile(&run.phases.iter().map(|p| p.start_ms).collect::<Vec<_>>(), 50.0)),
                    "first_log": round(percentile(&run.phases.iter().map(|p| p.first_log_ms).collect::<Vec<_>>(), 50.0)),
                },
                // The same container started again in a pod that is already up: on TCG
                // this shows what a cold translation cache costs the first container.
                "second_container_p50_ms": round(percentile(&run.second_container_ms, 50.0)),
                "idle_pod_pss_by_process_mib": run.pss_by_process_mib,
                "idle_pod_tcg_code_cache_mib": round(run.idle_pod_tcg_code_mib),
                "idle_pod_cpu_percent": round(run.idle_pod_cpu_percent),
                "serial_host_cpu_s_per_pod": round2(run.serial_cpu_s_per_pod),
                "parallel_host_cpu_s_per_pod": round2(run.parallel_cpu_s_per_pod),
                "pooled_vm_idle_pss_mib": run.pooled_vm_idle_pss_mib.map(round),
            }),
        );
    }
    node.drain_pool()?;
    results.insert(
        "checks".into(),
        json!({ "leaks": leaks.settled_count_printed()? }),
    );
    results.insert("template".into(), template);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    results.insert("goals".into(), goals(&results, pods, cpus));
    results.insert(
        "machine".into(),
        json!({ "cpus": cpus, "accelerator": accel, "pods": pods, "image": image_name }),
    );
    let report = serde_json::Value::Object(results);
    let md = markdown(&report);
    write_report(&root.join("target/bench"), "podstart", &report, &md)
}

/// Where one pod's start time went, each step timed by the crictl call that makes it.
#[derive(Clone, Copy, Default)]
struct Phases {
    runp_ms: f64,
    create_ms: f64,
    start_ms: f64,
    first_log_ms: f64,
}

/// Serial pods (kept running for the memory sample), then parallel pods.
/// With a warm `pool`, each serial pod (and the parallel batch) starts with it full.
fn measure(
    containerd: &Containerd,
    crictl: &Crictl,
    image: &str,
    (runtime, handler): (&str, Option<&str>),
    pods: usize,
    pool: Option<&Path>,
) -> Result<Run> {
    let mut serial_ms = Vec::new();
    let mut phases = Vec::new();
    let mut ids = Vec::new();
    let mut serial_cpu_s = 0.0;
    for i in 0..pods {
        if let Some(pool) = pool {
            wait_for_spares(pool)?;
        }
        let cpu = HostCpu::now()?;
        let (ms, pod, phase) = start_pod(
            containerd,
            crictl,
            image,
            handler,
            &format!("{}-s{i}", runtime.replace('_', "-")),
        )?;
        eprintln!(
            "{runtime} serial pod {i}: {ms:.0} ms (runp {:.0}, create {:.0}, start {:.0}, first log {:.0})",
            phase.runp_ms, phase.create_ms, phase.start_ms, phase.first_log_ms
        );
        // The pod's own start; a spare restored meanwhile is the pool's cost, not its.
        serial_cpu_s += HostCpu::now()?.seconds_since(&cpu);
        serial_ms.push(ms);
        phases.push(phase);
        ids.push(pod);
    }
    let serial_cpu_s_per_pod = serial_cpu_s / pods as f64;
    let mut second_container_ms = Vec::new();
    for (i, pod) in ids.iter().enumerate() {
        let name = format!("{}-s{i}", runtime.replace('_', "-"));
        let (ms, phase) = start_container(containerd, crictl, image, pod, &name, "second")?;
        eprintln!(
            "{runtime} second container in pod {i}: {ms:.0} ms (create {:.0}, start {:.0}, first log {:.0})",
            phase.create_ms, phase.start_ms, phase.first_log_ms
        );
        second_container_ms.push(ms);
    }
    std::thread::sleep(Duration::from_secs(3));
    let spares = PodProcesses::trees(pool.map(spare_pids).unwrap_or_default());
    let pooled_vm_idle_pss_mib =
        pool.map(|_| spares.pss_mib_by_name().values().sum::<f64>() / POOL_SIZE as f64);
    let usage = PodProcesses::of(containerd)?.without(&spares);
    let by_process = usage.pss_mib_by_name();
    let idle_pod_pss_mib = by_process.values().sum::<f64>() / pods as f64;
    let idle_pod_tcg_code_mib = usage.tcg_code_cache_mib() / pods as f64;
    let idle_pod_cpu_percent = usage.cpu_percent_over(IDLE_CPU_WINDOW) / pods as f64;
    let pss_by_process_mib = by_process
        .into_iter()
        .map(|(name, mib)| (name, round(mib / pods as f64)))
        .collect();
    remove_pods(crictl, &ids)?;

    if let Some(pool) = pool {
        wait_for_spares(pool)?;
    }
    let parallel_cpu = HostCpu::now()?;
    let results: Vec<Result<(f64, String)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..pods)
            .map(|i| {
                let name = format!("{}-p{i}", runtime.replace('_', "-"));
                scope.spawn(move || {
                    start_pod(containerd, crictl, image, handler, &name)
                        .map(|(ms, pod, _)| (ms, pod))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("pod thread panicked"))
            .collect()
    });
    let mut parallel_ms = Vec::new();
    let mut ids = Vec::new();
    for r in results {
        let (ms, pod) = r?;
        parallel_ms.push(ms);
        ids.push(pod);
    }
    let parallel_cpu_s_per_pod = HostCpu::now()?.seconds_since(&parallel_cpu) / pods as f64;
    eprintln!("{runtime} parallel: {parallel_ms:?}");
    remove_pods(crictl, &ids)?;
    Ok(Run {
        serial_ms,
        phases,
        second_container_ms,
        parallel_ms,
        idle_pod_pss_mib,
        idle_pod_tcg_code_mib,
        idle_pod_cpu_percent,
        serial_cpu_s_per_pod,
        parallel_cpu_s_per_pod,
        pss_by_process_mib,
        pooled_vm_idle_pss_mib,
    })
}

/// Waits until the warm pool holds `POOL_SIZE` ready spares (a spare's control socket
/// appears once its VM's agent answered).
fn wait_for_spares(pool: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let ready = std::fs::read_dir(pool)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().join("control.sock").exists())
                    .count()
            })
            .unwrap_or(0);
        if ready >= POOL_SIZE {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the warm pool at {} has {ready} of {POOL_SIZE} spares after 180 s",
            pool.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pids of the pool's spare shims.
fn spare_pids(pool: &Path) -> Vec<i32> {
    std::fs::read_dir(pool)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("spare.pid")).ok())
                .filter_map(|pid| pid.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// runp → create → start → first log line. Returns (milliseconds, pod id, phases).
fn start_pod(
    containerd: &Containerd,
    crictl: &Crictl,
    image: &str,
    handler: Option<&str>,
    name: &str,
) -> Result<(f64, String, Phases)> {
    let dir = containerd.dir().join(name);
    std::fs::create_dir_all(&dir)?;
    let pod_cfg = PodConfig::new(name).write_to(&dir)?;
    let t0 = Instant::now();
    let pod = crictl.runp(&pod_cfg, handler)?;
    let runp_ms = ms_since(t0);
    let (_, phases) = start_container(containerd, crictl, image, &pod, name, "app")?;
    let total = ms_since(t0);
    Ok((total, pod, Phases { runp_ms, ..phases }))
}

/// create → start → first log line of container `app_name` in `pod` (whose config was
/// written for `pod_name`). Returns (milliseconds, phases without runp).
fn start_container(
    containerd: &Containerd,
    crictl: &Crictl,
    image: &str,
    pod: &str,
    pod_name: &str,
    app_name: &str,
) -> Result<(f64, Phases)> {
    let dir = containerd.dir().join(pod_name);
    let pod_cfg = dir.join(format!("pod-{pod_name}.json"));
    ensure!(pod_cfg.exists(), "no pod config at {}", pod_cfg.display());
    let ctr_cfg = ContainerConfig::new(app_name, image)
        .command(&["sh", "-c", "echo ready; exec sleep 3600"])
        .write_to(&dir)?;
    let t0 = Instant::now();
    let ctr = crictl.create(pod, &ctr_cfg, &pod_cfg)?;
    let create_ms = ms_since(t0);
    let t1 = Instant::now();
    crictl.start(&ctr)?;
    let start_ms = ms_since(t1);
    let t2 = Instant::now();
    crictl
        .wait_for_log(&ctr, "ready", LOG_POLL, Duration::from_secs(240))
        .with_context(|| format!("container {app_name} in pod {pod_name}"))?;
    let phases = Phases {
        runp_ms: 0.0,
        create_ms,
        start_ms,
        first_log_ms: ms_since(t2),
    };
    Ok((ms_since(t0), phases))
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn remove_pods(crictl: &Crictl, pods: &[String]) -> Result<()> {
    for pod in pods {
        crictl.stopp(pod)?;
        if let Err(e) = crictl.rmp(pod) {
            // Seen once after 10 parallel cold pods: CRI still had the sandbox as ready
            // right after StopPodSandbox returned. Stop again and say so.
            eprintln!("warning: rmp right after stopp failed ({e}); stopping {pod} again");
            crictl.stopp(pod)?;
            crictl.rmp(pod)?;
        }
    }
    Ok(())
}

/// The template the warm-up pod built: its size on disk and build time.
fn template_facts(dir: &Path, first_pod: Duration) -> Result<serde_json::Value> {
    let templates: Vec<_> = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    ensure!(
        templates.len() == 1,
        "expected one template in {}",
        dir.display()
    );
    let tdir = templates[0].path();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tdir.join("manifest.json"))?)?;
    use std::os::unix::fs::MetadataExt;
    let memory = std::fs::metadata(tdir.join("memory"))?;
    Ok(json!({
        "build_ms": manifest["build_ms"],
        "first_pod_with_build_ms": round(first_pod.as_secs_f64() * 1000.0),
        // Resident size of the RAM file all clones map (tmpfs: host memory, counted once).
        "memory_file_mib": round(memory.blocks() as f64 * 512.0 / 1048576.0),
        "guest_memory_mib": manifest["memory_mib"],
    }))
}

/// The goals for templates, checked against this run's numbers.
fn goals(
    results: &serde_json::Map<String, serde_json::Value>,
    pods: usize,
    cpus: usize,
) -> serde_json::Value {
    let get = |runtime: &str, key: &str| {
        results
            .get(runtime)
            .and_then(|r| r[key].as_f64())
            .unwrap_or(f64::NAN)
    };
    let serial_ratio = get("spry_template", "serial_p50_ms") / get("runc", "serial_p50_ms");
    let parallel_ratio =
        get("spry_template", "parallel_p95_ms") / get("spry_template", "serial_p50_ms");
    let pss = get("spry_template", "idle_pod_pss_mib");
    // Issue 18's goals: the warm pool against runc, and the template's CPU per start.
    let pool_ratio = get("spry_pool", "serial_p50_ms") / get("runc", "serial_p50_ms");
    let cpu_ratio = get("spry_template", "serial_host_cpu_s_per_pod")
        / get("runc", "serial_host_cpu_s_per_pod");
    json!({
        "pool_serial_p50_over_runc": round2(pool_ratio),
        "pool_serial_p50_over_runc_goal": 1.5,
        "template_serial_cpu_over_runc": round2(cpu_ratio),
        "template_serial_cpu_over_runc_goal": 3.0,
        "pool_met": pool_ratio <= 1.5 && cpu_ratio <= 3.0 && parallel_ratio <= 3.0,
        "template_serial_p50_over_runc": round2(serial_ratio),
        "template_serial_p50_over_runc_goal": 1.5,
        "template_parallel_p95_over_serial_p50": round2(parallel_ratio),
        // All pods at once need this much CPU in all: on this many cores none can have
        // them all up sooner, whatever the scheduling.
        "template_parallel_cpu_floor_ms": round(get("spry_template", "parallel_host_cpu_s_per_pod") * pods as f64 / cpus as f64 * 1000.0),
        "template_parallel_p95_over_serial_p50_goal": 3.0,
        "template_idle_pod_pss_mib": pss,
        "template_idle_pod_pss_mib_goal": 64.0,
        "met": serial_ratio <= 1.5 && parallel_ratio <= 3.0 && pss <= 64.0,
    })
}

fn markdown(report: &serde_json::Value) -> String {
    let row = |k: &str| {
        let r = &report["runc"][k];
        let s = &report["spry"][k];
        let t = &report["spry_template"][k];
        let p = &report["spry_pool"][k];
        let ratio = |x: &serde_json::Value| match (x.as_f64(), r.as_f64()) {
            (Some(x), Some(base)) if base > 0.0 => format!("{:.2}x", x / base),
            _ => "-".to_string(),
        };
        format!(
            "| {k} | {r} | {s} | {t} | {p} | {} | {} | {} |\n",
            ratio(s),
            ratio(t),
            ratio(p)
        )
    };
    let m = &report["machine"];
    let mut md = format!(
        "# Pod start through crictl ({} pods of {}, {} CPUs, Spry on {})\n\n\
         | metric | runc | spry (cold) | spry_template | spry_pool | cold/runc | template/runc | pool/runc |\n\
         |---|---|---|---|---|---|---|---|\n",
        m["pods"], m["image"], m["cpus"], m["accelerator"]
    );
    for k in [
        "serial_p50_ms",
        "serial_p95_ms",
        "parallel_p50_ms",
        "parallel_p95_ms",
        "idle_pod_pss_mib",
        "idle_pod_tcg_code_cache_mib",
        "idle_pod_cpu_percent",
        "serial_host_cpu_s_per_pod",
        "parallel_host_cpu_s_per_pod",
        "second_container_p50_ms",
        "pooled_vm_idle_pss_mib",
    ] {
        md.push_str(&row(k));
    }
    md.push_str("\nSerial pod start by step, p50 ms (runp / create / start / first log line):\n\n");
    for runtime in ["runc", "spry", "spry_template", "spry_pool"] {
        let p = &report[runtime]["serial_phases_p50_ms"];
        if !p.is_null() {
            md.push_str(&format!(
                "- {runtime}: {} / {} / {} / {}\n",
                p["runp"], p["create"], p["start"], p["first_log"]
            ));
        }
    }
    md.push_str(&format!(
        "\nTemplate: {}\n\nChecks: {}\n\nGoals: {}\n",
        report["template"], report["checks"], report["goals"]
    ));
    md
}
