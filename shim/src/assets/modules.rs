//! Resolving the guest's kernel modules and their load order from `modules.dep`.

use std::collections::{BTreeMap, HashSet};

/// The modules the guest needs: virtio transports and devices (the NIC too), SCSI disks,
/// the filesystems container layers use, and vsock. Their dependencies are
/// added by [`ModuleDeps::resolve_load_order`].
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtio_console",
    "virtio_scsi",
    "sd_mod",
    "virtio_blk",
    "erofs",
    "overlay",
    "virtio_rng",
    "virtio_net",
    "virtiofs",
    "vmw_vsock_virtio_transport",
    // Linux bridges in the pod (privileged and NET_ADMIN containers, CNI or Docker in a
    // pod); the guest has no modprobe for the kernel to load it on demand.
    "bridge",
];

/// Errors reading `modules.dep` or resolving modules.
#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("modules.dep line {line} is malformed")]
    Malformed { line: usize },
    #[error("kernel module {name:?} is not in modules.dep")]
    Unknown { name: String },
    #[error("kernel module {path:?} is listed as a dependency but has no entry of its own")]
    DanglingDependency { path: String },
    #[error("kernel modules depend on each other in a cycle through {path:?}")]
    Cycle { path: String },
}

/// Parsed `modules.dep`: module path (relative to `/lib/modules/<release>/`)
/// to the paths it depends on.
#[derive(Debug, Default)]
pub struct ModuleDeps {
    deps: BTreeMap<String, Vec<String>>,
}

impl ModuleDeps {
    pub fn parse(text: &str) -> Result<Self, ModulesError> {
        let mut deps = BTreeMap::new();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (module, rest) = line
                .split_once(':')
                .ok_or(ModulesError::Malformed { line: index + 1 })?;
            if module.is_empty() {
                return Err(ModulesError::Malformed { line: index + 1 });
            }
            deps.insert(
                module.to_owned(),
                rest.split_whitespace().map(str::to_owned).collect(),
            );
        }
        Ok(Self { deps })
    }

    /// The path of a module by name. Kernel module names treat `-` and `_`
    /// alike, and files may be compressed (`.ko.xz`, `.ko.zst`).
    pub fn path_of(&self, name: &str) -> Result<&str, ModulesError> {
        let wanted = normalize(name);
        self.deps
            .keys()
            .find(|path| module_name(path).is_some_and(|n| normalize(n) == wanted))
            .map(String::as_str)
            .ok_or_else(|| ModulesError::Unknown {
                name: name.to_owned(),
            })
    }

    /// Module paths in load order: every module after all of its
    /// dependencies, requested modules in the order given.
    pub fn resolve_load_order(&self, names: &[&str]) -> Result<Vec<String>, ModulesError> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        let mut visiting = HashSet::new();
        for name in names {
            let path = self.path_of(name)?;
            self.visit(path, &mut visiting, &mut done, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        path: &str,
        visiting: &mut HashSet<String>,
        done: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ModulesError> {
        if done.contains(path) {
            return Ok(());
        }
        if !visiting.insert(path.to_owned()) {
            return Err(ModulesError::Cycle {
                path: path.to_owned(),
            });
        }
        let deps = self
            .deps
            .get(path)
            .ok_or_else(|| ModulesError::DanglingDependency {
                path: path.to_owned(),
            })?;
        // modprobe loads the list right to left; do the same so that ties
        // resolve exactly as they would on a normal system.
        for dep in deps.iter().rev() {
            self.visit(dep, visiting, done, order)?;
        }
        visiting.remove(path);
        done.insert(path.to_owned());
        order.push(path.to_owned());
        Ok(())
    }
}

fn module_name(path: &str) -> Option<&str> {
    let file = path.rsplit('/').next()?;
    ["ko", "ko.xz", "ko.zst", "ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext)?.strip_suffix('.'))
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/scsi/virtio_scsi.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/fs/fuse/virtiofs.ko.xz: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fuse/fuse.ko:
";

    #[test]
    fn dependencies_come_first_without_duplicates() {
        let deps = ModuleDeps::parse(SAMPLE).unwrap();
        let order = deps
            .resolve_load_order(&["virtio_mmio", "virtio_scsi", "virtiofs"])
            .unwrap();
        let names: Vec<_> = order.iter().map(|p| module_name(p).unwrap()).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "scsi_common",
                "scsi_mod",
                "virtio_scsi",
                "fuse",
                "virtiofs"
            ]
        );
    }

    #[test]
    fn names_match_across_dash_and_underscore() {
        let deps = ModuleDeps::parse(SAMPLE).unwrap();
        assert_eq!(
            deps.path_of("virtio-scsi").unwrap(),
            "kernel/drivers/scsi/virtio_scsi.ko"
        );
    }

    #[test]
    fn unknown_dangling_and_cyclic_modules_are_errors() {
        let deps = ModuleDeps::parse(SAMPLE).unwrap();
        assert!(matches!(
            deps.resolve_load_order(&["nope"]),
            Err(ModulesError::Unknown { .. })
        ));
        let dangling = ModuleDeps::parse("a.ko: b.ko\n").unwrap();
        assert!(matches!(
            dangling.resolve_load_order(&["a"]),
            Err(ModulesError::DanglingDependency { .. })
        ));
        let cycle = ModuleDeps::parse("a.ko: b.ko\nb.ko: a.ko\n").unwrap();
        assert!(matches!(
            cycle.resolve_load_order(&["a"]),
            Err(ModulesError::Cycle { .. })
        ));
        assert!(matches!(
            ModuleDeps::parse("no colon here\n"),
            Err(ModulesError::Malformed { line: 1 })
        ));
    }
}
