//! Directories a layer implies without an entry (it has `a/b/c` but no `a/b`) take the
//! attributes the layers below give them, as containerd's unpacker leaves them: it writes
//! into an overlay of the parent layers, where such a directory already exists. A layer
//! mounted on its own would otherwise present `a/b` as 0755 root:root and, being upper,
//! hide the lower directory's owner, mode and xattrs.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The attributes of a directory in a lower layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirMeta {
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// The layers below this one, topmost first (each the directory a layer is served from).
#[derive(Debug, Clone, Default)]
pub struct LowerLayers {
    dirs: Vec<PathBuf>,
}

impl LowerLayers {
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        LowerLayers { dirs }
    }

    /// The directory at `path` (relative, cleaned) in the topmost lower layer that has an
    /// entry there; `None` when none has, or the topmost entry is not a directory (a
    /// file or a whiteout: the directory is new).
    pub fn dir(&self, path: &str) -> Option<DirMeta> {
        for layer in &self.dirs {
            let full = layer.join(path);
            let Ok(meta) = std::fs::symlink_metadata(&full) else {
                continue;
            };
            if !meta.is_dir() {
                return None;
            }
            let xattrs = crate::sys::listxattr(&full)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|name| {
                    let value = crate::sys::getxattr(&full, &name).ok()?;
                    Some((name, value))
                })
                .collect();
            return Some(DirMeta {
                perm: (meta.mode() & 0o7777) as u16,
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: UNIX_EPOCH + Duration::from_secs(meta.mtime().max(0) as u64),
                xattrs,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_topmost_lower_entry_decides() {
        let dir = tempfile::tempdir().unwrap();
        let (upper, lower) = (dir.path().join("l2"), dir.path().join("l1"));
        std::fs::create_dir_all(lower.join("home/app")).unwrap();
        std::fs::set_permissions(
            lower.join("home/app"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        nix::unistd::chown(
            &lower.join("home/app"),
            Some(1000.into()),
            Some(1001.into()),
        )
        .unwrap();
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        std::fs::create_dir_all(lower.join("etc/conf.d")).unwrap();
        // In the upper lower layer, etc/conf.d is a file: a directory implied there is new.
        std::fs::write(upper.join("etc/conf.d"), b"").unwrap();
        let lowers = LowerLayers::new(vec![upper, lower]);
        let app = lowers.dir("home/app").unwrap();
        assert_eq!((app.perm, app.uid, app.gid), (0o700, 1000, 1001));
        assert_eq!(lowers.dir("etc/conf.d"), None);
        assert_eq!(lowers.dir("nowhere"), None);
    }
}
