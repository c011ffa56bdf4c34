//! Harness for Spry's end-to-end tests: real registry, real containerd 2.x, real crictl.
//!
//! Typical test:
//! ```no_run
//! use spry_integration::{require_root, Containerd, ContainerdOptions, Registry, PodConfig, ContainerConfig};
//! # fn main() -> anyhow::Result<()> {
//! require_root()?;
//! let registry = Registry::start()?;
//! let containerd = Containerd::start(ContainerdOptions::new("my-test").registry(&registry))?;
//! let leaks = containerd.leak_check()?;
//! let crictl = containerd.crictl();
//! crictl.pull(&registry.image("busybox:1"))?;
//! let pod_cfg = PodConfig::new("pod").write_to(&containerd.dir())?;
//! let pod = crictl.runp(&pod_cfg, None)?; // or Some("spry") with .runtime_handler("spry", ...)
//! let ctr_cfg = ContainerConfig::new("hello", &registry.image("busybox:1"))
//!     .command(&["echo", "hi"])
//!     .write_to(&containerd.dir())?;
//! let ctr = crictl.create(&pod, &ctr_cfg, &pod_cfg)?;
//! crictl.start(&ctr)?;
//! crictl.wait_container_state(&ctr, "CONTAINER_EXITED", std::time::Duration::from_secs(60))?;
//! assert!(crictl.logs(&ctr)?.contains("hi"));
//! crictl.stopp(&pod)?;
//! crictl.rmp(&pod)?;
//! leaks.assert_clean()?;
//! # Ok(()) }
//! ```
//!
//! Tools come from `/opt/spry/deps/bin` (see [`paths`] for the env overrides); tests that lack root or a
//! tool fail with a message saying what to install, they never skip.

pub mod atomic_writer;
pub mod bench;
pub mod containerd;
pub mod containerd_config;
pub mod cpu;
pub mod cri_config;
pub mod crictl;
pub mod critest;
pub mod instance_dirs;
pub mod kube;
pub mod leak;
pub mod memcg;
pub mod paths;
pub mod pod_usage;
pub mod portmap_rules;
pub mod registry;
pub mod require;
pub mod rootfs;
pub mod slow_link;
pub mod snapshotter;
pub mod spry;
pub mod stale;
pub mod system;

pub use containerd::{Containerd, ContainerdOptions};
pub use cri_config::{ContainerConfig, PodConfig};
pub use crictl::{Crictl, ExecOutput};
pub use critest::{failed_by_design, focus_on, with_critest_mirrors, Critest, CritestSummary};
pub use leak::{LeakCheck, LeakScope};
pub use registry::Registry;
pub use require::{require_root, require_tool};
pub use spry::SpryHandler;
