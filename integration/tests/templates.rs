//! VM templates through stock containerd 2.x and crictl: pods restored from a template get
//! their own identity, a damaged template never fails a pod, and concurrent shims build one
//! template. Needs root, scripts/install-deps.sh, scripts/build-guest.sh and
//! scripts/build-test-images.sh; fails (never skips) without them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use spry_integration::spry::watch_pod_state;
use spry_integration::{
    require_root, system, ContainerConfig, Containerd, ContainerdOptions, Crictl, PodConfig,
    Registry, SpryHandler,
};

/// A containerd whose `spry` handler uses templates (the default), state under `state`.
struct Setup {
    containerd: Containerd,
    crictl: Crictl,
    image: String,
    templates: PathBuf,
    state: PathBuf,
    _registry: Registry,
}

fn setup(name: &str, state: &Path) -> Result<Setup> {
    let registry = Registry::start()?;
    let spry = SpryHandler::new(state, "debug", None)?;
    let containerd = Containerd::start(
        spry.register(ContainerdOptions::new(name).registry(&registry))
            .env("SPRY_LOG", "info"),
    )?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(180));
    let image = registry.image("busybox:1");
    crictl.pull(&image)?;
    Ok(Setup {
        containerd,
        crictl,
        image,
        templates: state.join("run/templates"),
        state: state.to_path_buf(),
        _registry: registry,
    })
}

/// What a container in a pod saw of its VM.
#[derive(Debug)]
struct PodReport {
    hostname: String,
    random_hex: String,
    guest_time: f64,
    host_before: f64,
    host_after: f64,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

impl Setup {
    /// Runs a pod with hostname `hostname` and a container that reports hostname, 16 random
    /// bytes and the guest clock; removes the pod.
    fn report(&self, hostname: &str) -> Result<PodReport> {
        self.report_holding(hostname, || Ok(()))
    }

    /// Like `report`, running `while_up` before the pod is removed (its shim still alive).
    fn report_holding(
        &self,
        hostname: &str,
        while_up: impl FnOnce() -> Result<()>,
    ) -> Result<PodReport> {
        let dir = self.containerd.dir();
        let pod_cfg = PodConfig::new(hostname).hostname(hostname).write_to(&dir)?;
        let pod = self
            .crictl
            .runp(&pod_cfg, Some("spry"))
            .with_context(|| self.containerd.log_tail(40))?;
        let cfg = ContainerConfig::new("report", &self.image)
            .command(&[
                "sh",
                "-c",
                "hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; adjtimex | grep -E 'tv_(sec|usec)'",
            ])
            .write_to(&dir)?;
        let container = self.crictl.create(&pod, &cfg, &pod_cfg)?;
        let host_before = unix_now();
        self.crictl.start(&container)?;
        self.crictl.wait_container_state(
            &container,
            "CONTAINER_EXITED",
            Duration::from_secs(60),
        )?;
        let host_after = unix_now();
        let logs = self.crictl.logs(&container)?;
        let held = while_up();
        self.crictl.stopp(&pod)?;
        self.crictl.rmp(&pod)?;
        held?;
        parse_report(&logs, host_before, host_after)
    }

    /// How often the shims logged `needle` (their logs reach containerd's).
    fn log_count(&self, needle: &str) -> usize {
        self.containerd.log().matches(needle).count()
    }

    /// The templates in the store (`spry template ls` reads the same dirs).
    fn template_dirs(&self) -> Vec<PathBuf> {
        system::list_dir(&self.templates)
            .into_iter()
            .filter(|p| p.is_dir())
            .collect()
    }

