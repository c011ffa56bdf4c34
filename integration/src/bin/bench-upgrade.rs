//! In-place image swap benchmark through crictl, for runc, Spry cold and Spry from a
//! template, in one run on one containerd. A pod serves TCP on :8080 with image A
//! (busybox httpd) and is swapped to image B (a python accept loop) by:
//! - kubelet's sequence (stop, pull, create attempt + 1, start), B not on the node, and again
//!   with B pulled beforehand (its layers never packed by Spry: an image new to the node),
//!   and once more with B's layer image kept from the pod before (`[rootfs]
//!   keep_unused_mib`);
//! - recreating the pod instead (stopp, rmp, runp, create, start with B);
//! - `spry upgrade` (pull while A serves, create, stop, start, ready on :8080), and its
//!   rollback when the new image cannot start (pause: no shell).
//!
//! B comes from the same registry storage behind a 100 Mbit/s link (`slow_link`: netns +
//! veth + tc), as in bench-lazypull, so a pull of B costs what it would from a real
//! registry; A and the broken image come over loopback.
//!
//! The first two are also run with B a small server (`webapp`: busybox's httpd in another
//! image, pulled beforehand), which shows what Spry adds to each without python's first
//! start under TCG (~1.7 s in either).
//!
//! Spry keeps the packed layer images of removed containers (within a bound): every case
//! but the kept-image one and the rollback starts with none of B's, as before they were
//! kept, so the figures compare with earlier runs.
//!
//! Downtime is measured from outside: a client connects to the pod's port every 10 ms; it
//! is the gap between the last answer before the swap and the first after. Also: a second
//! container started in a running pod (p50 of 5). Every check comes from a probe here.
//!
//! Writes target/bench/upgrade.json and .md. Run by scripts/bench-upgrade.sh (root).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use spry_integration::bench::{
    percentile, round, spry_accelerator, write_report, BenchNode, LOG_POLL,
};
use spry_integration::slow_link::SlowLink;
use spry_integration::{require_root, system, ContainerConfig, Containerd, Crictl, PodConfig};

/// Serves :8080 with whatever the image has: busybox's httpd, or a python accept loop
/// (python's http.server looks its own name up in DNS first, ~10 s without a resolver).
const SERVER: &str = "if [ -x /usr/bin/python3 ]; then exec python3 -c \"import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('', 8080))
s.listen(128)
while True:
    s.accept()[0].close()\"; else mkdir -p /www && exec httpd -f -p 8080 -h /www; fi";
const PORT: u16 = 8080;
/// The link B is pulled over (bench-lazypull's).
const LINK_RATE: &str = "100mbit";
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// `--snapshotter spry`: containerd unpacks through `spry-snapshotter` with `vm_images`
/// (what `spry install --snapshotter` sets up), which builds each layer's erofs image once
/// it is pulled, so Spry pods attach those instead of the shim packing them at create.
const SPRY_SNAPSHOTTER_CONFIG: &str = "[lazy]\nvm_images = true\n";

