//! The quickstart's pod: starts a private containerd 2.x (its own socket, root and state;
//! a system containerd is never touched) with the runtime handler `spry install` wrote,
//! runs a sandboxed pod through crictl, prints its output and leaves that containerd
//! running for the user to try; `stop` takes it down with everything it made.
//!
//! Usage (run by scripts/quickstart.sh):
//!   quickstart run --handler-toml FILE --spry-config FILE [--home DIR]
//!   quickstart stop [--home DIR]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use spry_integration::{
    paths, require_root, ContainerConfig, Containerd, ContainerdOptions, PodConfig, Registry,
};

/// The quickstart's files (installed prefix, configs, containerd's root, examples).
const DEFAULT_HOME: &str = "/var/lib/spry-quickstart";
/// containerd's socket and state: tmpfs, and a short path for the socket.
const RUN_DIR: &str = "/run/spry-quickstart";
/// What the pod needs from the local registry (the quickstart builds only these).
const IMAGES: &[&str] = &["pause:1", "busybox:1"];

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let mut handler_toml = None;
    let mut spry_config = None;
    let mut home = PathBuf::from(DEFAULT_HOME);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--handler-toml" => handler_toml = Some(PathBuf::from(value()?)),
            "--spry-config" => spry_config = Some(PathBuf::from(value()?)),
            "--home" => home = PathBuf::from(value()?),
            other => bail!("unknown argument {other}"),
        }
    }
    require_root()?;
    match command.as_str() {
        "run" => run(
            &home,
            &handler_toml.context("--handler-toml is required")?,
            &spry_config.context("--spry-config is required")?,
        ),
        "stop" => stop(&home).map(|stopped| {
            if !stopped {
                eprintln!("quickstart: no quickstart containerd is running");
            }
        }),
        other => bail!("unknown command {other:?}: use `run` or `stop`"),
    }
}

fn options(home: &Path) -> ContainerdOptions {
    ContainerdOptions::new("quickstart").fixed_dirs(&home.join("containerd"), Path::new(RUN_DIR))
}

/// Stops the containerd an earlier `run` left: its pods, shims, VMs, mounts, bridge and
/// dirs go with it, and the warm-pool spares its pods' `start`s made (a user may have
/// given the handler a `[pool]`). Returns whether there was one.
fn stop(home: &Path) -> Result<bool> {
    let Some(mut containerd) = Containerd::adopt(options(home))? else {
        return Ok(false);
    };
    eprintln!(
        "quickstart: stopping the quickstart containerd{} and removing its pods",
        containerd
            .pid()
            .map(|pid| format!(" (pid {pid})"))
            .unwrap_or_default()
    );
    let drained = drain_spares(home, &containerd.socket());
    let cleaned = containerd.cleanup();
    drained.and(cleaned)?;
    Ok(true)
}

/// Ends the spares made for `containerd`'s pods under the state dir of the quickstart's
/// Spry config (the handler's `ConfigPath`).
fn drain_spares(home: &Path, containerd: &Path) -> Result<()> {
    let path = home.join("spry.toml");
    if !path.exists() {
        return Ok(());
    }
    let config = spry_shim::config::Config::load_required(&path)
        .with_context(|| format!("reading {} to end its warm pool", path.display()))?;
    let ended = spry_integration::spry::drain_pool_for(&config.state_dir, containerd)?;
    if ended > 0 {
        eprintln!("quickstart: ended {ended} warm-pool spare(s) and their VMs");
    }
    Ok(())
}

fn run(home: &Path, handler_toml: &Path, spry_config: &Path) -> Result<()> {
    if stop(home)? {
        eprintln!("quickstart: (it was left by an earlier run)");
    }
    if Path::new("/run/containerd/containerd.sock").exists() {
        eprintln!(
            "quickstart: a system containerd is running; it is left alone (a private one is used)"
        );
    }
    let handler = std::fs::read_to_string(handler_toml)
        .with_context(|| format!("reading {}", handler_toml.display()))?;

    let registry = Registry::start_with_images(IMAGES)?;
    let started = Instant::now();
    let mut containerd = Containerd::start(
        options(home)
            .registry(&registry)
            .extra_toml(&handler)
            .env("SPRY_CONFIG", &spry_config.display().to_string()),
    )?;
    eprintln!(
        "quickstart: containerd {} ready on {} in {:.1} s",
        containerd
            .crictl()
            .version()
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("RuntimeVersion:"))
            .unwrap_or("?")
            .trim(),
        containerd.socket().display(),
        started.elapsed().as_secs_f64()
    );
    let image = registry.image("busybox:1");
    let result = run_pod(&containerd, &image)
        .and_then(|()| write_examples(home, &image, &containerd.socket()));
    match result {
        Ok(examples) => {
            containerd.keep_running()?;
            print_next_steps(&examples);
            Ok(())
        }
        Err(e) => {
            eprintln!("--- containerd log (tail) ---\n{}", containerd.log_tail(30));
            containerd.cleanup()?;
            Err(e)
        }
    }
}

