//! Where templates live on disk, how they are checked, published, listed and removed.
//!
//! Layout under the store's root:
//! - `<key>/manifest.json`, `<key>/memory` (guest RAM), `<key>/state` (device state);
//! - `.build-<key>/`: a template being built (renamed to `<key>` when complete);
//! - `<key>.failed`: why the last build failed, so pods do not retry it on every start;
//! - `.lock`: held (flock) while a template is built, published or removed.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::TemplateError;

/// Build dirs' names begin with this (`<prefix><key>`).
pub(super) const BUILD_DIR_PREFIX: &str = ".build-";

/// Bump when the manifest or the files change meaning.
pub const MANIFEST_FORMAT: u32 = 1;
const MANIFEST: &str = "manifest.json";
const MEMORY: &str = "memory";
const STATE: &str = "state";
/// After a failed build, pods boot cold for this long before a build is tried again.
const FAILED_BUILD_BACKOFF: Duration = Duration::from_secs(600);

/// Size, inode and modification time of a file when the template was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub size: u64,
    pub inode: u64,
    pub mtime_s: i64,
    pub mtime_ns: i64,
}

impl FileStamp {
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            size: meta.size(),
            inode: meta.ino(),
            mtime_s: meta.mtime(),
            mtime_ns: meta.mtime_nsec(),
        })
    }
}

/// What a template was built from and what its files looked like when it was done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub key: String,
    pub created_unix_s: u64,
    pub qemu: PathBuf,
    pub qemu_version: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cpus: u32,
    pub memory_mib: u32,
    pub accel: String,
    pub build_ms: u64,
    pub memory: FileStamp,
    pub state: FileStamp,
    pub state_sha256: String,
}

impl Manifest {
    /// True when `other` is a template for the same kind of VM (same assets paths and size),
    /// which this one replaces.
    fn supersedes(&self, other: &Manifest) -> bool {
        self.key != other.key
            && self.kernel == other.kernel
            && self.initramfs == other.initramfs
            && self.qemu == other.qemu
            && self.cpus == other.cpus
            && self.memory_mib == other.memory_mib
    }
}

/// Why a template cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Damage {
    #[error("its {name} file is missing or unreadable")]
    Missing {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("its manifest is not valid")]
    Manifest {
        #[source]
        source: serde_json::Error,
    },
    #[error("its manifest has format {found}, this Spry writes {MANIFEST_FORMAT}")]
    Format { found: u32 },
    #[error("its {name} file changed after the template was built")]
    Changed { name: &'static str },
    #[error("its state file does not match the digest recorded at build time")]
    StateDigest,
}

/// A template dir found by [`TemplateStore::list`], usable or not.
pub type Listed = (PathBuf, Result<Template, Damage>);

/// A complete, checked template.
#[derive(Debug, Clone)]
pub struct Template {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Template {
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY)
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE)
    }
}

/// The templates of one state dir.
#[derive(Debug, Clone)]
pub struct TemplateStore {
    root: PathBuf,
}

