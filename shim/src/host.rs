//! The composition root of the host side: from one resolved config it builds, once, what
//! every entry point (the shim's pods, `spry vm run`, `spry template`) starts VMs with: the
//! hypervisor, the template store, the shared layer-image cache and each VM's rootfs share.
//! Nothing else constructs them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::rootfs::{ErofsBlockShare, LayerCache, PristineLayer, RootfsShare};
use crate::sandbox::SandboxIdentity;
use crate::state_dir::StateDir;
use crate::template::{LaunchRequest, TemplateStore};
use crate::vm::{Hypervisor, QemuHypervisor, VmConfig};
use crate::volumes::FileShareConfig;

/// The host side of one config (one runtime handler).
pub struct Host {
    config: Config,
    state: StateDir,
    hypervisor: Arc<dyn Hypervisor>,
    templates: TemplateStore,
    layer_cache: LayerCache,
}

impl Host {
    pub fn new(config: Config) -> Self {
        let state = StateDir::new(config.state_dir.clone());
        if let Err(e) = state.make_private() {
            tracing::warn!(dir = %state.root().display(), error = %e, "cannot make the state dir private to root");
        }
        Self {
            hypervisor: Arc::new(QemuHypervisor::new(state.root().to_path_buf())),
            templates: TemplateStore::new(state.templates()),
            layer_cache: LayerCache::new(state.layer_images(), config.rootfs.keep_unused_bytes()),
            config,
            state,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn state(&self) -> &StateDir {
        &self.state
    }

    pub fn hypervisor(&self) -> Arc<dyn Hypervisor> {
        self.hypervisor.clone()
    }

    pub fn templates(&self) -> &TemplateStore {
        &self.templates
    }

    pub fn layer_cache(&self) -> &LayerCache {
        &self.layer_cache
    }

    /// The configured VM, named `name`, with its state dir in place.
    pub fn vm_config(&self, name: &str) -> VmConfig {
        self.config.vm_config(name, self.state.vm(name))
    }

    /// Makes the rootfs share of VM `name` (a fresh one per start attempt: a failed
    /// template restore is followed by a cold boot with a new share).
    pub fn rootfs_share_factory(
        &self,
        name: &str,
    ) -> impl Fn() -> Box<dyn RootfsShare> + Send + Sync + 'static {
        let dir = self.state.rootfs(name);
        let cache = self.layer_cache.clone();
        let pristine = PristineLayer::new(self.state.pristine_writable_layer());
        move || {
            Box::new(
                ErofsBlockShare::new(dir.clone())
                    .with_layer_cache(cache.clone())
                    .with_pristine_layer(pristine.clone()),
            ) as Box<dyn RootfsShare>
        }
    }

    /// The file share of VM `name`'s pod, served by the `spry` binary installed next to
    /// the running one (the shim and `spry` ship together).
    pub fn file_share(&self, name: &str) -> FileShareConfig {
        let dir = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("/usr/local/bin"));
        FileShareConfig {
            dir: self.state.share(name),
            server: dir.join("spry"),
        }
    }

    /// How to start `vm_config`'s sandbox under this config's template policy.
    pub fn launch_request(&self, vm_config: VmConfig, identity: SandboxIdentity) -> LaunchRequest {
        LaunchRequest {
            hypervisor: self.hypervisor(),
            store: self.templates.clone(),
            policy: self.config.template,
            vm_config,
            identity,
            boot_timeout: self.boot_timeout(),
        }
    }

    /// How long a booting VM's agent may take to answer (the config's `boot_timeout_s`).
    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.config.vm.boot_timeout_s))
    }

    /// Removes what VM `name`'s dead shim left (QEMU itself dies with its shim), what a
    /// template build it was running left, and shared layer images nobody holds any more
    /// beyond the config's bound.
    pub fn remove_leftovers(&self, name: &str) {
        // First, and never recursively: the share holds binds of users' host directories.
        crate::volumes::remove_staging(&self.state.share(name));
        for dir in self.state.per_vm_dirs(name) {
            if dir.exists() {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(path = %dir.display(), error = %e, "cannot remove leftover state");
                }
            }
        }
        // The dead shim may have been building a template.
        crate::template::remove_abandoned_builds(&self.templates, &self.state.vms());
        self.layer_cache.trim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_config_gives_one_layout() {
        let root = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: root.path().join("state"),
            ..Config::default()
        };
        let host = Host::new(config);
        let vm = host.vm_config("pod-1");
        assert_eq!(vm.state_dir, host.state().vm("pod-1"));
        assert_eq!(host.templates().root(), host.state().templates());
        let request = host.launch_request(vm, SandboxIdentity::default());
        assert_eq!(request.policy, host.config().template);
        assert_eq!(request.store.root(), host.state().templates());
    }

    #[test]
    fn leftovers_of_one_vm_are_removed_and_others_kept() {
        let root = tempfile::tempdir().unwrap();
        let host = Host::new(Config {
            state_dir: root.path().to_path_buf(),
            ..Config::default()
        });
        for name in ["dead", "alive"] {
            for dir in host.state().per_vm_dirs(name) {
                std::fs::create_dir_all(dir.join("x")).unwrap();
            }
        }
        host.remove_leftovers("dead");
        for dir in host.state().per_vm_dirs("dead") {
            assert!(!dir.exists(), "{} left", dir.display());
        }
        for dir in host.state().per_vm_dirs("alive") {
            assert!(dir.exists(), "{} removed", dir.display());
        }
    }
}