fn run_pod(containerd: &Containerd, image: &str) -> Result<()> {
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(180));
    crictl.pull(image)?;
    let pod_cfg = PodConfig::new("quickstart")
        .hostname("spry-quickstart")
        .write_to(&containerd.dir())?;
    eprintln!("quickstart: crictl runp --runtime spry (starts the pod's microVM)");
    let started = Instant::now();
    let pod = crictl.runp(&pod_cfg, Some("spry"))?;
    eprintln!(
        "quickstart: pod {} ready in {:.1} s",
        &pod[..12.min(pod.len())],
        started.elapsed().as_secs_f64()
    );
    let cfg = ContainerConfig::new("hello", image)
        .command(&[
            "sh",
            "-c",
            "echo \"Hello from a Spry pod ($(hostname))\"; echo \"guest kernel: $(uname -r)\"; \
             echo \"guest CPUs: $(nproc), memory: $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2) kB\"",
        ])
        .write_to(&containerd.dir())?;
    let id = crictl.create(&pod, &cfg, &pod_cfg)?;
    crictl.start(&id)?;
    crictl.wait_container_state(&id, "CONTAINER_EXITED", Duration::from_secs(60))?;
    eprintln!(
        "quickstart: container ran in {:.1} s; removing the pod",
        started.elapsed().as_secs_f64()
    );
    let logs = crictl.logs(&id)?;
    println!("{}", logs.trim_end());
    println!(
        "host kernel:  {}",
        nix::sys::utsname::uname()?.release().to_string_lossy()
    );
    crictl.rm(&id)?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    ensure!(logs.contains("guest kernel:"), "the pod printed nothing");
    Ok(())
}

/// A pod, a long-running container and a crictl config for the user's own tries.
fn write_examples(home: &Path, image: &str, socket: &Path) -> Result<PathBuf> {
    let dir = home.join("examples");
    let crictl_yaml = dir.join("crictl.yaml");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Pods are VMs: crictl's default 2 s timeout is too short for a cold one under TCG.
    std::fs::write(
        &crictl_yaml,
        format!(
            "runtime-endpoint: unix://{socket}\nimage-endpoint: unix://{socket}\ntimeout: 120\n",
            socket = socket.display()
        ),
    )
    .with_context(|| format!("writing {}", crictl_yaml.display()))?;
    PodConfig::new("try-spry")
        .hostname("try-spry")
        .write_to(&dir)?;
    ContainerConfig::new("shell", image)
        .command(&["sleep", "3600"])
        .write_to(&dir)?;
    Ok(dir)
}

fn print_next_steps(examples: &Path) {
    let crictl = paths::crictl_bin();
    let (pod, ctr) = (
        examples.join("pod-try-spry.json"),
        examples.join("ctr-shell.json"),
    );
    println!(
        "\n== next: the quickstart's containerd keeps running; try Spry with crictl\n\
         \x20 alias crictl='{crictl} --config {config}'\n\
         \x20 POD=$(crictl runp --runtime spry {pod})\n\
         \x20 CTR=$(crictl create $POD {ctr} {pod}) && crictl start $CTR\n\
         \x20 crictl exec -it $CTR sh        # a shell in a container inside the pod's microVM\n\
         \x20 stop it:  scripts/quickstart.sh --stop    (removes its pods and VMs, stops containerd)\n\
         \x20 clean up: scripts/quickstart.sh --clean   (also removes {home}; build/ and target/ stay)",
        crictl = crictl.display(),
        config = examples.join("crictl.yaml").display(),
        pod = pod.display(),
        ctr = ctr.display(),
        home = examples.parent().unwrap_or(examples).display(),
    );
}
