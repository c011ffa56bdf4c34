//! Pods under a real kubelet, runc vs Spry booting cold vs Spry from a VM template, in the
//! same run on one single-node cluster (`spry_integration::kube`):
//! - `kubectl apply` of a bare pod → Ready, N one after another (p50/p95);
//! - a Deployment of R replicas → Available;
//! - `kubectl set image` (busybox → python) → the new container Ready;
//! - checks from real probes: a Spry pod got Ready, the Deployments became Available, the
//!   image swap kept the pod's UID and VM and changed its `imageID`, a failing liveness
//!   probe restarted the container in the same VM, nothing was left after deletion.
//!
//! Writes target/bench/k8s.json and .md. Run by scripts/bench-k8s.sh (root).
//!   bench-k8s [--pods N] [--replicas R]

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};
use spry_integration::bench::{percentile, round, round2, spry_accelerator, write_report};
use spry_integration::kube::{manifests, Cluster};
use spry_integration::{paths, require_root, system, Registry};

/// (report key, RuntimeClass): runc is the node's default handler.
const MODES: [(&str, &str); 3] = [
    ("runc", "runc"),
    ("spry", "spry-cold"),
    ("spry_template", "spry"),
];
const READY: Duration = Duration::from_secs(300);

fn main() -> Result<()> {
    let (mut pods, mut replicas) = (10usize, 8u32);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--pods" => pods = value()?.parse()?,
            "--replicas" => replicas = value()?.parse()?,
            other => bail!("unknown argument {other} (usage: bench-k8s [--pods N] [--replicas R])"),
        }
    }
    ensure!(
        pods > 0 && replicas > 0,
        "--pods and --replicas must be positive"
    );
    require_root()?;
    let registry = Registry::start()?;
    let cluster =
        Cluster::start_with_variants("bench", &registry, &[("spry-cold", "template = \"off\"")])?;
    cluster.apply(&manifests::runtime_class("runc", "runc"))?;
    let busybox = registry.image("busybox:1");
    let python = registry.image("python:1");

    // Untimed: the swap measures replacing a container, not pulling python:1 or packing
    // its layers into Spry's shared layer image (both happen once per node).
    cluster.containerd().crictl().pull(&python)?;
    ready_pod(&cluster, "spry-cold", &python)?;
    cluster.delete_workloads()?;

    let mut report = Map::new();
    // Each check is the AND of what every mode's probes saw.
    let mut checks: Map<String, Value> = Map::new();
    let mut check = |name: &str, ok: bool| {
        let all = checks.get(name).and_then(Value::as_bool).unwrap_or(true) && ok;
        checks.insert(name.to_string(), json!(all));
    };
    for (key, class) in MODES {
        eprintln!("bench-k8s: {key} (RuntimeClass {class})");
        // Untimed: pulls the images, and builds the template for the template mode.
        let first = Instant::now();
        let first_ready = ready_pod(&cluster, class, &busybox);
        let first_pod_ms = ms_since(first);
        if key != "runc" {
            check("spry_pod_ready", first_ready.is_ok());
        }
        first_ready?;
        cluster.delete_workloads()?;

        let mut ready_ms = Vec::new();
        for i in 0..pods {
            let started = Instant::now();
            ready_pod(&cluster, class, &busybox)?;
            ready_ms.push(ms_since(started));
            eprintln!("bench-k8s: {key} pod {i}: {:.0} ms", ready_ms[i]);
            cluster.delete_workloads()?;
        }
        let started = Instant::now();
        cluster.apply(&manifests::deployment(
            "bench",
            Some(class),
            &busybox,
            replicas,
        ))?;
        let available = cluster.wait_for("deployment/bench", "condition=Available", READY);
        // No time for a Deployment that never became Available (null in the JSON).
        let deploy_ms = if available.is_ok() {
            ms_since(started)
        } else {
            f64::NAN
        };
        check("deployment_available", available.is_ok());
        if let Err(e) = available {
            eprintln!("bench-k8s: {e:#}");
        }
        cluster.delete_workloads()?;

        let swap = set_image(&cluster, class, &busybox, &python, key != "runc")?;
        cluster.delete_workloads()?;
        check("set_image_same_uid", swap.same_uid);
        check("image_id_changed", swap.image_id_changed);
        if key != "runc" {
            check("set_image_same_vm", swap.same_vm);
        }
        report.insert(
            key.into(),
            json!({
                "runtime_class": class,
                "first_pod_ms": round(first_pod_ms),
                "ready_p50_ms": round(percentile(&ready_ms, 50.0)),
                "ready_p95_ms": round(percentile(&ready_ms, 95.0)),
                "deploy_ms": round(deploy_ms),
                "set_image_ms": round(swap.ms),
            }),
        );
    }
    check(
        "liveness_restart_same_vm",
        liveness_restart_same_vm(&cluster, &busybox)?,
    );
    cluster.delete_workloads()?;
    check("no_leaks", no_leaks(&cluster)?);

    let ratio = |key: &str, metric: &str| {
        round2(
            report[key][metric].as_f64().unwrap_or(f64::NAN)
                / report["runc"][metric].as_f64().unwrap_or(f64::NAN),
        )
    };
    let ratios = json!({
        "spry_ready_p50_over_runc": ratio("spry", "ready_p50_ms"),
        "spry_template_ready_p50_over_runc": ratio("spry_template", "ready_p50_ms"),
        "spry_deploy_over_runc": ratio("spry", "deploy_ms"),
        "spry_template_deploy_over_runc": ratio("spry_template", "deploy_ms"),
        "spry_template_set_image_over_runc": ratio("spry_template", "set_image_ms"),
    });
    report.insert("ratios".into(), ratios);
    report.insert("checks".into(), Value::Object(checks));
    report.insert(
        "machine".into(),
        json!({
            "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "accelerator": spry_accelerator(cluster.spry_state()),
            "kubernetes": cluster.kubectl(&["version", "-o", "json"]).ok()
                .and_then(|v| serde_json::from_str::<Value>(&v).ok())
                .and_then(|v| v["serverVersion"]["gitVersion"].as_str().map(str::to_string)),
            "pods": pods,
            "replicas": replicas,
        }),
    );
    let report = Value::Object(report);
    let md = markdown(&report);
    write_report(
        &paths::repo_root().join("target/bench"),
        "k8s",
        &report,
        &md,
    )?;
    drop(cluster);
    Ok(())
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Applies a bare pod and waits until it is Ready.
fn ready_pod(cluster: &Cluster, class: &str, image: &str) -> Result<()> {
    cluster.apply(&manifests::pod(
        "bench",
        Some(class),
        image,
        "sleep 3600",
        "",
    ))?;
    cluster.wait_for("pod/bench", "condition=Ready", READY)
}

