//! Loading the kernel modules listed in the initramfs.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

/// The list of modules, relative to `/lib/modules/$(uname -r)/`, in load order.
pub const MODULE_LIST: &str = "/lib/modules/spry-modules.list";

/// Errors of loading one module.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("failed to read the module list {path}")]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to open module {path}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the kernel refused module {path}")]
    Load { path: PathBuf, source: Errno },
}

/// The module paths of a list file: one per line; blank lines and `#` comments are skipped.
pub fn parse_list(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect()
}

/// Loads one module file; an already loaded (or built-in) module is fine.
pub fn load(path: &Path) -> Result<(), ModuleError> {
    let file = std::fs::File::open(path).map_err(|source| ModuleError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let params = CString::default();
    match finit_module(&file, &params, ModuleInitFlags::empty()) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(source) => Err(ModuleError::Load {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Loads every module of the list under `modules_dir`. Keeps going after a failure (a
/// missing optional module must not stop the VM) and returns the failures.
pub fn load_all(list: &Path, modules_dir: &Path) -> Result<Vec<ModuleError>, ModuleError> {
    let text = std::fs::read_to_string(list).map_err(|source| ModuleError::List {
        path: list.to_path_buf(),
        source,
    })?;
    let mut failures = Vec::new();
    for relative in parse_list(&text) {
        let path = modules_dir.join(relative);
        match load(&path) {
            Ok(()) => tracing::debug!(module = %path.display(), "module loaded"),
            Err(err) => failures.push(err),
        }
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_keeps_order_and_skips_blanks_and_comments() {
        let text = "# virtio first\nkernel/drivers/virtio/virtio_mmio.ko\n\n  kernel/fs/erofs/erofs.ko  \n";
        assert_eq!(
            parse_list(text),
            vec![
                "kernel/drivers/virtio/virtio_mmio.ko",
                "kernel/fs/erofs/erofs.ko"
            ]
        );
    }

    #[test]
    fn a_missing_module_file_is_reported_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list");
        std::fs::write(&list, "missing.ko\n").unwrap();
        let failures = load_all(&list, dir.path()).unwrap();
        assert!(
            matches!(&failures[..], [ModuleError::Open { path, .. }] if path.ends_with("missing.ko"))
        );
    }
}
