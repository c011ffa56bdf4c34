//! QEMU's jail, in the manner of Firecracker's jailer: an unprivileged uid of its own, a
//! mount namespace whose root holds only the files QEMU opens by name (its binary and
//! libraries, firmware, kernel, initramfs, the template memory file), all read-only except
//! a template's memory while it is built. Everything else (sockets, console, disks, taps,
//! /dev/kvm, migration streams) is opened here and handed over as an fd.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sys::{Jail, JailEntry};

use super::VmError;

/// The uids jailed QEMUs run as: `base..base + count`, one per running VM, so that one
/// compromised QEMU cannot signal, trace or read another. All share the group `base`, which
/// may read template memory files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailIds {
    pub uid_base: u32,
    pub count: u32,
}

/// Above systemd's container range (524288-1879048191) and below its foreign range
/// (0x7FFE0000): ids no distribution hands out.
pub const DEFAULT_UID_BASE: u32 = 0x7A00_0000;
pub const DEFAULT_UID_COUNT: u32 = 4096;

impl Default for JailIds {
    fn default() -> Self {
        Self {
            uid_base: DEFAULT_UID_BASE,
            count: DEFAULT_UID_COUNT,
        }
    }
}

impl JailIds {
    /// The group every jailed QEMU runs as.
    pub fn gid(&self) -> u32 {
        self.uid_base
    }
}

/// A uid held for one VM: a lock on `<dir>/<uid>` that the kernel drops when the holder
/// goes (a shim that dies frees its uid with no clean-up). The holder removes the file
/// when it lets go, so the dir lists the uids in use.
#[derive(Debug)]
pub struct UidLease {
    pub uid: u32,
    pub gid: u32,
    path: PathBuf,
    _lock: File,
}

impl Drop for UidLease {
    fn drop(&mut self) {
        // Removed while still locked: a taker that opened the old file finds it unlinked
        // (see `lock_slot`) and tries again.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Locks `path` if no one holds it; `None` when someone does.
fn lock_slot(path: &Path) -> std::io::Result<Option<File>> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(source)) => return Err(source),
        }
        let held = lock.metadata()?;
        match std::fs::metadata(path) {
            // Still the file at that name: ours.
            Ok(named) if (named.dev(), named.ino()) == (held.dev(), held.ino()) => {
                return Ok(Some(lock))
            }
            // Its last holder removed it between our open and our lock: start over.
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
}

impl UidLease {
    /// Takes a free uid, trying the VM id's own slot first so that a scan is rare.
    pub fn take(dir: &Path, ids: JailIds, vm_id: &str) -> Result<Self, VmError> {
        let io = |source| VmError::JailUid {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let count = ids.count.max(1);
        let start = vm_id.bytes().fold(0x811c_9dc5_u32, |hash, b| {
            (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
        }) % count;
        for offset in 0..count {
            let uid = ids.uid_base + (start + offset) % count;
            let path = dir.join(uid.to_string());
            if let Some(lock) = lock_slot(&path).map_err(io)? {
                return Ok(Self {
                    uid,
                    gid: ids.gid(),
                    path,
                    _lock: lock,
                });
            }
        }
        Err(VmError::NoFreeJailUid {
            first: ids.uid_base,
            count,
        })
    }
}

/// What the jail's root holds beyond the system's: files bound at their own paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JailFiles {
    /// Read-only (binary, kernel, initramfs, a clone's template memory).
    pub read_only: Vec<PathBuf>,
    /// Writable: a template's memory file while the template is built.
    pub writable: Vec<PathBuf>,
}

/// The top-level entries a dynamically linked program needs: a merged-/usr system links
/// them into /usr, an older one has them as dirs.
const SYSTEM_DIRS: [&str; 7] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];
/// Files QEMU's loader reads by name.
const SYSTEM_FILES: [&str; 1] = ["/etc/ld.so.cache"];
/// Device nodes a program may open by name; nothing that reaches hardware.
const DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"];

/// Lays out the jail whose root tmpfs is mounted on `root`, holding the system's program
/// dirs, the few device nodes above and `files` (absolute, canonical paths).
pub fn plan(root: &Path, files: &JailFiles, uid: u32, gid: u32) -> Result<Jail, VmError> {
    let mut layout = Layout {
        root: root.to_path_buf(),
        entries: Vec::new(),
        made: Vec::new(),
    };
    for dir in SYSTEM_DIRS {
        let dir = Path::new(dir);
        match std::fs::symlink_metadata(dir) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = std::fs::read_link(dir).map_err(|source| VmError::JailFile {
                    path: dir.to_path_buf(),
                    source,
                })?;
                layout.symlink(&target, dir)?;
            }
            Ok(meta) if meta.is_dir() => layout.bind(dir, true, false, false, true)?,
            _ => {}
        }
    }
    for file in SYSTEM_FILES.iter().map(Path::new).filter(|p| p.is_file()) {
        layout.bind(file, false, false, false, false)?;
    }
    for device in DEVICES.iter().map(Path::new).filter(|p| p.exists()) {
        // A read-only mount still lets a device node be written: it only keeps the node.
        layout.bind(device, false, false, true, false)?;
    }
    for file in &files.read_only {
        // A file under a bound system dir (QEMU in /usr/bin) is there already.
        if !layout.covers(file) {
            layout.bind(file, false, false, false, true)?;
        }
    }
    for file in &files.writable {
        layout.bind(file, false, true, false, false)?;
    }
    Ok(Jail {
        root: c_string(root)?,
        entries: layout.entries,
        uid,
        gid,
    })
}

struct Layout {
    root: PathBuf,
    entries: Vec<JailEntry>,
    /// Jail paths made so far (dirs, links, bind targets).
    made: Vec<PathBuf>,
}