struct Swap {
    ms: f64,
    same_uid: bool,
    same_vm: bool,
    image_id_changed: bool,
}

/// `kubectl set image` from `from` to `to` on a Ready pod; timed until the new container
/// is Ready.
fn set_image(cluster: &Cluster, class: &str, from: &str, to: &str, vm: bool) -> Result<Swap> {
    ready_pod(cluster, class, from)?;
    let status = |path: &str| cluster.get("pod/bench", path);
    let uid = status("{.metadata.uid}")?;
    let image_id = status("{.status.containerStatuses[0].imageID}")?;
    let vms = cluster.vm_pids()?;
    ensure!(!vm || vms.len() == 1, "one VM expected, QEMU pids {vms:?}");
    let started = Instant::now();
    cluster.kubectl(&["set", "image", "pod/bench", &format!("main={to}")])?;
    let swapped = system::wait_for(READY, || {
        let restarts = status("{.status.containerStatuses[0].restartCount}")?;
        let ready = status("{.status.containerStatuses[0].ready}")?;
        Ok((restarts == "1" && ready == "true").then_some(()))
    })?;
    let ms = ms_since(started);
    swapped.context("the new image's container did not get Ready")?;
    Ok(Swap {
        ms,
        same_uid: status("{.metadata.uid}")? == uid,
        same_vm: cluster.vm_pids()? == vms,
        image_id_changed: status("{.status.containerStatuses[0].imageID}")? != image_id,
    })
}

/// A template Spry pod healthy for a few seconds, then not: its liveness probe must
/// restart the container inside the same VM.
fn liveness_restart_same_vm(cluster: &Cluster, image: &str) -> Result<bool> {
    let probe = "    livenessProbe:\n      exec: {command: [cat, /tmp/healthy]}\n      \
                 periodSeconds: 2\n      timeoutSeconds: 20\n      failureThreshold: 1\n";
    let script = "touch /tmp/healthy; sleep 6; rm /tmp/healthy; sleep 3600";
    cluster.apply(&manifests::pod("bench", Some("spry"), image, script, probe))?;
    cluster.wait_for("pod/bench", "condition=Ready", READY)?;
    let vms = cluster.vm_pids()?;
    let restarted = system::wait_for(READY, || {
        let restarts = cluster.get("pod/bench", "{.status.containerStatuses[0].restartCount}")?;
        Ok((restarts.parse::<u32>().unwrap_or(0) >= 1).then_some(()))
    })?;
    Ok(restarted.is_some() && vms.len() == 1 && cluster.vm_pids()? == vms)
}

/// After every workload is gone: no VM, VM state, rootfs image, file share or mount of
/// Spry's left.
fn no_leaks(cluster: &Cluster) -> Result<bool> {
    let state = cluster.spry_state();
    let vms = cluster.vm_pids()?;
    let dirs: Vec<_> = ["vms", "rootfs", "shares"]
        .iter()
        .flat_map(|sub| system::list_dir(&state.join(sub)))
        .collect();
    let mounts = system::mounts()?
        .into_iter()
        .filter(|m| m.mount_point.starts_with(state))
        .count();
    if !vms.is_empty() || !dirs.is_empty() || mounts > 0 {
        eprintln!("bench-k8s: left behind: QEMU {vms:?}, state {dirs:?}, {mounts} mounts");
        return Ok(false);
    }
    Ok(true)
}

fn markdown(report: &Value) -> String {
    let machine = &report["machine"];
    let mut md = format!(
        "# Pods under a kubelet ({} single node, {} CPUs, Spry on {:?})\n\n\
         | metric | runc | spry (cold) | spry_template | cold/runc | template/runc |\n|---|---|---|---|---|---|\n",
        machine["kubernetes"].as_str().unwrap_or("kubernetes"),
        machine["cpus"],
        machine["accelerator"].as_str().unwrap_or("?"),
    );
    for metric in [
        "ready_p50_ms",
        "ready_p95_ms",
        "deploy_ms",
        "set_image_ms",
        "first_pod_ms",
    ] {
        let get = |key: &str| report[key][metric].as_f64().unwrap_or(f64::NAN);
        let runc = get("runc");
        md.push_str(&format!(
            "| {metric} | {} | {} | {} | {:.2}x | {:.2}x |\n",
            get("runc"),
            get("spry"),
            get("spry_template"),
            get("spry") / runc,
            get("spry_template") / runc
        ));
    }
    md.push_str(&format!(
        "\n{} pods one after another per runtime; Deployment of {} replicas. Ready times move in \
         steps of about a second: the kubelet notices container starts by relisting every 1 s \
         (its generic PLEG).\n\nChecks: {}\n",
        machine["pods"], machine["replicas"], report["checks"]
    ));
    md
}
