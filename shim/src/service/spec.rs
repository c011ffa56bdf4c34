//! Reading a bundle's OCI spec and removing what only the host can make sense of.
//!
//! Host LSM profiles don't exist in the guest, so the shim drops them; host bind mounts
//! have no source there, so the shim takes them out and brings each in its own way
//! (`crate::volumes`). Namespaces joined by host path and
//! cgroup paths are guest matters: the agent rewrites those (agent/src/container/spec.rs).

use std::path::Path;

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::volumes::{self, GuestVolumes, VolumeError};

use super::error::ShimError;

/// CRI's annotation that says whether a container is the pod sandbox or an app container.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation with the pod sandbox id (the shim groups a pod's containers by it).
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// What a task is, from CRI's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// The pod sandbox ("pause") container: its task is the pod VM itself.
    Sandbox,
    /// An application container, run inside the pod VM.
    App,
}

pub fn load(bundle: &Path) -> Result<Spec, ShimError> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|source| ShimError::ReadSpec {
        path,
        source: Box::new(source),
    })
}

/// Sandbox tasks are marked by CRI; a task without CRI annotations (e.g. `ctr run`) is
/// treated as its own sandbox holding itself, so it still gets a VM.
pub fn task_kind(spec: &Spec) -> TaskKind {
    match spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(CONTAINER_TYPE_ANNOTATION))
    {
        Some(kind) if kind == "sandbox" => TaskKind::Sandbox,
        _ => TaskKind::App,
    }
}

pub fn sandbox_id(spec: &Spec) -> Option<String> {
    spec.annotations()
        .as_ref()?
        .get(SANDBOX_ID_ANNOTATION)
        .cloned()
}

/// The network namespace a sandbox spec asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodNetns {
    /// One CNI set up (CRI pods): the VM's NICs mirror its interfaces.
    Path(std::path::PathBuf),
    /// A new, unnamed one nobody configured (`ctr run`): a VM without NICs.
    Unnamed,
    /// No network namespace entry: the host's (a CRI pod with hostNetwork).
    Host,
}

pub fn pod_netns(spec: &Spec) -> PodNetns {
    let entry = spec
        .linux()
        .as_ref()
        .and_then(|linux| linux.namespaces().as_ref())
        .and_then(|namespaces| {
            namespaces
                .iter()
                .find(|ns| ns.typ() == LinuxNamespaceType::Network)
        });
    match entry {
        None => PodNetns::Host,
        Some(ns) => match ns.path() {
            Some(path) => PodNetns::Path(path.clone()),
            None => PodNetns::Unnamed,
        },
    }
}

/// Rewrites an app container's spec for the guest (see the module docs): its host bind
/// mounts come out, and come back as what the guest needs for each ([`volumes::plan`]).
pub fn for_guest(mut spec: Spec) -> Result<(Spec, GuestVolumes), VolumeError> {
    if let Some(linux) = spec.linux_mut() {
        linux.set_mount_label(None);
    }
    if let Some(process) = spec.process_mut() {
        process.set_apparmor_profile(None);
        process.set_selinux_label(None);
    }
    let volumes = volumes::plan(&mut spec)?;
    Ok((spec, volumes))
}

/// The size of the pod's /dev/shm as the host sized it (CRI mounts a tmpfs of the
/// requested size at the source of the sandbox spec's /dev/shm bind); None if there is none.
pub fn shm_size(spec: &Spec) -> Option<u64> {
    let source = spec
        .mounts()
        .as_deref()?
        .iter()
        .find(|m| m.destination() == Path::new("/dev/shm"))?
        .source()
        .clone()?;
    let stat = nix::sys::statvfs::statvfs(&source).ok()?;
    Some(stat.blocks() * stat.fragment_size())
}

/// The pod's sysctls (CRI puts `PodSandboxConfig.linux.sysctls` in the sandbox spec).
pub fn sysctls(spec: &Spec) -> std::collections::HashMap<String, String> {
    spec.linux()
        .as_ref()
        .and_then(|linux| linux.sysctl().clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cri_spec(kind: &str) -> Spec {
        let mut spec = Spec::default();
        spec.set_annotations(Some(HashMap::from([
            (CONTAINER_TYPE_ANNOTATION.to_string(), kind.to_string()),
            (SANDBOX_ID_ANNOTATION.to_string(), "sb1".to_string()),
        ])));
        spec
    }

    #[test]
    fn kinds_and_sandbox_id_come_from_cri_annotations() {
        assert_eq!(task_kind(&cri_spec("sandbox")), TaskKind::Sandbox);
        assert_eq!(task_kind(&cri_spec("container")), TaskKind::App);
        assert_eq!(task_kind(&Spec::default()), TaskKind::App);
        assert_eq!(sandbox_id(&cri_spec("container")).as_deref(), Some("sb1"));
    }
}
