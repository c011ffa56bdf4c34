//! Reading a bundle's OCI spec and removing what only the host can make sense of.
//!
//! Host bind mounts have no source in the guest and host LSM profiles don't exist there;
//! both are host knowledge, so the shim drops them. Namespaces joined by host path and
//! cgroup paths are guest matters: the agent rewrites those (agent/src/container/spec.rs).

use std::path::Path;

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use spry_proto::agent::GuestFile;
use tracing::warn;

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

/// Host files larger than this are not copied into the guest (they need virtio-fs).
const MAX_COPIED_FILE: u64 = 1 << 20;

/// Rewrites an app container's spec for the guest (see the module docs). Bind mounts of
/// small host files (CRI's /etc/hosts, /etc/resolv.conf, /etc/hostname,
/// /dev/termination-log) come back as files to copy into the guest; other host bind
/// mounts are dropped with a warning.
pub fn for_guest(mut spec: Spec, container_id: &str) -> (Spec, Vec<GuestFile>) {
    if let Some(linux) = spec.linux_mut() {
        linux.set_mount_label(None);
    }
    if let Some(process) = spec.process_mut() {
        process.set_apparmor_profile(None);
        process.set_selinux_label(None);
    }
    let mut files = Vec::new();
    if let Some(mounts) = spec.mounts_mut() {
        mounts.retain(|m| {
            let options = m.options().as_deref().unwrap_or_default();
            let is_bind = m.typ().as_deref() == Some("bind")
                || options.iter().any(|o| o == "bind" || o == "rbind");
            if !is_bind {
                return true;
            }
            match m.source().as_deref().map(small_file) {
                Some(Ok(content)) => files.push(GuestFile {
                    destination: m.destination().display().to_string(),
                    content,
                    readonly: options.iter().any(|o| o == "ro"),
                    ..Default::default()
                }),
                // Directories and big files need virtio-fs, which is not built yet.
                _ => warn!(
                    container_id,
                    destination = %m.destination().display(),
                    source = ?m.source(),
                    "host bind mount is not shared into the VM; skipped"
                ),
            }
            false
        });
    }
    (spec, files)
}

/// The content of a regular file of at most [`MAX_COPIED_FILE`] bytes.
fn small_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() || meta.len() > MAX_COPIED_FILE {
        return Err(std::io::Error::from(std::io::ErrorKind::Unsupported));
    }
    std::fs::read(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::MountBuilder;
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

    #[test]
    fn small_host_files_are_copied_and_other_host_mounts_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let mut spec = cri_spec("container");
        let mut mounts = spec.mounts().clone().unwrap();
        mounts.push(
            MountBuilder::default()
                .destination("/etc/hosts")
                .typ("bind")
                .source(&hosts)
                .options(vec!["rbind".to_string(), "ro".to_string()])
                .build()
                .unwrap(),
        );
        mounts.push(
            MountBuilder::default()
                .destination("/data")
                .typ("bind")
                .source(dir.path())
                .options(vec!["rbind".to_string()])
                .build()
                .unwrap(),
        );
        spec.set_mounts(Some(mounts));
        spec.process_mut()
            .as_mut()
            .unwrap()
            .set_apparmor_profile(Some("cri-containerd.apparmor.d".into()));

        let (guest, files) = for_guest(spec, "c1");
        let mounts = guest.mounts().as_ref().unwrap();
        assert!(mounts
            .iter()
            .all(|m| m.destination() != Path::new("/etc/hosts")));
        assert!(mounts.iter().all(|m| m.destination() != Path::new("/data")));
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].destination, "/etc/hosts");
        assert_eq!(files[0].content, b"127.0.0.1 localhost\n");
        assert!(files[0].readonly);
        assert!(mounts.iter().any(|m| m.destination() == Path::new("/proc")));
        assert!(guest
            .process()
            .as_ref()
            .unwrap()
            .apparmor_profile()
            .is_none());
    }
}