impl Layout {
    fn inside(&self, path: &Path) -> Result<CString, VmError> {
        let relative = path
            .strip_prefix("/")
            .ok()
            .filter(|rel| {
                rel.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
            })
            .ok_or_else(|| VmError::JailFile {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not an absolute, canonical path",
                ),
            })?;
        c_string(&self.root.join(relative))
    }

    /// Whether `path` lies under a dir bound whole.
    fn covers(&self, path: &Path) -> bool {
        self.entries.iter().zip(&self.made).any(|(entry, made)| {
            matches!(entry, JailEntry::Bind { is_dir: true, .. }) && path.starts_with(made)
        })
    }

    fn parents(&mut self, path: &Path) -> Result<(), VmError> {
        let mut missing: Vec<PathBuf> = path
            .ancestors()
            .skip(1)
            .filter(|dir| *dir != Path::new("/") && !self.made.iter().any(|m| m == dir))
            .map(Path::to_path_buf)
            .collect();
        missing.reverse();
        for dir in missing {
            let inside = self.inside(&dir)?;
            self.entries.push(JailEntry::Dir { path: inside });
            self.made.push(dir);
        }
        Ok(())
    }

    fn symlink(&mut self, target: &Path, path: &Path) -> Result<(), VmError> {
        self.parents(path)?;
        let inside = self.inside(path)?;
        self.entries.push(JailEntry::Symlink {
            target: c_string(target)?,
            path: inside,
        });
        self.made.push(path.to_path_buf());
        Ok(())
    }

    fn bind(
        &mut self,
        source: &Path,
        is_dir: bool,
        writable: bool,
        devices: bool,
        exec: bool,
    ) -> Result<(), VmError> {
        self.parents(source)?;
        let inside = self.inside(source)?;
        self.entries.push(JailEntry::Bind {
            source: c_string(source)?,
            path: inside,
            is_dir,
            writable,
            devices,
            exec,
        });
        self.made.push(source.to_path_buf());
        Ok(())
    }
}

fn c_string(path: &Path) -> Result<CString, VmError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| VmError::JailFile {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path holds a NUL"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(jail: &Jail) -> Vec<(String, String)> {
        jail.entries
            .iter()
            .map(|entry| match entry {
                JailEntry::Dir { path } => ("dir".into(), path.to_string_lossy().into_owned()),
                JailEntry::Symlink { path, .. } => {
                    ("link".into(), path.to_string_lossy().into_owned())
                }
                JailEntry::Bind { path, writable, .. } => (
                    if *writable { "rw" } else { "ro" }.into(),
                    path.to_string_lossy().into_owned(),
                ),
            })
            .collect()
    }

    #[test]
    fn the_jail_holds_the_system_the_vms_files_and_nothing_writable_but_template_memory() {
        let files = JailFiles {
            read_only: vec![
                "/usr/bin/qemu-system-x86_64".into(),
                "/opt/spry/guest/vmlinux".into(),
                "/opt/spry/guest/initramfs.img".into(),
            ],
            writable: vec!["/var/lib/spry/templates/build/memory".into()],
        };
        let jail = plan(Path::new("/run/spry/vms/a/jail"), &files, 7, 8).unwrap();
        let entries = paths(&jail);
        let has = |kind: &str, path: &str| {
            entries
                .iter()
                .any(|(k, p)| k == kind && p == &format!("/run/spry/vms/a/jail{path}"))
        };
        assert!(has("ro", "/usr"));
        assert!(has("ro", "/dev/null"));
        assert!(has("ro", "/opt/spry/guest/vmlinux"));
        assert!(has("dir", "/opt/spry/guest"));
        assert!(has("dir", "/opt"));
        assert!(has("rw", "/var/lib/spry/templates/build/memory"));
        // QEMU itself comes with /usr; /opt/spry/guest is made once.
        assert!(!has("ro", "/usr/bin/qemu-system-x86_64"));
        let opt_dirs = entries
            .iter()
            .filter(|(k, p)| k == "dir" && p.ends_with("/opt/spry/guest"));
        assert_eq!(opt_dirs.count(), 1);
        let writable: Vec<_> = entries.iter().filter(|(k, _)| k == "rw").collect();
        assert_eq!(writable.len(), 1, "{entries:?}");
        assert_eq!((jail.uid, jail.gid), (7, 8));
    }

    #[test]
    fn relative_or_dotted_paths_are_refused() {
        for bad in ["vmlinux", "/opt/../etc/shadow"] {
            let files = JailFiles {
                read_only: vec![bad.into()],
                writable: Vec::new(),
            };
            let err = plan(Path::new("/j"), &files, 1, 1).unwrap_err();
            assert!(matches!(err, VmError::JailFile { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn each_vm_gets_its_own_uid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let ids = JailIds {
            uid_base: 5000,
            count: 2,
        };
        let a = UidLease::take(dir.path(), ids, "a").unwrap();
        let b = UidLease::take(dir.path(), ids, "a").unwrap();
        assert_ne!(a.uid, b.uid);
        assert!((5000..5002).contains(&a.uid) && (5000..5002).contains(&b.uid));
        assert_eq!((a.gid, b.gid), (5000, 5000));
        let full = UidLease::take(dir.path(), ids, "c").unwrap_err();
        assert!(
            matches!(full, VmError::NoFreeJailUid { count: 2, .. }),
            "{full}"
        );
        let freed = a.uid;
        drop(a);
        let c = UidLease::take(dir.path(), ids, "c").unwrap();
        assert_eq!(c.uid, freed);
        drop((b, c));
        // Only the uids in use are listed.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
