//! What a harness containerd is started with (builder).

use crate::containerd_config;
use crate::registry::Registry;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ContainerdOptions {
    pub(super) name: String,
    pub(super) binary: Option<PathBuf>,
    pub(super) sandbox_image: Option<String>,
    /// (image host as in references, address to connect to)
    pub(super) registries: Vec<(String, String)>,
    pub(super) snapshotter: String,
    pub(super) extra_toml: Vec<String>,
    pub(super) path_prepend: Vec<PathBuf>,
    pub(super) env: Vec<(String, String)>,
    pub(super) log_level: String,
    pub(super) start_timeout: Duration,
    /// (on-disk dir, run dir) instead of temp dirs (see `instance_dirs.rs`).
    pub(super) fixed_dirs: Option<(PathBuf, PathBuf)>,
    /// Give pods an IPv6 address too.
    pub(super) dual_stack: bool,
    /// The CNI plugin to use instead of bridge + host-local + portmap.
    pub(super) main_cni_plugin: Option<serde_json::Value>,
}

impl ContainerdOptions {
    /// `name` (a short test name) appears in directory names and the bridge name.
    pub fn new(name: &str) -> Self {
        ContainerdOptions {
            name: name
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(24)
                .collect(),
            binary: None,
            sandbox_image: None,
            registries: Vec::new(),
            snapshotter: "overlayfs".to_string(),
            extra_toml: Vec::new(),
            path_prepend: Vec::new(),
            env: Vec::new(),
            log_level: "info".to_string(),
            start_timeout: Duration::from_secs(30),
            fixed_dirs: None,
            dual_stack: false,
            main_cni_plugin: None,
        }
    }

    /// Pods get their network from `plugin` (its conflist entry, then loopback) instead of
    /// bridge + host-local + portmap.
    pub fn main_cni_plugin(mut self, plugin: serde_json::Value) -> Self {
        self.main_cni_plugin = Some(plugin);
        self
    }

    /// Pods get an IPv6 address and default route besides their IPv4 ones.
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    /// Keep the instance in these dirs (created if missing) instead of temp dirs under the
    /// harness dirs: for an instance that outlives its process ([`Containerd::keep_running`]).
    pub fn fixed_dirs(mut self, dir: &Path, run_dir: &Path) -> Self {
        self.fixed_dirs = Some((dir.to_path_buf(), run_dir.to_path_buf()));
        self
    }

    /// Pull from `registry` over plain HTTP, and use its `pause:1` as the sandbox image.
    pub fn registry(mut self, registry: &Registry) -> Self {
        self.registries.push((registry.host(), registry.addr()));
        self.sandbox_image
            .get_or_insert_with(|| registry.image("pause:1"));
        self
    }

    /// Serve pulls of `upstream` (e.g. `registry.k8s.io`) from `registry`: images keep their upstream
    /// names, so clients with hard-coded references (critest) work offline.
    pub fn mirror(mut self, upstream: &str, registry: &Registry) -> Self {
        self.registries
            .push((upstream.to_string(), registry.addr()));
        self
    }

    pub fn sandbox_image(mut self, image: &str) -> Self {
        self.sandbox_image = Some(image.to_string());
        self
    }

    /// Default CRI snapshotter (default `overlayfs`).
    pub fn snapshotter(mut self, snapshotter: &str) -> Self {
        self.snapshotter = snapshotter.to_string();
        self
    }

    /// TOML deep-merged into the generated config (see `containerd_config::runtime_handler_toml`,
    /// `containerd_config::proxy_snapshotter_toml`).
    pub fn extra_toml(mut self, toml: &str) -> Self {
        self.extra_toml.push(toml.to_string());
        self
    }

    /// Adds a CRI runtime handler, e.g. `runtime_handler("spry", "io.containerd.spry.v1", Some(shim_path))`.
    pub fn runtime_handler(
        self,
        handler: &str,
        runtime_type: &str,
        runtime_path: Option<&Path>,
    ) -> Self {
        self.extra_toml(&containerd_config::runtime_handler_toml(
            handler,
            runtime_type,
            runtime_path,
        ))
    }

    /// Directory searched first for shim binaries (containerd finds `containerd-shim-*` via PATH).
    pub fn path_prepend(mut self, dir: &Path) -> Self {
        self.path_prepend.push(dir.to_path_buf());
        self
    }

    /// Extra environment for containerd (and so its shims).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn binary(mut self, path: &Path) -> Self {
        self.binary = Some(path.to_path_buf());
        self
    }

    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }
}
