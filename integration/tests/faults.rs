//! The fault matrix (issue 17): QEMU, the shim and containerd are SIGKILLed while each step
//! of a Spry pod's life is in flight (template build, runp, create, start, exec, stop,
//! rmp). After each kill: crictl tells the truth (no pod reads ready and no container
//! running without a live VM), everything can be removed, the census (processes, mounts,
//! netns, taps, state dirs) is back to where it was, and a new pod starts.
//!
//! On a node whose Spry pods run an eStargz image through the lazy snapshotter (its layers
//! served to the VMs as erofs images), the snapshotter's `serve` process (restarted, as
//! systemd would) and the image's layer daemon (revived by the snapshotter when the layer
//! is next used) are the victims during create, start, exec and rmp. A running container
//! whose layer daemon died keeps a dead mount (I/O errors for what it had not read), so
//! for that victim a running container need not answer an exec.
//!
//! One test per victim, so two run at once. A step's CRI call races the kill: which one
//! wins varies, and each cell prints what the call returned. Needs root, the guest and the
//! test images.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use spry_integration::containerd_config::proxy_snapshotter_toml;
use spry_integration::spry::watch_pod_state;
use spry_integration::{
    require_root, system, ContainerConfig, Containerd, ContainerdOptions, Crictl, LeakCheck,
    PodConfig, Registry, SpryHandler,
};

mod lazy_pull_support;
use lazy_pull_support::Snapshotter;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Victim {
    Qemu,
    Shim,
    Containerd,
    /// `spry-snapshotter serve`.
    Snapshotter,
    /// The image layer's `spry-snapshotter mount-layer`.
    LayerDaemon,
}

/// In lifecycle order: a cell first takes the pod through the steps before its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// The first pod of a template handler on a fresh state dir builds the template.
    TemplateBuild,
    /// A cold-booted pod.
    Runp,
    Create,
    Start,
    Exec,
    Stop,
    Rmp,
}

const STEPS: [Step; 7] = [
    Step::TemplateBuild,
    Step::Runp,
    Step::Create,
    Step::Start,
    Step::Exec,
    Step::Stop,
    Step::Rmp,
];

/// The steps that touch a lazily pulled image.
const LAZY_STEPS: [Step; 4] = [Step::Create, Step::Start, Step::Exec, Step::Rmp];

/// How long a cell waits for things to settle (containerd noticing a dead shim, a
/// restarted containerd answering).
const SETTLE: Duration = Duration::from_secs(90);

struct Node {
    containerd: Containerd,
    crictl: Crictl,
    leaks: LeakCheck,
    image: String,
    /// On a lazy node: the snapshotter (dropped after containerd, with its daemons).
    snapshotter: Option<Snapshotter>,
    /// Mounts under the snapshotter's dir once the image was pulled (its layer, served).
    lazy_mounts: usize,
    _registry: Registry,
    state: tempfile::TempDir,
    _storage: Option<tempfile::TempDir>,
}

impl Node {
    fn start(name: &str) -> Result<Self> {
        require_root()?;
        let registry = Registry::start()?;
        let state = tempfile::Builder::new()
            .prefix(&format!("spry-{name}-"))
            .tempdir_in("/run")?;
        let spry = SpryHandler::new(state.path(), "debug", None)?;
        let cold = spry.variant("cold", "template = \"off\"")?;
        let opts = ContainerdOptions::new(name).registry(&registry);
        let containerd =
            Containerd::start(spry.register_variant(spry.register(opts), "spry-cold", &cold))?;
        let leaks = watch_pod_state(containerd.leak_check()?, state.path())?;
        let crictl = containerd.crictl().with_timeout(Duration::from_secs(180));
        let image = registry.image("busybox:1");
        crictl.pull(&image)?;
        Ok(Node {
            containerd,
            crictl,
            leaks,
            image,
            snapshotter: None,
            lazy_mounts: 0,
            _registry: registry,
            state,
            _storage: None,
        })
    }