/// The build lock; released when dropped.
pub struct StoreLock(#[allow(dead_code)] Flock<File>);

impl TemplateStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError + '_ {
        move |source| TemplateError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Takes the store's build lock, waiting for another builder to finish.
    pub async fn lock(&self) -> Result<StoreLock, TemplateError> {
        std::fs::create_dir_all(&self.root).map_err(Self::io_error(&self.root))?;
        let path = self.root.join(".lock");
        let file = File::create(&path).map_err(Self::io_error(&path))?;
        let locked = tokio::task::spawn_blocking(move || {
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| errno)
        })
        .await
        .unwrap_or(Err(nix::Error::EINTR));
        locked
            .map(StoreLock)
            .map_err(|source| TemplateError::Lock { path, source })
    }

    /// The build lock if no one holds it: `None` while a build is under way (a builder's
    /// flock dies with its process, so a killed builder never holds it).
    pub fn try_lock(&self) -> Option<StoreLock> {
        let file = File::create(self.root.join(".lock")).ok()?;
        Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .ok()
            .map(StoreLock)
    }

    /// The directory a template with `key` is built in before it is published.
    pub fn build_dir(&self, key: &str) -> PathBuf {
        self.root.join(format!("{BUILD_DIR_PREFIX}{key}"))
    }

    pub fn memory_file(dir: &Path) -> PathBuf {
        dir.join(MEMORY)
    }

    pub fn state_file(dir: &Path) -> PathBuf {
        dir.join(STATE)
    }

    /// The template for `key`: `Ok(None)` when there is none, `Damaged` when its files do
    /// not match its manifest.
    pub fn get(&self, key: &str) -> Result<Option<Template>, TemplateError> {
        let dir = self.root.join(key);
        if !dir.exists() {
            return Ok(None);
        }
        check(&dir)
            .map(Some)
            .map_err(|damage| TemplateError::Damaged { dir, damage })
    }

    /// Every template in the store, with the damage of those that cannot be used.
    pub fn list(&self) -> Result<Vec<Listed>, TemplateError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io_error(&self.root)(e)),
        };
        let mut templates: Vec<_> = entries
            .flatten()
            .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| {
                let dir = e.path();
                let checked = check(&dir);
                (dir, checked)
            })
            .collect();
        templates.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(templates)
    }

    /// Removes the template `key`. VMs restored from it keep running: their mappings hold
    /// the memory file until they exit.
    pub fn remove(&self, key: &str) -> Result<(), TemplateError> {
        let dir = self.root.join(key);
        if !dir.exists() {
            return Err(TemplateError::NotFound {
                key: key.to_owned(),
                root: self.root.clone(),
            });
        }
        std::fs::remove_dir_all(&dir).map_err(Self::io_error(&dir))?;
        let _ = std::fs::remove_file(self.failure_file(key));
        self.clear_slow_restores(key);
        Ok(())
    }

    /// Moves a finished build into place as the template `key`, replacing a damaged one.
    pub fn publish(&self, key: &str, build_dir: &Path) -> Result<Template, TemplateError> {
        let dir = self.root.join(key);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(Self::io_error(&dir))?;
        }
        std::fs::rename(build_dir, &dir).map_err(Self::io_error(&dir))?;
        let _ = std::fs::remove_file(self.failure_file(key));
        self.clear_slow_restores(key);
        check(&dir).map_err(|damage| TemplateError::Damaged { dir, damage })
    }

    /// Removes templates that `current` replaces (an older kernel, initramfs or QEMU for the
    /// same kind of VM), so asset upgrades do not pile up guest-RAM-sized files.
    pub fn remove_superseded(&self, current: &Manifest) {
        let Ok(templates) = self.list() else { return };
        for (dir, checked) in templates {
            let superseded = match &checked {
                Ok(template) => current.supersedes(&template.manifest),
                Err(_) => false,
            };
            if superseded {
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => info!(dir = %dir.display(), "removed superseded template"),
                    Err(e) => {
                        warn!(dir = %dir.display(), error = %e, "cannot remove superseded template")
                    }
                }
            }
        }
    }

    fn slow_restores_file(&self, key: &str) -> PathBuf {
        self.root.join(format!("{key}.slow-restores"))
    }

    /// Counts a restore of `key` whose clone did not answer in time; how many in a row.
    /// (Shims are per pod: the count lives next to the template.)
    pub fn note_slow_restore(&self, key: &str) -> u32 {
        let path = self.slow_restores_file(key);
        let count = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .unwrap_or(0)
            .saturating_add(1);
        if let Err(e) = std::fs::write(&path, count.to_string()) {
            warn!(path = %path.display(), error = %e, "cannot count a slow template restore");
        }
        count
    }

    /// A restore of `key` answered: the slow ones before were the node's load.
    pub fn clear_slow_restores(&self, key: &str) {
        let _ = std::fs::remove_file(self.slow_restores_file(key));
    }

    fn failure_file(&self, key: &str) -> PathBuf {
        self.root.join(format!("{key}.failed"))
    }

    /// Remembers that building `key` failed with `error`.
    pub fn record_failure(&self, key: &str, error: &str) {
        let path = self.failure_file(key);
        if let Err(e) = std::fs::write(&path, error) {
            warn!(path = %path.display(), error = %e, "cannot record the template build failure");
        }
    }

    /// The error of a build of `key` that failed recently, if any.
    pub fn recent_failure(&self, key: &str) -> Option<String> {
        let path = self.failure_file(key);
        let modified = std::fs::metadata(&path).ok()?.modified().ok()?;
        let age = SystemTime::now()
            .duration_since(modified)
            .unwrap_or_default();
        if age > FAILED_BUILD_BACKOFF {
            return None;
        }
        std::fs::read_to_string(&path).ok()
    }
}