fn main() -> Result<()> {
    require_root()?;
    let root = spry_integration::paths::repo_root();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spry_snapshotter = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] | ["--snapshotter", "overlayfs"] => false,
        ["--snapshotter", "spry"] => true,
        _ => bail!("usage: bench-upgrade [--snapshotter overlayfs|spry] (got {args:?})"),
    };
    let node = BenchNode::start_with_snapshotter(
        "bench-up",
        &["pause:1", "busybox:1", "python:1", "webapp:1"],
        spry_snapshotter.then_some(SPRY_SNAPSHOTTER_CONFIG),
    )?;
    let (containerd, registry, state) = (&node.containerd, &node.registry, &node.state);
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(600));
    let link = SlowLink::start(registry.storage())?;
    link.set_rate(Some(LINK_RATE))?;
    link.trust_from(&containerd.certs_dir())?;
    // The census (taken once the node and the slow link are up) also watches Spry's
    // state dir: a pod's VM dir, file share and rootfs images must go with the pod.
    let leaks = spry_integration::spry::watch_pod_state(containerd.leak_check()?, state.path())?;
    let images = Images {
        a: registry.image("busybox:1"),
        b: format!("{}/python:1", link.addr()),
        web: format!("{}/webapp:1", link.addr()),
        broken: registry.image("pause:1"),
    };
    crictl.pull(&images.a)?;
    crictl.pull(&images.broken)?;
    let bench = Bench {
        containerd,
        crictl: &crictl,
        images: &images,
        layer_cache: state.path().join("run/layer-images"),
        spry_config: state.path().join("config.toml"),
        snapshotter: node.snapshotter.as_ref(),
    };

    let mut results = serde_json::Map::new();
    let mut checks = serde_json::Map::new();
    for (runtime, handler) in [
        ("runc", None),
        ("spry", Some("spry-cold")),
        ("spry_template", Some("spry-template")),
    ] {
        let (figures, found) = bench
            .runtime(runtime, handler)
            .with_context(|| format!("benchmarking {runtime}"))?;
        results.insert(runtime.into(), figures);
        for (check, ok) in found {
            let entry = checks.entry(check).or_insert(json!(true));
            *entry = json!(entry.as_bool().unwrap_or(false) && ok);
        }
    }
    checks.insert("leaks".into(), json!(leaks.count_printed()?));
    results.insert("checks".into(), checks.into());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    results.insert(
        "machine".into(),
        json!({ "cpus": cpus, "accelerator": spry_accelerator(&state.path().join("run")),
                "snapshotter": if spry_snapshotter { "spry (vm_images)" } else { "overlayfs" },
                "image_a": images.a, "image_b": images.b, "image_b_small_server": images.web, "registry": format!("A local (loopback), B over a {LINK_RATE} link") }),
    );
    results.insert("goals".into(), goals(&results));
    let report = serde_json::Value::Object(results);
    let md = markdown(&report);
    let name = if spry_snapshotter {
        "upgrade-spry-snapshotter"
    } else {
        "upgrade"
    };
    write_report(&root.join("target/bench"), name, &report, &md)
}

struct Images {
    a: String,
    b: String,
    /// The small server B (`webapp`).
    web: String,
    broken: String,
}

struct Bench<'a> {
    containerd: &'a Containerd,
    crictl: &'a Crictl,
    images: &'a Images,
    /// Spry's shared erofs layer images: cleared with B, so "not on the node" means that.
    layer_cache: PathBuf,
    /// Spry's config (where `spry upgrade` finds the layer images).
    spry_config: PathBuf,
    /// containerd's snapshotter when it is Spry's.
    snapshotter: Option<&'a spry_integration::snapshotter::Snapshotter>,
}

/// A pod serving A, and what the checks need.
struct ServingPod {
    id: String,
    config: PathBuf,
    dir: PathBuf,
    app: String,
    address: SocketAddr,
}