    /// A node whose containerd pulls through the lazy snapshotter (VM images on), with
    /// busybox converted to eStargz in a registry of its own, pulled.
    fn start_lazy(name: &str) -> Result<Self> {
        require_root()?;
        let storage = tempfile::Builder::new()
            .prefix("spry-fault-reg-")
            .tempdir_in("/var/tmp")?;
        let registry = Registry::start_with_storage(storage.path())?;
        lazy_pull_support::push_layout(&registry, "pause")?;
        lazy_pull_support::push_layout(&registry, "busybox")?;
        lazy_pull_support::convert(&registry, "busybox", &[])?;
        // FUSE only: once the background fetch has the layer, a revived (or restarted) layer
        // would be mounted natively, with no daemon left to kill in the next cell.
        let snapshotter = Snapshotter::start("[lazy]\nvm_images = true\nnative_mounts = false\n")?;
        let state = tempfile::Builder::new()
            .prefix(&format!("spry-{name}-"))
            .tempdir_in("/run")?;
        let spry = SpryHandler::new(state.path(), "debug", None)?;
        let opts = ContainerdOptions::new(name)
            .registry(&registry)
            .snapshotter("spry")
            .extra_toml(&proxy_snapshotter_toml("spry", &snapshotter.socket()));
        let containerd = Containerd::start(spry.register(opts))?;
        let leaks = watch_pod_state(containerd.leak_check()?, state.path())?;
        let crictl = containerd.crictl().with_timeout(Duration::from_secs(180));
        let image = registry.image("busybox:estargz");
        crictl.pull(&image)?;
        let lazy_mounts = snapshotter.mounts_left().len();
        Ok(Node {
            containerd,
            crictl,
            leaks,
            image,
            snapshotter: Some(snapshotter),
            lazy_mounts,
            _registry: registry,
            state,
            _storage: Some(storage),
        })
    }

    fn snapshotter(&mut self) -> Result<&mut Snapshotter> {
        self.snapshotter.as_mut().context("not a lazy node")
    }

    fn pod_config(&self, name: &str) -> Result<std::path::PathBuf> {
        PodConfig::new(name).write_to(&self.containerd.dir())
    }

    fn sleeper_config(&self) -> Result<std::path::PathBuf> {
        ContainerConfig::new("sleeper", &self.image)
            .command(&["sleep", "3600"])
            .write_to(&self.containerd.dir())
    }