/// Reads `dir`'s manifest and checks the files against it. The memory file is compared by
/// size, inode and mtime (hashing guest RAM would cost more than the restore it guards);
/// the small state file by its digest.
fn check(dir: &Path) -> Result<Template, Damage> {
    let text = std::fs::read(dir.join(MANIFEST)).map_err(|source| Damage::Missing {
        name: "manifest",
        source,
    })?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|source| Damage::Manifest { source })?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(Damage::Format {
            found: manifest.format,
        });
    }
    for (name, file, recorded) in [
        ("memory", MEMORY, &manifest.memory),
        ("state", STATE, &manifest.state),
    ] {
        let stamp =
            FileStamp::of(&dir.join(file)).map_err(|source| Damage::Missing { name, source })?;
        if stamp != *recorded {
            return Err(Damage::Changed { name });
        }
    }
    let state = std::fs::read(dir.join(STATE)).map_err(|source| Damage::Missing {
        name: "state",
        source,
    })?;
    if hex::encode(Sha256::digest(&state)) != manifest.state_sha256 {
        return Err(Damage::StateDigest);
    }
    Ok(Template {
        dir: dir.to_path_buf(),
        manifest,
    })
}

/// Seconds since the epoch, for manifests.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The digest recorded for a state file.
pub fn state_digest(path: &Path) -> std::io::Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template dir with files and a manifest that matches them.
    fn fake_template(store: &TemplateStore, key: &str, kernel: &str) -> PathBuf {
        let dir = store.build_dir(key);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(MEMORY), vec![7u8; 8192]).unwrap();
        std::fs::write(dir.join(STATE), b"device state").unwrap();
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            key: key.into(),
            created_unix_s: unix_now(),
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            qemu_version: "QEMU emulator version 10.0.2".into(),
            kernel: kernel.into(),
            initramfs: "/g/initramfs.img".into(),
            cpus: 1,
            memory_mib: 256,
            accel: "tcg".into(),
            build_ms: 1,
            memory: FileStamp::of(&dir.join(MEMORY)).unwrap(),
            state: FileStamp::of(&dir.join(STATE)).unwrap(),
            state_sha256: state_digest(&dir.join(STATE)).unwrap(),
        };
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&manifest).unwrap()).unwrap();
        dir
    }

    #[test]
    fn slow_restores_count_up_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(dir.path().join("templates"));
        std::fs::create_dir_all(store.root()).unwrap();
        assert_eq!(store.note_slow_restore("k"), 1);
        assert_eq!(store.note_slow_restore("k"), 2);
        assert_eq!(store.note_slow_restore("other"), 1);
        store.clear_slow_restores("k");
        assert_eq!(store.note_slow_restore("k"), 1);
    }

    #[test]
    fn published_templates_are_found_listed_and_removed() {
        let root = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(root.path());
        assert!(store.get("k1").unwrap().is_none());
        let build = fake_template(&store, "k1", "/g/vmlinux");
        let template = store.publish("k1", &build).unwrap();
        assert!(!build.exists());
        assert_eq!(template.memory_path(), root.path().join("k1/memory"));
        assert_eq!(store.get("k1").unwrap().unwrap().manifest.key, "k1");
        assert_eq!(store.list().unwrap().len(), 1);
        store.remove("k1").unwrap();
        assert!(store.get("k1").unwrap().is_none());
        assert!(matches!(
            store.remove("k1"),
            Err(TemplateError::NotFound { .. })
        ));
    }

    #[test]
    fn a_rewritten_memory_file_or_state_file_is_damage() {
        let root = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(root.path());
        let build = fake_template(&store, "k1", "/g/vmlinux");
        store.publish("k1", &build).unwrap();
        std::fs::write(root.path().join("k1/memory"), vec![0u8; 100]).unwrap();
        let err = store.get("k1").unwrap_err();
        assert!(
            matches!(
                err,
                TemplateError::Damaged {
                    damage: Damage::Changed { name: "memory" },
                    ..
                }
            ),
            "{err}"
        );

        let build = fake_template(&store, "k2", "/g/vmlinux");
        store.publish("k2", &build).unwrap();
        std::fs::remove_file(root.path().join("k2/state")).unwrap();
        let err = store.get("k2").unwrap_err();
        assert!(err.to_string().contains("state file is missing"), "{err}");
    }

    #[test]
    fn a_new_kernel_supersedes_the_old_template() {
        let root = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(root.path());
        let old = store
            .publish("old", &fake_template(&store, "old", "/g/vmlinux"))
            .unwrap();
        let other_kernel = store
            .publish("other", &fake_template(&store, "other", "/h/vmlinux"))
            .unwrap();
        let new = store
            .publish("new", &fake_template(&store, "new", "/g/vmlinux"))
            .unwrap();
        store.remove_superseded(&new.manifest);
        assert!(!old.dir.exists());
        assert!(other_kernel.dir.exists());
        assert!(new.dir.exists());
    }

    #[test]
    fn failures_are_remembered() {
        let root = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(root.path());
        assert!(store.recent_failure("k").is_none());
        store.record_failure("k", "QEMU too old");
        assert_eq!(store.recent_failure("k").as_deref(), Some("QEMU too old"));
    }
}