    /// Nothing of a pod VM is left: no VM or rootfs state, no half-built template, no QEMU.
    fn assert_no_vm_leftovers(&self) -> Result<()> {
        let run = self.state.join("run");
        let leftovers: Vec<PathBuf> = ["vms", "rootfs"]
            .iter()
            .flat_map(|d| system::list_dir(&run.join(d)))
            .chain(
                system::list_dir(&self.templates)
                    .into_iter()
                    .filter(|p| p.to_string_lossy().contains("/.build-")),
            )
            .collect();
        ensure!(leftovers.is_empty(), "VM state left: {leftovers:?}");
        let qemus: Vec<String> = self
            .containerd
            .qemus()?
            .iter()
            .map(|p| p.describe())
            .collect();
        ensure!(qemus.is_empty(), "QEMU left: {qemus:?}");
        Ok(())
    }
}

fn parse_report(logs: &str, host_before: f64, host_after: f64) -> Result<PodReport> {
    let mut lines = logs.lines().map(str::trim);
    let hostname = lines.next().unwrap_or_default().to_owned();
    let random_hex = lines.next().unwrap_or_default().to_owned();
    let field = |name: &str| -> Result<f64> {
        logs.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {name} in {logs:?}"))
    };
    let guest_time = field("time.tv_sec:")? + field("time.tv_usec:")? / 1e6;
    ensure!(random_hex.len() == 32, "random bytes: {logs:?}");
    Ok(PodReport {
        hostname,
        random_hex,
        guest_time,
        host_before,
        host_after,
    })
}

#[test]
fn template_pods_have_their_own_identity_clock_and_randomness() -> Result<()> {
    require_root()?;
    let state = tempfile::Builder::new()
        .prefix("spry-tpl-")
        .tempdir_in("/run")?;
    let s = setup("spry-tpl", state.path())?;
    let leaks = watch_pod_state(s.containerd.leak_check()?, &s.state)?;

    let mut reports = Vec::new();
    for i in 0..10 {
        let hostname = format!("tpl-pod-{i}");
        let report = s.report(&hostname)?;
        ensure!(report.hostname == hostname, "pod {i}: {report:?}");
        // Within 1 s of the host's clock, sampled around the container's run.
        ensure!(
            report.guest_time >= report.host_before - 1.0
                && report.guest_time <= report.host_after + 1.0,
            "pod {i}: guest clock off: {report:?}"
        );
        reports.push(report);
    }
    let mut randoms: Vec<&str> = reports.iter().map(|r| r.random_hex.as_str()).collect();
    randoms.sort();
    randoms.dedup();
    ensure!(randoms.len() == 10, "clones shared RNG output: {reports:?}");

    // The first pod built the template, every pod was restored from it.
    ensure!(
        s.log_count("VM template built") == 1,
        "{}",
        s.containerd.log_tail(60)
    );
    ensure!(
        s.log_count("sandbox restored from template") == 10,
        "not every pod was restored: {}",
        s.containerd.log_tail(60)
    );
    ensure!(s.template_dirs().len() == 1, "{:?}", s.template_dirs());
    s.assert_no_vm_leftovers()?;
    leaks.assert_clean()?;
    Ok(())
}

#[test]
fn a_corrupted_template_gives_a_cold_pod_one_warning_and_a_rebuild() -> Result<()> {
    require_root()?;
    let state = tempfile::Builder::new()
        .prefix("spry-tplbad-")
        .tempdir_in("/run")?;
    let s = setup("spry-tplbad", state.path())?;
    let leaks = watch_pod_state(s.containerd.leak_check()?, &s.state)?;
    s.report("first")?;
    let templates = s.template_dirs();
    ensure!(templates.len() == 1, "{templates:?}");
    let memory = templates[0].join("memory");
    let built_at = std::fs::metadata(templates[0].join("manifest.json"))?.modified()?;

    // Scribble over guest RAM in the template.
    let mut file = std::fs::OpenOptions::new().write(true).open(&memory)?;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(1 << 20))?;
    std::io::Write::write_all(&mut file, &[0xA5; 64 * 1024])?;
    drop(file);

    // The pod boots cold; its shim rebuilds the template in the background while it runs.
    let report = s.report_holding("after-corruption", || {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let dirs = s.template_dirs();
            let rebuilt = dirs.len() == 1
                && std::fs::metadata(dirs[0].join("manifest.json"))
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t > built_at);
            if rebuilt {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "template not rebuilt in the background: {}",
                s.containerd.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    })?;
    ensure!(report.hostname == "after-corruption", "{report:?}");
    let log = s.containerd.log();
    let template_warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("template"))
        .collect();
    ensure!(
        template_warnings.len() == 1,
        "expected one template warning: {template_warnings:#?}"
    );
    ensure!(
        s.log_count("VM template rebuilt") == 1,
        "{}",
        s.containerd.log_tail(40)
    );

    let restored_before = s.log_count("sandbox restored from template");
    s.report("after-rebuild")?;
    ensure!(
        s.log_count("sandbox restored from template") == restored_before + 1,
        "the pod after the rebuild was not restored: {}",
        s.containerd.log_tail(60)
    );
    ensure!(s.template_dirs().len() == 1, "{:?}", s.template_dirs());
    s.assert_no_vm_leftovers()?;
    leaks.assert_clean()?;
    Ok(())
}

#[test]
fn two_pods_starting_at_once_build_exactly_one_template() -> Result<()> {
    require_root()?;
    let state = tempfile::Builder::new()
        .prefix("spry-tplrace-")
        .tempdir_in("/run")?;
    let s = setup("spry-tplrace", state.path())?;
    let leaks = watch_pod_state(s.containerd.leak_check()?, &s.state)?;
    ensure!(s.template_dirs().is_empty());

    let reports = std::thread::scope(|scope| {
        let a = scope.spawn(|| s.report("race-a"));
        let b = scope.spawn(|| s.report("race-b"));
        (a.join(), b.join())
    });
    let (Ok(a), Ok(b)) = reports else {
        bail!("a pod thread panicked")
    };
    let (a, b) = (a?, b?);
    ensure!(
        a.hostname == "race-a" && b.hostname == "race-b",
        "{a:?} {b:?}"
    );
    ensure!(
        s.template_dirs().len() == 1,
        "templates: {:?}",
        s.template_dirs()
    );
    ensure!(
        s.log_count("VM template built") == 1,
        "{}",
        s.containerd.log_tail(60)
    );
    s.assert_no_vm_leftovers()?;
    leaks.assert_clean()?;
    Ok(())
}