impl Bench<'_> {
    fn runtime(
        &self,
        runtime: &str,
        handler: Option<&str>,
    ) -> Result<(serde_json::Value, Vec<(String, bool)>)> {
        let mut checks = Vec::new();
        let tag = runtime.replace('_', "-");
        if runtime == "spry_template" {
            // The template is built on first use, outside the measured swaps.
            let warm = self.serving_pod(handler, &format!("{tag}-warm"))?;
            self.remove(&warm)?;
        }
        let is_spry = handler.is_some();

        // kubelet's sequence, B not on the node.
        self.forget_b()?;
        let pod = self.serving_pod(handler, &format!("{tag}-k"))?;
        let vms_before = self.vms()?;
        let image_ref_a = self.crictl.inspect(&pod.app)?["status"]["imageRef"].clone();
        let swap = self.kubelet_swap(&pod, &self.images.b, 1)?;
        let (inplace_ms, inplace_downtime_ms, b) =
            (swap.total_ms, swap.downtime_ms, swap.container);
        if is_spry {
            checks.push(("same_vm".into(), self.vms()? == vms_before));
        }
        checks.push(("same_ip".into(), self.address_of(&pod.id)? == pod.address));
        checks.push((
            "pod_shm_kept".into(),
            self.crictl
                .exec_ok(&b, &["cat", "/dev/shm/pod-file"])
                .is_ok_and(|s| s == "kept"),
        ));
        checks.push((
            "image_ref_changed".into(),
            self.crictl.inspect(&b)?["status"]["imageRef"] != image_ref_a,
        ));
        let attempt0 = std::fs::read_to_string(pod.dir.join("logs/app/0.log")).unwrap_or_default();
        checks.push(("attempt_log_kept".into(), attempt0.contains("serving")));
        self.remove(&pod)?;

        // kubelet's sequence, B pulled beforehand (its layers not yet packed by Spry).
        self.forget_layer_images()?;
        let pod = self.serving_pod(handler, &format!("{tag}-p"))?;
        let prepull_layer_images_ms = self.prepull(&self.images.b)?;
        let prepulled = self.kubelet_swap(&pod, &self.images.b, 1)?;
        let (inplace_prepulled_ms, inplace_prepulled_downtime_ms) =
            (prepulled.total_ms, prepulled.downtime_ms);
        self.remove(&pod)?;

        // Again, B's layer image kept from the pod just removed.
        let pod = self.serving_pod(handler, &format!("{tag}-p2"))?;
        let packed = self.kubelet_swap(&pod, &self.images.b, 1)?;
        self.remove(&pod)?;

        // Recreating the pod with B (B on the node, as after a rollout's first pod).
        self.forget_layer_images()?;
        let pod = self.serving_pod(handler, &format!("{tag}-r"))?;
        let recreated = self.recreate(&pod, handler, &tag, &self.images.b)?;
        let (recreate_ms, recreate_downtime_ms) = (recreated.total_ms, recreated.downtime_ms);

        // Both again with the small server B, pulled beforehand.
        self.prepull(&self.images.web)?;
        let pod = self.serving_pod(handler, &format!("{tag}-w"))?;
        let web = self.kubelet_swap(&pod, &self.images.web, 1)?;
        self.remove(&pod)?;
        self.forget_layer_images()?;
        let pod = self.serving_pod(handler, &format!("{tag}-wr"))?;
        let web_recreated = self.recreate(&pod, handler, &format!("{tag}-w"), &self.images.web)?;

        // spry upgrade, B not on the node, then a rollback from a broken image.
        self.forget_b()?;
        let pod = self.serving_pod(handler, &format!("{tag}-u"))?;
        let up = self.spry_upgrade(&pod, &self.images.b, 0)?;
        let rollback = self.spry_upgrade(&pod, &self.images.broken, 4)?;
        let restored = self.running_image(&pod)?;
        checks.push((
            "rollback_restores_old".into(),
            restored.contains("python") && answers(pod.address),
        ));
        // A second container in the running pod.
        let mut second = Vec::new();
        for i in 0..5 {
            second.push(self.second_container(&pod, i)?);
        }
        self.remove(&pod)?;
        eprintln!("{runtime}: in place {inplace_ms:.0} ms (down {inplace_downtime_ms:.0}), prepulled {inplace_prepulled_ms:.0} (down {inplace_prepulled_downtime_ms:.0}), recreate {recreate_ms:.0} (down {recreate_downtime_ms:.0}); small server in place {:.0}, recreate {:.0}; spry upgrade {:.0} (down {:.0})", web.total_ms, web_recreated.total_ms, up.total_ms, up.downtime_ms);
        Ok((
            json!({
                "inplace_ms": round(inplace_ms),
                "inplace_downtime_ms": round(inplace_downtime_ms),
                "inplace_prepulled_ms": round(inplace_prepulled_ms),
                "inplace_prepulled_downtime_ms": round(inplace_prepulled_downtime_ms),
                "inplace_phases_ms": swap.phases,
                "inplace_prepulled_phases_ms": prepulled.phases,
                "inplace_prepulled_packed_ms": round(packed.total_ms),
                "inplace_prepulled_packed_downtime_ms": round(packed.downtime_ms),
                "inplace_prepulled_packed_phases_ms": packed.phases,
                "prepull_layer_images_ms": prepull_layer_images_ms,
                "recreate_ms": round(recreate_ms),
                "recreate_downtime_ms": round(recreate_downtime_ms),
                "recreate_phases_ms": recreated.phases,
                "second_container_p50_ms": round(percentile(&second, 50.0)),
                "small_server": {
                    "inplace_prepulled_ms": round(web.total_ms),
                    "inplace_prepulled_downtime_ms": round(web.downtime_ms),
                    "inplace_prepulled_phases_ms": web.phases,
                    "recreate_ms": round(web_recreated.total_ms),
                    "recreate_downtime_ms": round(web_recreated.downtime_ms),
                    "recreate_phases_ms": web_recreated.phases,
                },
                "spry_upgrade": {
                    "total_ms": round(up.total_ms),
                    "downtime_ms": round(up.downtime_ms),
                    "phases_ms": up.phases,
                    "rollback_ms": round(rollback.rollback_ms),
                    "rollback_total_ms": round(rollback.total_ms),
                },
            }),
            checks,
        ))
    }

    /// Pulls `image` and, with Spry's snapshotter, waits for the layer images it builds
    /// after the pull: pulled beforehand means the node is done with it. Returns that
    /// wait (reported).
    fn prepull(&self, image: &str) -> Result<Option<f64>> {
        self.crictl.pull(image)?;
        Ok(match self.snapshotter {
            Some(s) => Some(round(ms(s.await_layer_images(READY_TIMEOUT)?))),
            None => None,
        })
    }

    /// B gone from containerd and from Spry's layer cache.
    fn forget_b(&self) -> Result<()> {
        let _ = self.crictl.run(&["rmi", &self.images.b]);
        self.forget_layer_images()
    }

    /// Spry's packed layer images gone (none in use: called between pods), so the next
    /// container packs its image's layers as on a node new to it.
    fn forget_layer_images(&self) -> Result<()> {
        if self.layer_cache.exists() {
            std::fs::remove_dir_all(&self.layer_cache)?;
        }
        Ok(())
    }

    fn serving_pod(&self, handler: Option<&str>, name: &str) -> Result<ServingPod> {
        let dir = self.containerd.dir().join(name);
        std::fs::create_dir_all(&dir)?;
        let config = PodConfig::new(name)
            .log_directory(&dir.join("logs"))
            .write_to(&dir)?;
        let id = self.crictl.runp(&config, handler)?;
        let app = self.start_app(&id, &config, &dir, &self.images.a, 0)?;
        let address = self.address_of(&id)?;
        wait_answer(address)?;
        self.crictl
            .exec_ok(&app, &["sh", "-c", "echo kept > /dev/shm/pod-file"])?;
        Ok(ServingPod {
            id,
            config,
            dir,
            app,
            address,
        })
    }

    fn start_app(
        &self,
        pod: &str,
        pod_config: &Path,
        dir: &Path,
        image: &str,
        attempt: u32,
    ) -> Result<String> {
        let id = self.create_app(pod, pod_config, dir, image, attempt)?;
        self.crictl.start(&id)?;
        Ok(id)
    }

    fn create_app(
        &self,
        pod: &str,
        pod_config: &Path,
        dir: &Path,
        image: &str,
        attempt: u32,
    ) -> Result<String> {
        let config = ContainerConfig::new("app", image)
            .command(&["sh", "-c", &format!("echo serving; {SERVER}")])
            .log_path(&format!("app/{attempt}.log"))
            .patch(json!({ "metadata": { "attempt": attempt } }))
            .write_to(dir)?;
        self.crictl.create(pod, &config, pod_config)
    }

    /// kubelet's order: stop, pull, create, start, each step timed.
    fn kubelet_swap(&self, pod: &ServingPod, image: &str, attempt: u32) -> Result<Swap> {
        let poller = Poller::start(pod.address);
        let started = Instant::now();
        let mut steps = Steps::new();
        self.crictl.stop(&pod.app, 2)?;
        steps.done("stop");
        self.crictl.pull(image)?;
        steps.done("pull");
        let b = self.create_app(&pod.id, &pod.config, &pod.dir, image, attempt)?;
        steps.done("create");
        self.crictl.start(&b)?;
        steps.done("start");
        wait_answer(pod.address)?;
        steps.done("ready");
        Ok(Swap {
            total_ms: ms(started.elapsed()),
            downtime_ms: poller.downtime_around(started, Instant::now())?,
            container: b,
            phases: steps.into_json(),
        })
    }

    fn recreate(
        &self,
        pod: &ServingPod,
        handler: Option<&str>,
        tag: &str,
        image: &str,
    ) -> Result<Swap> {
        let old = Poller::start(pod.address);
        let started = Instant::now();
        let mut steps = Steps::new();
        self.crictl.stopp(&pod.id)?;
        self.crictl.rmp(&pod.id)?;
        steps.done("remove");
        let name = format!("{tag}-r2");
        let dir = self.containerd.dir().join(&name);
        std::fs::create_dir_all(&dir)?;
        let config = PodConfig::new(&name)
            .log_directory(&dir.join("logs"))
            .write_to(&dir)?;
        let id = self.crictl.runp(&config, handler)?;
        let new = Poller::start(self.address_of(&id)?);
        steps.done("runp");
        let app = self.create_app(&id, &config, &dir, image, 0)?;
        steps.done("create");
        self.crictl.start(&app)?;
        steps.done("start");
        wait_answer(self.address_of(&id)?)?;
        steps.done("ready");
        let total = ms(started.elapsed());
        let first_new = new.first_answer_after(started)?;
        let last_old = old.finish().last_before(started).unwrap_or(started);
        let downtime = ms(first_new.saturating_duration_since(last_old));
        self.crictl.stopp(&id)?;
        self.crictl.rmp(&id)?;
        Ok(Swap {
            total_ms: total,
            downtime_ms: downtime,
            container: app,
            phases: steps.into_json(),
        })
    }

    fn spry_upgrade(&self, pod: &ServingPod, image: &str, exit: i32) -> Result<Upgrade> {
        let bin = spry_integration::spry::bin_dir("release").join("spry");
        let poller = Poller::start(pod.address);
        let started = Instant::now();
        let out = std::process::Command::new(&bin)
            .args([
                "upgrade",
                "--pod",
                &pod.id,
                "--container",
                "app",
                "--image",
                image,
            ])
            .args([
                "--ready-tcp",
                &PORT.to_string(),
                "--grace",
                "2s",
                "--timeout",
                "300s",
            ])
            .arg("--config")
            .arg(&self.spry_config)
            .arg("--runtime-endpoint")
            .arg(self.containerd.socket())
            .output()?;
        let total_ms = ms(started.elapsed());
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.code() == Some(exit),
            "spry upgrade to {image} exited {:?}, not {exit}:\n{text}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        wait_answer(pod.address)?;
        let phase = |name: &str| {
            text.lines()
                .find_map(|l| {
                    // "<phase>   0.123 s" (a note may follow)
                    let mut words = l.strip_prefix(name)?.split_whitespace();
                    let seconds = words.next()?.parse::<f64>().ok();
                    seconds.filter(|_| words.next() == Some("s"))
                })
                .map(|s| round(s * 1000.0))
        };
        let phases: serde_json::Map<String, serde_json::Value> = [
            "resolve", "pull", "create", "layers", "stop", "start", "ready",
        ]
        .iter()
        .filter_map(|p| Some(((*p).to_owned(), json!(phase(p)?))))
        .collect();
        // The old container stops once resolved, pulled and the new one created: the
        // downtime is around then. (While B is pulled, a guest serving 100 connections a
        // second on a loaded host may miss some; that is not the swap's downtime.)
        let before_stop: f64 = ["resolve", "pull", "create"]
            .iter()
            .filter_map(|p| phase(p))
            .sum();
        let stop_at = started + Duration::from_secs_f64(before_stop / 1000.0);
        Ok(Upgrade {
            total_ms,
            downtime_ms: poller.downtime_around(stop_at, Instant::now())?,
            rollback_ms: phase("rollback").unwrap_or(f64::NAN),
            phases: phases.into(),
        })
    }

    /// create → start → running, of a small second container in the pod.
    fn second_container(&self, pod: &ServingPod, i: usize) -> Result<f64> {
        let config = ContainerConfig::new(&format!("side{i}"), &self.images.a)
            .command(&["sh", "-c", "echo up; exec sleep 3600"])
            .log_path(&format!("side{i}.log"))
            .write_to(&pod.dir)?;
        let started = Instant::now();
        let id = self.crictl.create(&pod.id, &config, &pod.config)?;
        self.crictl.start(&id)?;
        self.crictl
            .wait_for_log(&id, "up", LOG_POLL, Duration::from_secs(60))
            .context("the second container never logged")?;
        Ok(ms(started.elapsed()))
    }

    fn running_image(&self, pod: &ServingPod) -> Result<String> {
        let running = self.crictl.ps(false)?;
        let app = running
            .iter()
            .find(|c| c["podSandboxId"] == pod.id.as_str() && c["metadata"]["name"] == "app")
            .context("no running app container")?;
        Ok(self
            .crictl
            .inspect(app["id"].as_str().unwrap_or_default())?["status"]["image"]["image"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    fn address_of(&self, pod: &str) -> Result<SocketAddr> {
        let ip = self.crictl.inspectp(pod)?["status"]["network"]["ip"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        Ok(SocketAddr::new(
            ip.parse().with_context(|| format!("pod IP {ip:?}"))?,
            PORT,
        ))
    }

    fn vms(&self) -> Result<Vec<i32>> {
        Ok(self.containerd.qemus()?.iter().map(|p| p.pid).collect())
    }

    fn remove(&self, pod: &ServingPod) -> Result<()> {
        self.crictl.stopp(&pod.id)?;
        self.crictl.rmp(&pod.id)
    }
}

/// kubelet's swap: what it took, and the new container.
struct Swap {
    total_ms: f64,
    downtime_ms: f64,
    container: String,
    phases: serde_json::Value,
}

/// Times the steps of a sequence one after another.
struct Steps {
    last: Instant,
    done: serde_json::Map<String, serde_json::Value>,
}

impl Steps {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            done: serde_json::Map::new(),
        }
    }

    fn done(&mut self, step: &str) {
        let now = Instant::now();
        self.done
            .insert(step.to_owned(), json!(round(ms(now - self.last))));
        self.last = now;
    }

    fn into_json(self) -> serde_json::Value {
        self.done.into()
    }
}

struct Upgrade {
    total_ms: f64,
    downtime_ms: f64,
    rollback_ms: f64,
    phases: serde_json::Value,
}

/// Connects to a pod's port every 10 ms in a thread, recording the answers.
struct Poller {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Instant>>>,
    thread: std::thread::JoinHandle<()>,
}

struct Answers {
    times: Vec<Instant>,
}

impl Answers {
    fn last_before(&self, t: Instant) -> Option<Instant> {
        self.times.iter().rev().find(|a| **a <= t).copied()
    }
}

impl Poller {
    fn start(address: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let record = Arc::new(Mutex::new(Vec::new()));
        let (flag, log) = (stop.clone(), record.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                if answers(address) {
                    log.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self {
            stop,
            answers: record,
            thread,
        }
    }

    fn finish(self) -> Answers {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let times = std::mem::take(&mut *self.answers.lock().unwrap_or_else(|p| p.into_inner()));
        Answers { times }
    }

    /// The poller's first answer after `t` (waiting for it).
    fn first_answer_after(&self, t: Instant) -> Result<Instant> {
        let first = system::wait_for(READY_TIMEOUT, || {
            let times = self.answers.lock().unwrap_or_else(|p| p.into_inner());
            Ok(times.iter().find(|a| **a > t).copied())
        })?;
        first.context("the pod never answered the poller")
    }

    /// The swap's downtime: the longest silence between two answers from the last answer
    /// at or before `t` (the swap's start: the old server still answers for a while after
    /// it) on, once an answer after `done` (the new server up) has been recorded.
    fn downtime_around(self, t: Instant, done: Instant) -> Result<f64> {
        self.first_answer_after(done)?;
        let answers = self.finish();
        let from = answers.last_before(t).unwrap_or(t);
        let mut times: Vec<Instant> = vec![from];
        times.extend(answers.times.iter().filter(|a| **a > from));
        Ok(times
            .windows(2)
            .map(|w| ms(w[1].saturating_duration_since(w[0])))
            .fold(0.0, f64::max))
    }
}

fn answers(address: SocketAddr) -> bool {
    TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_ok()
}

/// Waits until `address` answers, polling every 10 ms like the downtime client (the
/// harness's 100 ms `wait_for` would round every "ready" phase up to its tick).
fn wait_answer(address: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while !answers(address) {
        if Instant::now() >= deadline {
            bail!("nothing answers on {address}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn goals(results: &serde_json::Map<String, serde_json::Value>) -> serde_json::Value {
    let get = |rt: &str, key: &str| results[rt][key].as_f64().unwrap_or(f64::NAN);
    // Like for like: recreate_ms starts with B on the node, so it is set against the
    // in-place swap with B pulled beforehand (inplace_ms also pays B's pull).
    let spry_inplace = get("spry", "inplace_prepulled_ms");
    let upgrade_down = results["spry"]["spry_upgrade"]["downtime_ms"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let runc_down = get("runc", "inplace_downtime_ms");
    let second = get("spry", "second_container_p50_ms") / get("runc", "second_container_p50_ms");
    let small = |rt: &str, key: &str| {
        results[rt]["small_server"][key]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let small_inplace = small("spry", "inplace_prepulled_ms");
    json!({
        "spry_inplace_vs_cold_recreate": round(get("spry", "recreate_ms") / spry_inplace),
        "spry_inplace_vs_cold_recreate_goal": 3.0,
        "spry_inplace_faster_than_template_recreate":
            spry_inplace < get("spry_template", "recreate_ms"),
        "spry_inplace_vs_cold_recreate_small_server":
            round(small("spry", "recreate_ms") / small_inplace),
        "spry_inplace_faster_than_template_recreate_small_server":
            small_inplace < small("spry_template", "recreate_ms"),
        "spry_upgrade_downtime_le_runc_kubelet_downtime": upgrade_down <= runc_down,
        "second_container_vs_runc": round(second),
        "second_container_vs_runc_goal": 2.0,
    })
}

fn markdown(report: &serde_json::Value) -> String {
    let mut md = format!(
        "# In-place image swap, busybox → python and busybox → webapp (2 CPUs, Spry on {:?}, snapshotter {})\n\n\
         | metric | runc | spry (cold) | spry_template |\n|---|---|---|---|\n",
        report["machine"]["accelerator"].as_str().unwrap_or("?"),
        report["machine"]["snapshotter"].as_str().unwrap_or("?")
    );
    let row = |name: &str, get: &dyn Fn(&serde_json::Value) -> serde_json::Value| {
        let cell = |rt: &str| get(&report[rt]).to_string();
        format!(
            "| {name} | {} | {} | {} |\n",
            cell("runc"),
            cell("spry"),
            cell("spry_template")
        )
    };
    for key in [
        "inplace_ms",
        "inplace_downtime_ms",
        "inplace_prepulled_ms",
        "inplace_prepulled_downtime_ms",
        "inplace_prepulled_packed_ms",
        "inplace_prepulled_packed_downtime_ms",
        "prepull_layer_images_ms",
        "recreate_ms",
        "recreate_downtime_ms",
        "second_container_p50_ms",
    ] {
        md += &row(key, &|r| r[key].clone());
    }
    for key in [
        "inplace_prepulled_ms",
        "inplace_prepulled_downtime_ms",
        "recreate_ms",
        "recreate_downtime_ms",
    ] {
        md += &row(&format!("small server B: {key}"), &|r| {
            r["small_server"][key].clone()
        });
    }
    for key in ["total_ms", "downtime_ms", "rollback_ms"] {
        md += &row(&format!("spry upgrade {key}"), &|r| {
            r["spry_upgrade"][key].clone()
        });
    }
    md += &format!(
        "\ninplace_ms pays B's pull over the slow link; recreate_ms starts with B on the node, \
         so the goal sets it against inplace_prepulled_ms; both start with none of B's layers \
         packed by Spry, inplace_prepulled_packed_ms with B's layer image kept from the pod \
         before. \"small server B\" rows swap busybox \
         for webapp (busybox's httpd in another image) instead of python.\n\nChecks: {}\n\nGoals: {}\n",
        report["checks"], report["goals"]
    );
    md
}
