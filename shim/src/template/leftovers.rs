//! What a builder killed mid-build leaves: its build dir (guest RAM) and its VM's state dir.
//!
//! A pod's shim builds the template inside its sandbox's Create, so a shim killed then
//! (containerd gives up on a shim that does not answer its reload in time, an operator's
//! SIGKILL) leaves both behind, and no later pod of the same config may come to clear them.
//! They are swept when a dead shim's leftovers are (`Host::remove_leftovers`).

use std::path::Path;

use tracing::{info, warn};

use super::store::BUILD_DIR_PREFIX;
use super::TemplateStore;

/// Build VMs' names begin with this. containerd's ids begin with a letter or a digit, so no
/// pod's VM (named from its sandbox id) is ever taken for one.
const BUILD_VM_PREFIX: &str = "_template-";

/// The name of the VM that builds template `key`.
pub fn build_vm_name(key: &str) -> String {
    format!("{BUILD_VM_PREFIX}{}", &key[..key.len().min(12)])
}

/// Removes the build dirs under `store` and the build VMs' state dirs under `vms_dir`,
/// unless a build is under way (then they are its own).
pub fn remove_abandoned_builds(store: &TemplateStore, vms_dir: &Path) {
    if !store.root().exists() {
        return;
    }
    let Some(_lock) = store.try_lock() else {
        return;
    };
    let builds = entries_named(store.root(), |name| name.starts_with(BUILD_DIR_PREFIX));
    let vms = entries_named(vms_dir, |name| name.starts_with(BUILD_VM_PREFIX));
    for dir in builds.into_iter().chain(vms) {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => info!(path = %dir.display(), "removed an abandoned template build"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(path = %dir.display(), error = %e, "cannot remove an abandoned template build")
            }
        }
    }
}

fn entries_named(dir: &Path, wanted: impl Fn(&str) -> bool) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_str().is_some_and(&wanted))
        .map(|entry| entry.path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_builders_leftovers_go_but_not_a_live_builds_nor_pods() {
        let root = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(root.path().join("templates"));
        let vms = root.path().join("vms");
        let build = store.build_dir("0123456789abcdef");
        let build_vm = vms.join(build_vm_name("0123456789abcdef"));
        let template = store.root().join("0123456789abcdef");
        // A ctr-run task may be named like the old build VMs were.
        let pods = [vms.join("pod-a"), vms.join("tpl-0123456789ab")];
        for dir in [&build, &build_vm, &template].into_iter().chain(&pods) {
            std::fs::create_dir_all(dir).unwrap();
        }

        let held = store.lock().await.unwrap();
        remove_abandoned_builds(&store, &vms);
        assert!(
            build.exists() && build_vm.exists(),
            "a live build's files stay"
        );
        drop(held);

        remove_abandoned_builds(&store, &vms);
        assert!(!build.exists(), "the build dir goes");
        assert!(!build_vm.exists(), "the build VM's state dir goes");
        assert!(template.exists(), "published templates stay");
        for pod in &pods {
            assert!(pod.exists(), "{} stays", pod.display());
        }
    }

    #[test]
    fn no_template_store_no_sweep() {
        let root = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(root.path().join("templates"));
        remove_abandoned_builds(&store, &root.path().join("vms"));
        assert!(!store.root().exists(), "the sweep creates nothing");
    }
}
