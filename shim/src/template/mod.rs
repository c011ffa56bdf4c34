//! VM templates: pods start by restoring a booted, idle VM instead of booting one.
//!
//! A template is a VM that booted its kernel and agent, got no pod identity, and was saved:
//! its guest RAM is a memory file written through a shared mapping, its device state a small
//! QEMU migration stream. A pod's VM maps the memory file copy-on-write, loads the device
//! state and resumes; the agent then receives the pod's identity (hostname, DNS, fresh
//! entropy, the clock) exactly as after a cold boot.
//!
//! Templates live in `<state_dir>/templates/<fingerprint>/`, keyed by
//! [`crate::vm::Hypervisor::snapshot_fingerprint`]: kernel, initramfs, QEMU binary, VM size,
//! accelerator and machine options. A change to any of them selects a new template, built on
//! first use; the one it supersedes is removed. Builds are serialized by a lock on the
//! templates dir and published by a rename, so concurrent shims build one template and never
//! see a torn one.
//!
//! A template that fails its integrity check or fails to restore never fails a pod: the pod
//! boots cold, one warning is logged, and the template is rebuilt in the background.

mod build;
mod launch;
mod leftovers;
mod store;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use build::build_template;
pub use launch::{restore_unattached, start_sandbox, Launch, LaunchRequest};
pub use leftovers::remove_abandoned_builds;
pub use store::{Damage, Manifest, Template, TemplateStore};

use crate::vm::VmError;

/// Whether a runtime handler's pods start from templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplatePolicy {
    /// Restore from a template, building it on first use.
    #[default]
    Auto,
    /// Always boot cold: no page is shared with another pod's VM.
    Off,
}

/// Failures of building, checking or removing templates.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot access template storage {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock template storage {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("template {dir} is damaged: {damage}")]
    Damaged { dir: PathBuf, damage: Damage },
    #[error("no template {key} in {root}")]
    NotFound { key: String, root: PathBuf },
    #[error("cannot fingerprint the VM for template {id}")]
    Fingerprint {
        id: String,
        #[source]
        source: VmError,
    },
    #[error("the template VM {id} did not start")]
    BootVm {
        id: String,
        #[source]
        source: VmError,
    },
    #[error("the agent of template VM {id} did not come up")]
    Agent {
        id: String,
        #[source]
        source: Box<crate::sandbox::SandboxError>,
    },
    #[error("cannot save template VM {id}")]
    Save {
        id: String,
        #[source]
        source: VmError,
    },
    #[error("cannot write template manifest {path}")]
    WriteManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}
