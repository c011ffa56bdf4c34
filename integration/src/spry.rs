//! Spry as a runtime handler of a harness containerd: the built guest assets, the shim
//! binary and a Spry config whose state lives in a directory of the caller's.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use crate::containerd::ContainerdOptions;
use crate::leak::LeakCheck;
use crate::paths;

/// The guest kernel and initramfs from scripts/build-guest.sh (`SPRY_GUEST_DIR` overrides).
pub fn guest_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("SPRY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::repo_root().join("build/guest/current"));
    ensure!(
        dir.join("vmlinux").is_file() && dir.join("initramfs.img").is_file(),
        "guest assets missing in {}: run scripts/build-guest.sh",
        dir.display()
    );
    Ok(dir)
}

/// containerd's CRI config for runtime handler `handler`: Spry's shim at `shim`, reading the
/// Spry config at `config` (containerd's `ConfigPath` option, as cluster admins pass it).
pub fn handler_with_config_toml(handler: &str, shim: &Path, config: &Path) -> String {
    format!(
        "[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.{handler}]\n\
         runtime_type = \"io.containerd.spry.v2\"\nruntime_path = \"{}\"\n\
         privileged_without_host_devices = true\n\
         [plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.{handler}.options]\n\
         ConfigPath = \"{}\"\n",
        shim.display(),
        config.display()
    )
}

/// Spry's built binaries: `SPRY_BIN_DIR`, else `target/<profile>` of this checkout.
pub fn bin_dir(profile: &str) -> PathBuf {
    std::env::var_os("SPRY_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::repo_root().join("target").join(profile))
}

/// Ends the warm-pool spare shims (and their VMs) under Spry state dir `state_dir`; how
/// many there were. Spares outlive pods, so a test or benchmark that made some drains them.
pub fn drain_pool(state_dir: &Path) -> Result<usize> {
    Ok(block_on(spry_shim::pool::drain(state_dir))??)
}

/// Ends the spares under `state_dir` that were made for the pods of the containerd whose
/// socket is `containerd`; how many there were.
pub fn drain_pool_for(state_dir: &Path, containerd: &Path) -> Result<usize> {
    let address = containerd.to_string_lossy();
    Ok(block_on(spry_shim::pool::drain_for_containerd(
        state_dir, &address,
    ))??)
}

/// Runs `future` to its end on a runtime of its own (the harness is synchronous).
fn block_on<F: std::future::Future>(future: F) -> std::io::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(future))
}

/// The `spry` runtime handler: shim binary and config.
pub struct SpryHandler {
    pub shim: PathBuf,
    pub config: PathBuf,
    config_text: String,
}

impl SpryHandler {
    /// Writes a config under `state` (Spry's runtime state goes to `state/run`). The shim is
    /// taken from `SPRY_BIN_DIR`, else `target/<profile>`; `kernel` overrides the guest's.
    pub fn new(state: &Path, profile: &str, kernel: Option<&Path>) -> Result<Self> {
        let guest = guest_dir()?;
        let shim = bin_dir(profile).join("containerd-shim-spry-v2");
        ensure!(
            shim.is_file(),
            "{} missing: cargo build -p spry-shim",
            shim.display()
        );
        std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
        let config = state.join("config.toml");
        let kernel = kernel
            .map(Path::to_path_buf)
            .unwrap_or_else(|| guest.join("vmlinux"));
        let config_text = format!(
            "state_dir = \"{}\"\n[vm]\nkernel = \"{}\"\ninitramfs = \"{}\"\n",
            state.join("run").display(),
            kernel.display(),
            guest.join("initramfs.img").display()
        );
        std::fs::write(&config, &config_text)
            .with_context(|| format!("writing {}", config.display()))?;
        Ok(Self {
            shim,
            config,
            config_text,
        })
    }

    /// Writes another config next to this one, with `top_level` TOML lines added (e.g.
    /// `template = "off"`), for a second handler; returns its path.
    pub fn variant(&self, name: &str, top_level: &str) -> Result<PathBuf> {
        let path = self.config.with_file_name(format!("config-{name}.toml"));
        std::fs::write(&path, format!("{top_level}\n{}", self.config_text))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Adds handler `handler` running Spry with the config at `config`, passed the way
    /// cluster admins would: containerd's `ConfigPath` runtime option.
    pub fn register_variant(
        &self,
        opts: ContainerdOptions,
        handler: &str,
        config: &Path,
    ) -> ContainerdOptions {
        opts.extra_toml(&handler_with_config_toml(handler, &self.shim, config))
    }

    /// Adds the handler to a containerd's options.
    pub fn register(&self, opts: ContainerdOptions) -> ContainerdOptions {
        opts.runtime_handler("spry", "io.containerd.spry.v2", Some(&self.shim))
            // As `spry install` sets it: a privileged container gets the VM's devices, not
            // the host's (which a jailed QEMU cannot open, and the guest must not get).
            .extra_toml(
                "[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.spry]\n\
                 privileged_without_host_devices = true\n",
            )
            // After a restart containerd reloads running tasks by looking the shim up in
            // PATH (runtime_path is not persisted); `spry install` puts it in /usr/local/bin.
            .path_prepend(self.shim.parent().expect("the shim is in a directory"))
            .env("SPRY_CONFIG", &self.config.display().to_string())
    }
}

/// A containerd with Spry's `spry` handler (templates on), `spry-cold` (templates off)
/// too when asked, and busybox pulled from a fresh registry. Fields drop in order:
/// containerd before its state dir and the registry.
pub struct SpryNode {
    pub containerd: crate::Containerd,
    pub state: tempfile::TempDir,
    pub registry: crate::Registry,
    /// busybox in the node's registry.
    pub image: String,
}

impl SpryNode {
    pub fn start(name: &str, cold: bool) -> Result<Self> {
        let registry = crate::Registry::start()?;
        let state = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in("/run")?;
        let spry = SpryHandler::new(state.path(), "debug", None)?;
        let mut opts = spry.register(ContainerdOptions::new(name).registry(&registry));
        if cold {
            let variant = spry.variant("cold", "template = \"off\"")?;
            opts = spry.register_variant(opts, "spry-cold", &variant);
        }
        let containerd = crate::Containerd::start(opts)?;
        let image = registry.image("busybox:1");
        containerd.crictl().pull(&image)?;
        Ok(Self {
            containerd,
            state,
            registry,
            image,
        })
    }

    /// The containerd's leak check plus the per-pod entries of this node's Spry state dir.
    pub fn leak_check(&self) -> Result<LeakCheck> {
        watch_pod_state(self.containerd.leak_check()?, self.state.path())
    }
}

/// Adds to `check` the per-pod entries of the Spry state dir of a handler made with
/// `SpryHandler::new(state, ..)`: a VM's dir, its pod's file share and rootfs images.
/// Templates, shared layer images and the pristine writable layer outlive pods on purpose.
pub fn watch_pod_state(check: LeakCheck, state: &Path) -> Result<LeakCheck> {
    let run = state.join("run");
    check
        .watch_dir(&run.join("vms"), 1)?
        .watch_dir(&run.join("shares"), 1)?
        .watch_dir(&run.join("rootfs"), 1)
}
