//! The quickstart's pod: starts a private containerd 2.x (its own socket, root and state;
//! a system containerd is never touched) with the runtime handler `spry install` wrote,
//! runs a sandboxed pod through crictl and prints its output.
//!
//! Usage: quickstart --handler-toml FILE --spry-config FILE   (run by scripts/quickstart.sh)

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use spry_integration::{
    require_root, ContainerConfig, Containerd, ContainerdOptions, PodConfig, Registry,
};

fn main() -> Result<()> {
    let mut handler_toml = None;
    let mut spry_config = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--handler-toml" => handler_toml = args.next().map(PathBuf::from),
            "--spry-config" => spry_config = args.next().map(PathBuf::from),
            other => bail!("unknown argument {other}"),
        }
    }
    let handler_toml = handler_toml.context("--handler-toml is required")?;
    let spry_config = spry_config.context("--spry-config is required")?;
    require_root()?;
    if std::path::Path::new("/run/containerd/containerd.sock").exists() {
        eprintln!(
            "quickstart: a system containerd is running; it is left alone (a private one is used)"
        );
    }
    let handler = std::fs::read_to_string(&handler_toml)
        .with_context(|| format!("reading {}", handler_toml.display()))?;

    let registry = Registry::start()?;
    let mut containerd = Containerd::start(
        ContainerdOptions::new("quickstart")
            .registry(&registry)
            .extra_toml(&handler)
            .env("SPRY_CONFIG", &spry_config.display().to_string()),
    )?;
    eprintln!(
        "quickstart: containerd {} on {}",
        containerd.crictl().version().unwrap_or_default().trim(),
        containerd.socket().display()
    );
    let result = run_pod(&containerd, &registry);
    if result.is_err() {
        eprintln!("--- containerd log (tail) ---\n{}", containerd.log_tail(30));
    }
    containerd.cleanup()?;
    result
}

fn run_pod(containerd: &Containerd, registry: &Registry) -> Result<()> {
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(180));
    let image = registry.image("busybox:1");
    crictl.pull(&image)?;
    let pod_cfg = PodConfig::new("quickstart")
        .hostname("spry-quickstart")
        .write_to(&containerd.dir())?;
    eprintln!("quickstart: crictl runp --runtime spry (boots the pod's microVM)");
    let pod = crictl.runp(&pod_cfg, Some("spry"))?;
    let cfg = ContainerConfig::new("hello", &image)
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
