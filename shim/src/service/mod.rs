//! `containerd-shim-spry-v2`: the containerd shim (task API v3, containerd 2.x).
//!
//! One shim process serves a whole pod: `start` groups containers by CRI's sandbox-id
//! annotation, so every container of a pod reaches the shim that owns the pod's VM.
//! The sandbox ("pause") task is the VM itself; app containers and execs are agent calls.

mod abandoned;
mod adopted;
mod bundle_rootfs;
mod error;
mod events;
mod events_forward;
mod features;
mod io;
mod launcher;
mod options;
mod pod;
mod spec;
mod stats;
mod task;
mod tasks;
mod watchers;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::{Config as ShimConfig, Error as ShimCrateError, Flags, StartOpts};
use tracing::{info, warn};

pub use adopted::serve_adopted;
pub use error::ShimError;
pub use task::TaskService;

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::error_chain;
use crate::host::Host;

/// containerd's runtime type for Spry.
pub const RUNTIME_ID: &str = "io.containerd.spry.v2";

/// Where the shim reads its config: `SPRY_CONFIG`, else /etc/spry/config.toml.
pub fn config_path() -> PathBuf {
    std::env::var_os("SPRY_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

/// How the containerd-shim crate must run us. It must be passed to `run`: the crate
/// installs its signal handlers before `Shim::new` sees the config.
pub fn shim_config() -> ShimConfig {
    ShimConfig {
        // QEMU, mkfs.erofs and friends are children that tokio waits for; the crate's
        // SIGCHLD reaper (waitpid(-1)) would steal their exit statuses.
        no_reaper: true,
        // Logging is tracing, set up by the binary to write into the log FIFO.
        no_setup_logger: true,
        ..Default::default()
    }
}

/// The shim's process-level side: start, delete, serve.
pub struct SpryShim {
    id: String,
    namespace: String,
    /// containerd's address (`-address`).
    address: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
    pod: std::sync::OnceLock<Arc<pod::Pod>>,
}

#[async_trait]
impl Shim for SpryShim {
    type T = TaskService;

    fn runtime_info(
        runtime_id: &str,
        _options: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>,
    ) -> containerd_shim::Result<containerd_shim::protos::types::introspection::RuntimeInfo> {
        features::runtime_info(runtime_id).map_err(|e| ShimCrateError::Other(error_chain(&e)))
    }

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        Self {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            address: args.address.clone(),
            bundle,
            exit: Arc::default(),
            pod: std::sync::OnceLock::new(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, ShimCrateError> {
        // A bad config fails here, so RunPodSandbox reports it before anything starts.
        Config::load(&config_path())
            .map_err(|e| ShimCrateError::InvalidArgument(error_chain(&e)))?;
        let spec = spec::load(&self.bundle)
            .map_err(|e| ShimCrateError::InvalidArgument(error_chain(&e)))?;
        let grouping = spec::sandbox_id(&spec).unwrap_or_else(|| opts.id.clone());
        if spec::task_kind(&spec) == spec::TaskKind::Sandbox {
            if let Some(address) = self.take_spare(&opts, &grouping).await {
                write_address(&self.bundle, &address)?;
                return Ok(address);
            }
        }
        let address = spawn(opts, &grouping, Vec::new()).await?;
        write_address(&self.bundle, &address)?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, ShimCrateError> {
        // containerd believes the serving shim gone (crashed, killed, or never loaded after
        // a containerd crash): make sure it is, then clean what it may have left.
        let (id, namespace, address, bundle) = (
            self.id.clone(),
            self.namespace.clone(),
            self.address.clone(),
            self.bundle.clone(),
        );
        let still_serving = tokio::task::spawn_blocking(move || {
            // A spare shim that took the pod has a spare's command line; it noted its pid.
            let serving = crate::pool::recorded_shim_pid(&bundle)
                .or_else(|| abandoned::serving_pid(&id, &namespace, &address));
            let Some(pid) = serving else {
                return false;
            };
            // containerd runs this after every task delete too (it counts its own closing
            // of the task's connection as the shim's death): a live shim containerd's
            // other tasks still use owns its state and exits by itself after its last one.
            if abandoned::serves_other_tasks(&bundle) {
                return true;
            }
            abandoned::stop(pid, &id);
            false
        })
        .await
        .unwrap_or(false);
        if still_serving {
            info!(id = %self.id, "the pod's shim still serves other tasks; it cleans up itself");
            return Ok(killed_response());
        }
        // A handler with its own config (ConfigPath or inline) may keep its state
        // elsewhere and keep fewer unused layer images: the pod noted it.
        let config = recorded_config(&self.bundle).unwrap_or_else(|| {
            let mut config = Config::load(&config_path()).unwrap_or_default();
            if let Some(state_dir) = recorded_state_dir(&self.bundle) {
                config.state_dir = state_dir;
            }
            config
        });
        cleanup_leftovers(&config, &self.id, &self.bundle).await;
        Ok(killed_response())
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        if let Some(pod) = self.pod.get() {
            pod.shutdown().await;
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let config = match Config::load(&config_path()) {
            Ok(config) => config,
            Err(e) => {
                // `start` validated it; it changed since. Defaults are safer than dying
                // with containerd waiting on us, and the error is logged.
                warn!(error = %error_chain(&e), "config became invalid after start; using defaults");
                Config::default()
            }
        };
        crate::log_filter::apply_config_level(&config.log_level);
        self.task_service(publisher, Box::new(launcher::HostLauncher::new(config)))
    }
}

impl SpryShim {
    /// A spare shim of the handler's warm pool takes the new pod, if the handler keeps a
    /// pool and one is ready; the pool is topped up either way. `None`: spawn a shim.
    async fn take_spare(&self, opts: &StartOpts, grouping: &str) -> Option<String> {
        let options = opts
            .extensions
            .iter()
            .find(|any| any.type_url.ends_with("runtimeoptions.v1.Options"));
        let config = match options::config_from_options(options) {
            Ok(Some(config)) => config,
            Ok(None) => Config::load(&config_path()).ok()?,
            Err(_) => return None,
        };
        let request = crate::pool::AdoptRequest {
            id: opts.id.clone(),
            namespace: opts.namespace.clone(),
            address: opts.address.clone(),
            ttrpc_address: opts.ttrpc_address.clone(),
            bundle: self.bundle.clone(),
            socket: opts.socket_address(grouping),
        };
        let address = crate::pool::adopt(&config, &request).await;
        if let Err(e) = crate::pool::refill(&config, &opts.address).await {
            warn!(error = %error_chain(&e), "cannot top up the warm pool");
        }
        address
    }

    /// The task service of this shim's pod, whose VM `launcher` starts.
    fn task_service(
        &self,
        publisher: RemotePublisher,
        launcher: Box<dyn launcher::SandboxLauncher>,
    ) -> TaskService {
        info!(id = %self.id, namespace = %self.namespace, "shim serving");
        // containerd's publisher only gives us its address: events go through our own
        // forwarder, which survives containerd restarts.
        let events =
            events::ContainerdEvents::new(publisher.address.clone(), self.namespace.clone());
        let pod = pod::Pod::new(launcher, events::EventSink::new(Box::new(events)));
        // `wait` needs the pod for last-resort cleanup; `new` ran before it existed.
        let _ = self.pod.set(Arc::clone(&pod));
        abandoned::exit_if_never_used(
            self.bundle.clone(),
            Arc::clone(&pod),
            Arc::clone(&self.exit),
        );
        TaskService::new(pod, Arc::clone(&self.exit))
    }
}

/// The address file containerd reads back after its own restart.
fn write_address(bundle: &Path, address: &str) -> Result<(), ShimCrateError> {
    std::fs::write(bundle.join("address"), address).map_err(|err| ShimCrateError::IoError {
        context: "write address file".into(),
        err,
    })
}

/// What `delete` answers for the task: SIGKILLed now, as far as containerd is concerned.
fn killed_response() -> DeleteResponse {
    DeleteResponse {
        exit_status: 137,
        exited_at: Some(events::timestamp(SystemTime::now())).into(),
        ..Default::default()
    }
}

/// The name of a pod's per-VM state dirs. containerd's ids are 64 hex characters, which
/// would push the VM's unix socket paths past the 107 bytes the kernel allows; long ids are
/// shortened to a prefix plus a hash of the whole id.
pub fn state_name(id: &str) -> String {
    use sha2::{Digest, Sha256};
    if id.len() <= 24 {
        return id.to_string();
    }
    let hash = hex::encode(Sha256::digest(id.as_bytes()));
    let prefix: String = id.chars().take(12).collect();
    format!("{prefix}-{}", &hash[..12])
}

/// The file in a task's bundle holding the config its pod runs under, for `delete` after
/// the serving shim died: that runs without the handler's options.
const CONFIG_MARKER: &str = "spry-config.toml";
/// What shims before `CONFIG_MARKER` noted: only the state dir.
const STATE_DIR_MARKER: &str = "spry-state-dir";

/// Notes in `bundle` the config the task's pod runs under.
fn record_config(bundle: &Path, config: &Config) {
    let marker = bundle.join(CONFIG_MARKER);
    let written = toml::to_string(config)
        .map_err(std::io::Error::other)
        .and_then(|text| std::fs::write(&marker, text));
    if let Err(e) = written {
        warn!(path = %marker.display(), error = %e, "cannot note the pod's config; a crash of this shim may leave state behind");
    }
}

fn recorded_config(bundle: &Path) -> Option<Config> {
    let marker = bundle.join(CONFIG_MARKER);
    let text = std::fs::read_to_string(&marker).ok()?;
    match Config::parse(&text, &marker) {
        Ok(config) => Some(config),
        Err(e) => {
            warn!(error = %error_chain(&e), "the pod's noted config is not valid; cleaning up under the shim's");
            None
        }
    }
}

fn recorded_state_dir(bundle: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(bundle.join(STATE_DIR_MARKER)).ok()?;
    let dir = PathBuf::from(text);
    dir.is_absolute().then_some(dir)
}

/// Removes what a dead shim of container `id` may have left: its rootfs mount (and that
/// overlay's volatile marker, which would keep the snapshot from being mounted again), VM
/// state dir and rootfs images, shared layer images it was the last user of, the tc
/// joins in the pod's network namespace, and the pod's cgroup. QEMU itself dies with its shim
/// (PR_SET_PDEATHSIG), and its taps with it.
pub async fn cleanup_leftovers(config: &Config, id: &str, bundle: &Path) {
    let rootfs = bundle.join("rootfs");
    let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
    bundle_rootfs::remove_noted_markers(bundle);
    if let Ok(spec) = spec::load(bundle) {
        if let spec::PodNetns::Path(netns) = spec::pod_netns(&spec) {
            if let Err(e) = crate::network::unjoin_taps(&netns).await {
                warn!(error = %error_chain(&e), "cannot clean the pod's network namespace");
            }
        }
        // The pod's cgroup dirs, which its shim made and would have removed.
        if spec::task_kind(&spec) == spec::TaskKind::Sandbox {
            if let Ok(Some(plan)) = crate::cgroup::plan(&spec) {
                crate::cgroup::PodCgroup::left_behind(plan).remove().await;
            }
        }
    }
    let name = crate::pool::recorded_vm_name(bundle).unwrap_or_else(|| state_name(id));
    Host::new(config.clone()).remove_leftovers(&name);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recorded_config_is_read_back_and_an_older_shims_state_dir_too() {
        let bundle = tempfile::tempdir().unwrap();
        assert!(recorded_config(bundle.path()).is_none());
        let config = Config::parse(
            "state_dir = \"/run/spry-other\"\n[rootfs]\nkeep_unused_mib = 0\n",
            Path::new("handler options"),
        )
        .unwrap();
        record_config(bundle.path(), &config);
        assert_eq!(recorded_config(bundle.path()), Some(config));
        std::fs::write(bundle.path().join(CONFIG_MARKER), "[vm]\ncpus = 0\n").unwrap();
        assert!(
            recorded_config(bundle.path()).is_none(),
            "not valid: not used"
        );

        // What shims before the config marker wrote.
        assert_eq!(recorded_state_dir(bundle.path()), None);
        std::fs::write(bundle.path().join(STATE_DIR_MARKER), "/run/spry-old").unwrap();
        assert_eq!(
            recorded_state_dir(bundle.path()),
            Some(PathBuf::from("/run/spry-old"))
        );
        std::fs::write(bundle.path().join(STATE_DIR_MARKER), "relative").unwrap();
        assert_eq!(recorded_state_dir(bundle.path()), None);
    }

    #[test]
    fn state_names_stay_short_and_distinct() {
        assert_eq!(state_name("vm-a"), "vm-a");
        let a = state_name(&"a".repeat(64));
        let b = state_name(&format!("{}b", "a".repeat(63)));
        assert_eq!(a.len(), 25);
        assert_ne!(a, b);
    }
}