    /// `crictl ARGS` in the background.
    fn spawn(&self, args: &[&str]) -> Result<Child> {
        Ok(self
            .crictl
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    /// Runs one cell; a line saying what the step's call returned.
    fn cell(&mut self, victim: Victim, step: Step) -> Result<String> {
        let name = format!("{victim:?}-{step:?}").to_lowercase();
        let pod_cfg = self.pod_config(&name)?;
        let handler = if step == Step::Runp {
            "spry-cold"
        } else {
            "spry"
        };
        let mut pod = None;
        let mut ctr = None;
        if step >= Step::Create {
            pod = Some(self.crictl.runp(&pod_cfg, Some(handler))?);
        }
        let ctr_cfg = self.sleeper_config()?;
        if step >= Step::Start {
            let id = self
                .crictl
                .create(pod.as_deref().unwrap(), &ctr_cfg, &pod_cfg)?;
            ctr = Some(id);
        }
        if step >= Step::Exec {
            self.crictl.start(ctr.as_deref().unwrap())?;
        }
        let (pod_s, ctr_s) = (
            pod.clone().unwrap_or_default(),
            ctr.clone().unwrap_or_default(),
        );
        let pod_cfg_s = pod_cfg.display().to_string();
        let ctr_cfg_s = ctr_cfg.display().to_string();
        let args: Vec<&str> = match step {
            Step::TemplateBuild | Step::Runp => vec!["runp", "--runtime", handler, &pod_cfg_s],
            Step::Create => vec!["create", &pod_s, &ctr_cfg_s, &pod_cfg_s],
            Step::Start => vec!["start", &ctr_s],
            Step::Exec => vec!["exec", &ctr_s, "sh", "-c", "sleep 2; echo exec done"],
            Step::Stop => vec!["stop", "--timeout", "1", &ctr_s],
            Step::Rmp => vec!["rmp", "--force", &pod_s],
        };
        // A booting pod's shim and QEMU are the ones that were not there before its call.
        let before: Vec<i32> = self
            .victims(Victim::Shim)?
            .into_iter()
            .chain(self.victims(Victim::Qemu)?)
            .collect();
        let call = self.spawn(&args)?;
        self.kill_in_flight(victim, step, &before)?;
        let out = wait_output(call, Duration::from_secs(180))?;
        let outcome = format!(
            "{victim:?} killed during {step:?}: the call {}",
            if out.status.success() {
                "succeeded".to_string()
            } else {
                format!(
                    "failed ({})",
                    String::from_utf8_lossy(&out.stderr)
                        .trim()
                        .lines()
                        .last()
                        .unwrap_or("")
                )
            }
        );
        self.check_truth(victim != Victim::LayerDaemon)
            .with_context(|| outcome.clone())?;
        self.remove_all().with_context(|| outcome.clone())?;
        self.leaks
            .assert_clean()
            .map_err(|e| self.with_log_of_leaked_shims(e))
            .with_context(|| format!("the census after: {outcome}"))?;
        self.new_pod_works(&name).with_context(|| outcome.clone())?;
        self.leaks
            .assert_clean()
            .with_context(|| format!("the census after the new pod: {outcome}"))?;
        if let Some(snapshotter) = &self.snapshotter {
            // A dead daemon's mounts are replaced, not stacked.
            let mounts = snapshotter.mounts_left();
            ensure!(
                mounts.len() == self.lazy_mounts && !snapshotter.layer_daemons().is_empty(),
                "{outcome}: the snapshotter holds {} mounts (had {}) and daemons {:?}:\n{}",
                mounts.len(),
                self.lazy_mounts,
                snapshotter.layer_daemons(),
                mounts.join("\n")
            );
        }
        Ok(outcome)
    }

    /// Whether a template build's VM is up (its state dir, named `_template-<key>`).
    fn template_build_running(&self) -> bool {
        std::fs::read_dir(self.state.path().join("run/vms"))
            .map(|entries| {
                entries.flatten().any(|entry| {
                    entry
                        .file_name()
                        .to_string_lossy()
                        .starts_with("_template-")
                })
            })
            .unwrap_or(false)
    }

    /// Live shims or QEMUs of this node.
    fn victims(&self, kind: Victim) -> Result<Vec<i32>> {
        let procs = match kind {
            Victim::Qemu => self.containerd.qemus()?,
            _ => self.containerd.shims()?,
        };
        Ok(procs.iter().map(|p| p.pid).collect())
    }

    /// The snapshotter's victims: its `serve` process or the image layer's daemon.
    fn snapshotter_victim(&self, victim: Victim) -> Option<i32> {
        let snapshotter = self.snapshotter.as_ref()?;
        match victim {
            Victim::Snapshotter => snapshotter.pid(),
            _ => snapshotter.layer_daemons().first().copied(),
        }
    }

    /// Waits until the step is in flight (while booting: until the victim, or for
    /// containerd the pod's shim, exists; for a template build, also its VM), then kills
    /// the victim; a killed containerd is
    /// started again, as systemd would.
    fn kill_in_flight(&mut self, victim: Victim, step: Step, before: &[i32]) -> Result<()> {
        let booting = matches!(step, Step::TemplateBuild | Step::Runp);
        let started = Instant::now();
        let pid = loop {
            let watched = if victim == Victim::Qemu {
                Victim::Qemu
            } else {
                Victim::Shim
            };
            let found = self
                .victims(watched)?
                .into_iter()
                .find(|pid| !booting || !before.contains(pid));
            let pid = match (victim, found) {
                (Victim::Containerd, Some(_)) => self.containerd.pid().map(|p| p as i32),
                (Victim::Snapshotter | Victim::LayerDaemon, _) => self.snapshotter_victim(victim),
                (_, found) => found,
            };
            // A template build is killed in the middle: once its VM is up.
            let in_flight = step != Step::TemplateBuild || self.template_build_running();
            match pid.filter(|_| in_flight) {
                Some(pid) => {
                    if !booting {
                        // The other calls take tens of ms to seconds: land inside them.
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    break pid;
                }
                None if started.elapsed() > Duration::from_secs(120) => {
                    bail!("no {victim:?} appeared during {step:?}")
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        if victim == Victim::Snapshotter {
            let snapshotter = self.snapshotter()?;
            snapshotter.kill()?;
            return snapshotter.spawn();
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        if victim == Victim::Containerd {
            let gone = system::wait_for(Duration::from_secs(10), || {
                Ok((!system::process_alive(pid)).then_some(()))
            })?;
            gone.context("containerd outlived SIGKILL")?;
            self.containerd.restart()?;
        }
        Ok(())
    }

    /// No pod reads ready without its VM, and (with `exec_answers`) no container reads
    /// running unless it answers an exec; waits for containerd to notice what died.
    fn check_truth(&self, exec_answers: bool) -> Result<()> {
        let mut last = String::new();
        let settled = system::wait_for(SETTLE, || {
            let qemus = self.containerd.qemus()?;
            let mut lies = Vec::new();
            for pod in self.crictl.pods()? {
                let id = pod["id"].as_str().unwrap_or_default();
                let vm = format!("spry-{}", &id[..12.min(id.len())]);
                let has_vm = qemus.iter().any(|q| q.cmdline_contains(&vm));
                if pod["state"] == "SANDBOX_READY" && !has_vm {
                    lies.push(format!("pod {id} reads ready without a VM"));
                }
            }
            for ctr in self.crictl.ps(true)? {
                let id = ctr["id"].as_str().unwrap_or_default();
                let answers = |id: &str| {
                    self.crictl
                        .exec_sync(id, &["true"], Duration::from_secs(20))
                        .is_ok_and(|out| out.code == 0)
                };
                if exec_answers && ctr["state"] == "CONTAINER_RUNNING" && !answers(id) {
                    lies.push(format!("container {id} reads running but answers no exec"));
                }
            }
            last = lies.join("; ");
            Ok(lies.is_empty().then_some(()))
        })?;
        settled.with_context(|| format!("crictl still lies after {} s: {last}", SETTLE.as_secs()))
    }

    /// Removes every container and pod, retrying while containerd catches up.
    fn remove_all(&self) -> Result<()> {
        let mut last = String::new();
        let removed = system::wait_for(SETTLE, || {
            let mut errors = Vec::new();
            for ctr in self.crictl.ps(true)? {
                let id = ctr["id"].as_str().unwrap_or_default();
                if let Err(e) = self.crictl.run(&["rm", "--force", id]) {
                    errors.push(format!("rm {id}: {e:#}"));
                }
            }
            for pod in self.crictl.pods()? {
                let id = pod["id"].as_str().unwrap_or_default();
                if let Err(e) = self.crictl.run(&["rmp", "--force", id]) {
                    errors.push(format!("rmp {id}: {e:#}"));
                }
            }
            last = errors.join("; ");
            let empty = self.crictl.pods()?.is_empty() && self.crictl.ps(true)?.is_empty();
            Ok(empty.then_some(()))
        })?;
        removed.with_context(|| format!("pods not removable within {} s: {last}", SETTLE.as_secs()))
    }

    /// `err` (a census failure) with containerd's log lines about each leaked shim's id.
    /// containerd's lines about every task a leak names (a shim's `-id`, a container's
    /// bundle in a mount's path), in order.
    fn with_log_of_leaked_shims(&self, err: anyhow::Error) -> anyhow::Error {
        let text = format!("{err:#}");
        let ids = task_ids_in(&text);
        let log = self.containerd.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| ids.iter().any(|id| l.contains(id.as_str())))
            .collect();
        err.context(format!(
            "containerd's log about the leaked tasks:\n{}",
            lines.join("\n")
        ))
    }

    fn new_pod_works(&self, name: &str) -> Result<()> {
        let pod_cfg = self.pod_config(&format!("{name}-after"))?;
        let pod = self.crictl.runp(&pod_cfg, Some("spry"))?;
        let ctr = self
            .crictl
            .create(&pod, &self.sleeper_config()?, &pod_cfg)?;
        self.crictl.start(&ctr)?;
        let out = self.crictl.exec_ok(&ctr, &["echo", "alive"])?;
        ensure!(out == "alive", "exec in the new pod printed {out:?}");
        self.crictl.rmp_all_force()?;
        Ok(())
    }
}

/// The 64-hex-digit task ids in `text`, each once.
fn task_ids_in(text: &str) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for word in text.split(|c: char| !c.is_ascii_hexdigit()) {
        if word.len() == 64 && !ids.iter().any(|id| id == word) {
            ids.push(word.to_string());
        }
    }
    ids
}

fn wait_output(mut child: Child, timeout: Duration) -> Result<std::process::Output> {
    let done = system::wait_for(timeout, || Ok(child.try_wait()?))?;
    if done.is_none() {
        let _ = child.kill();
        let out = child.wait_with_output()?;
        bail!(
            "the call hung past {} s: {}",
            timeout.as_secs(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(child.wait_with_output()?)
}

fn matrix(victim: Victim) -> Result<()> {
    let name = format!("fault-{victim:?}").to_lowercase();
    let (mut node, all_steps): (Node, &[Step]) = match victim {
        Victim::Snapshotter | Victim::LayerDaemon => (Node::start_lazy(&name)?, &LAZY_STEPS),
        _ => (Node::start(&name)?, &STEPS),
    };
    let mut failures = Vec::new();
    // SPRY_FAULT_STEPS=Runp,Exec narrows a run to those cells (for debugging one).
    let only = std::env::var("SPRY_FAULT_STEPS").ok();
    let steps = all_steps.iter().copied().filter(|s| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|w| w == format!("{s:?}")))
    });
    for step in steps {
        match node.cell(victim, step) {
            Ok(outcome) => eprintln!("fault matrix: {outcome}: ok"),
            Err(e) => {
                eprintln!("fault matrix: {victim:?} during {step:?}: FAILED: {e:#}");
                failures.push(format!("{step:?}: {e:#}"));
                // The next cell starts from a clean node, or the rest would fail for this.
                let _ = node.remove_all();
            }
        }
    }
    ensure!(
        failures.is_empty(),
        "{victim:?} killed: {} of {} cells failed:\n{}\ncontainerd log tail:\n{}",
        failures.len(),
        all_steps.len(),
        failures.join("\n"),
        node.containerd.log_tail(40)
    );
    Ok(())
}

#[test]
fn qemu_killed_at_every_step() -> Result<()> {
    matrix(Victim::Qemu)
}

#[test]
fn the_shim_killed_at_every_step() -> Result<()> {
    matrix(Victim::Shim)
}

#[test]
fn containerd_killed_at_every_step() -> Result<()> {
    matrix(Victim::Containerd)
}

#[test]
fn the_lazy_snapshotter_killed_at_every_step() -> Result<()> {
    matrix(Victim::Snapshotter)
}

#[test]
fn a_lazy_layers_daemon_killed_at_every_step() -> Result<()> {
    matrix(Victim::LayerDaemon)
}
