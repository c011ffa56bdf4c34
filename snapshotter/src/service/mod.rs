//! The containerd snapshots service: overlayfs semantics for ordinary
//! layers, remote (lazily fetched) snapshots for eStargz layers.

mod chunks;
mod daemon;
mod error;
mod filter;
mod layer_daemon;
mod mounts;
mod native;
pub mod remote;
mod run_to_end;
pub mod store;
mod unpacked_images;
mod usage;
pub(crate) mod verify;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use containerd_snapshots::{api::types::Mount, Info, Kind, Snapshotter, Usage};
use tokio::sync::Mutex;

pub use daemon::DaemonError;
pub use error::ServiceError;
use filter::Filters;
pub use layer_daemon::{run as run_layer_daemon, LayerDaemonError};
use remote::{remote_request, RemoteLayers};
pub use run_to_end::RunToEnd;
use store::{system_time, timestamp, Record, RemoteSource, SnapshotKind, Store};
use unpacked_images::UnpackedImages;
pub use unpacked_images::PENDING_FILE as UNPACKED_IMAGE_PENDING_FILE;

use crate::config::Config;
use crate::fs::error_chain;
use crate::registry::RegistryClient;

/// Errors starting the service.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("failed to create state directory {path}")]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to load snapshot metadata")]
    Store(#[from] store::StoreError),
    #[error("failed to open the chunk cache")]
    Cache(#[from] crate::cache::CacheError),
    #[error("failed to set up the registry client's TLS")]
    Tls(#[from] crate::registry::TlsConfigError),
}

/// Spry's snapshotter.
pub struct SprySnapshotter {
    root: PathBuf,
    store: Mutex<Store>,
    remote: Arc<RemoteLayers>,
    lazy: bool,
    /// erofs images of unpacked layers for Spry's VMs (`lazy.vm_images`).
    unpacked_images: Option<Arc<UnpackedImages>>,
}

impl SprySnapshotter {
    /// Opens the state under `config.root` and remounts remote layers.
    pub async fn open(config: &Config) -> Result<Arc<Self>, StartError> {
        let root = config.root.clone();
        // 0700: layers hold an image's setuid binaries and device nodes, which no other
        // local user may reach (containerd's CVE-2021-41103).
        for dir in [root.clone(), root.join("snapshots")] {
            crate::private::create_dir(&dir).map_err(|source| StartError::Root {
                path: dir.clone(),
                source,
            })?;
        }
        let mut store = Store::load(&root.join("metadata.json"))?;
        // A crash between allocating an id and saving its record may have left that id's
        // directory (even a live layer daemon's mount): never hand it out again.
        store.reserve_ids_through(highest_snapshot_dir(&root.join("snapshots")));
        let cache = Arc::new(config.lazy.open_cache(&root.join("cache"))?);
        let client = Arc::new(RegistryClient::new(config.registry.clone())?);
        let remote = Arc::new(RemoteLayers::new(
            client,
            cache,
            config.lazy.clone(),
            tokio::runtime::Handle::current(),
        ));
        let this = Arc::new(SprySnapshotter {
            root,
            store: Mutex::new(store),
            remote,
            lazy: config.lazy.enabled,
            unpacked_images: config.lazy.vm_images.then(UnpackedImages::new),
        });
        this.restore_remote_mounts().await;
        this.resume_unpacked_images().await;
        Ok(this)
    }

    /// The remote layers (for stats and tests).
    pub fn remote_layers(&self) -> &Arc<RemoteLayers> {
        &self.remote
    }

    /// Id of a snapshot, for tests and tools.
    pub async fn id_of(&self, key: &str) -> Option<u64> {
        self.store.lock().await.get(key).map(|r| r.id)
    }

    /// Waits for the unpacked layers' image builds queued so far (tests).
    pub async fn settle_unpacked_images(&self) {
        if let Some(images) = &self.unpacked_images {
            images.settle().await;
        }
    }

    /// Queues the images that committed unpacked layers lack (a restart cut their build
    /// short, or `vm_images` was turned on since).
    async fn resume_unpacked_images(&self) {
        let Some(images) = &self.unpacked_images else {
            return;
        };
        let layers: Vec<(u64, PathBuf, u64)> = {
            let store = self.store.lock().await;
            store
                .iter()
                .filter(|(_, r)| r.kind == SnapshotKind::Committed && r.remote.is_none())
                .map(|(_, r)| {
                    let size = r.usage.map(|(bytes, _)| bytes.max(0) as u64).unwrap_or(0);
                    (r.id, self.dir(r.id), size)
                })
                .collect()
        };
        images.resume(layers);
    }

    /// Unmounts all remote layers (shutdown).
    pub fn shutdown(&self) {
        self.remote.unmount_all();
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// The layers a snapshot on `parent` sits over, topmost first: where they are served.
    async fn lower_layers(&self, parent: &str) -> Vec<PathBuf> {
        let store = self.store.lock().await;
        store
            .chain(parent)
            .into_iter()
            .map(|id| self.dir(id).join("fs"))
            .collect()
    }

    async fn restore_remote_mounts(&self) {
        let remote: Vec<(String, Record)> = {
            let store = self.store.lock().await;
            store
                .iter()
                .filter(|(_, r)| r.remote.is_some())
                .map(|(k, r)| (k.clone(), r.clone()))
                .collect()
        };
        for (key, record) in remote {
            let Some(source) = &record.remote else {
                continue;
            };
            let lowers = self.lower_layers(&record.parent).await;
            if let Err(err) = self
                .remote
                .restore(record.id, source, &self.dir(record.id), &lowers)
                .await
            {
                tracing::error!(snapshot = %key, error = %error_chain(&err), "failed to restore remote layer mount");
            }
        }
    }

    /// Mounts again every remote layer under `parent` whose layer daemon died, so that
    /// what is built on it now reads a live mount.
    async fn revive_dead_layers(&self, parent: &str) {
        let dead: Vec<(u64, RemoteSource, String)> = {
            let store = self.store.lock().await;
            let chain = store.chain(parent);
            store
                .iter()
                .filter(|(_, r)| chain.contains(&r.id) && self.remote.daemon_died(r.id))
                .filter_map(|(_, r)| Some((r.id, r.remote.clone()?, r.parent.clone())))
                .collect()
        };
        for (id, source, below) in dead {
            let lowers = self.lower_layers(&below).await;
            if let Err(err) = self
                .remote
                .revive(id, &source, &self.dir(id), &lowers)
                .await
            {
                tracing::error!(id, error = %error_chain(&err), "cannot serve a remote layer again after its daemon died");
            }
        }
    }

    async fn create(
        &self,
        kind: SnapshotKind,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, ServiceError> {
        if !parent.is_empty() {
            self.revive_dead_layers(&parent).await;
        }
        if kind == SnapshotKind::Active && self.lazy {
            if let Some(request) = remote_request(&labels) {
                if let Some(result) = self.try_remote(&request, &parent, &labels).await {
                    return Err(result);
                }
            }
        }
        let mut store = self.store.lock().await;
        if store.get(&key).is_some() {
            return Err(ServiceError::AlreadyExists { key });
        }
        if !parent.is_empty() {
            match store.get(&parent) {
                None => return Err(ServiceError::NotFound { key: parent }),
                Some(p) if p.kind != SnapshotKind::Committed => {
                    return Err(ServiceError::ParentNotCommitted { parent })
                }
                Some(_) => {}
            }
            // Nothing is built on a layer that turned out not to be what its image claimed.
            for id in store.chain(&parent) {
                if let Some(reason) = verify::poisoned(&self.dir(id)) {
                    return Err(ServiceError::Poisoned { parent, reason });
                }
            }
        }
        let id = store.allocate_id();
        let dir = self.dir(id);
        let make = |p: PathBuf| {
            std::fs::create_dir_all(&p)
                .map_err(|source| ServiceError::CreateDir { path: p, source })
        };
        let created = make(dir.join("fs")).and_then(|_| make(dir.join("work")));
        if let Err(err) = created {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(err);
        }
        let now = timestamp(SystemTime::now());
        let record = Record {
            id,
            kind,
            parent,
            labels,
            created: now,
            updated: now,
            usage: None,
            remote: None,
        };
        store.insert(key.clone(), record);
        if let Err(err) = store.save() {
            store.remove(&key);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(err.into());
        }
        Ok(mounts::for_snapshot(&self.root, &store, &key))
    }

    /// Mounts a remote layer and commits it as the target. Returns the error
    /// to answer containerd with (AlreadyExists on success), or `None` to fall
    /// back to a normal snapshot that containerd fills by downloading.
    async fn try_remote(
        &self,
        request: &remote::RemoteRequest,
        parent: &str,
        labels: &HashMap<String, String>,
    ) -> Option<ServiceError> {
        let target = &request.target;
        let id = {
            let mut store = self.store.lock().await;
            if store.get(target).is_some() {
                return Some(ServiceError::AlreadyExists {
                    key: target.clone(),
                });
            }
            if !parent.is_empty()
                && store.get(parent).map(|p| p.kind) != Some(SnapshotKind::Committed)
            {
                return None;
            }
            let id = store.allocate_id();
            // The id is used on disk (and by a layer daemon) before its record exists:
            // persist the counter first, so a restart never reuses it.
            if let Err(err) = store.save() {
                tracing::warn!(target = %target, error = %error_chain(&err), "cannot save snapshot metadata; pulling normally");
                return None;
            }
            id
        };
        let fs_dir = self.dir(id).join("fs");
        if let Err(err) = std::fs::create_dir_all(&fs_dir) {
            tracing::warn!(target = %target, error = %err, "cannot create remote snapshot dir; pulling normally");
            return None;
        }
        let started = std::time::Instant::now();
        let lowers = self.lower_layers(parent).await;
        let mut source = request.source.clone();
        source.parent_chain = parent.to_string();
        let mounted = self.remote.mount(id, &source, &self.dir(id), &lowers).await;
        if let Err(err) = mounted {
            tracing::warn!(target = %target, error = %error_chain(&err), "remote layer unavailable; pulling normally");
            let _ = std::fs::remove_dir_all(self.dir(id));
            return None;
        }
        let mut store = self.store.lock().await;
        if store.get(target).is_some() {
            // Lost a race with another Prepare of the same layer.
            self.remote.unmount(id);
            let _ = std::fs::remove_dir_all(self.dir(id));
            return Some(ServiceError::AlreadyExists {
                key: target.clone(),
            });
        }
        let now = timestamp(SystemTime::now());
        let record = Record {
            id,
            kind: SnapshotKind::Committed,
            parent: parent.to_string(),
            labels: labels.clone(),
            created: now,
            updated: now,
            usage: None,
            remote: Some(source),
        };
        store.insert(target.clone(), record);
        if let Err(err) = store.save() {
            store.remove(target);
            drop(store);
            self.remote.unmount(id);
            let _ = std::fs::remove_dir_all(self.dir(id));
            return Some(err.into());
        }
        tracing::info!(target = %target, elapsed_ms = started.elapsed().as_millis() as u64, "committed remote snapshot");
        Some(ServiceError::AlreadyExists {
            key: target.clone(),
        })
    }

    fn info(key: &str, r: &Record) -> Info {
        Info {
            kind: match r.kind {
                SnapshotKind::View => Kind::View,
                SnapshotKind::Active => Kind::Active,
                SnapshotKind::Committed => Kind::Committed,
            },
            name: key.to_string(),
            parent: r.parent.clone(),
            labels: r.labels.clone(),
            created_at: system_time(r.created),
            updated_at: system_time(r.updated),
        }
    }

    async fn measure(path: PathBuf) -> Result<(i64, i64), ServiceError> {
        let p = path.clone();
        tokio::task::spawn_blocking(move || usage::disk_usage(&p))
            .await
            .map_err(|source| ServiceError::Join { source })?
            .map_err(|source| ServiceError::Usage { path, source })
    }

    fn remove_dir(&self, id: u64) {
        let dir = self.dir(id);
        if let Err(err) = std::fs::remove_dir_all(&dir) {
            if err.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %dir.display(), error = %err, "failed to remove snapshot directory; Cleanup will retry");
            }
        }
    }
}

/// The highest numeric name under `snapshots` (0 when none).
fn highest_snapshot_dir(snapshots: &Path) -> u64 {
    std::fs::read_dir(snapshots)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

#[tonic::async_trait]
impl Snapshotter for SprySnapshotter {
    type Error = ServiceError;

    async fn stat(&self, key: String) -> Result<Info, Self::Error> {
        let store = self.store.lock().await;
        let r = store
            .get(&key)
            .ok_or_else(|| ServiceError::NotFound { key: key.clone() })?;
        Ok(Self::info(&key, r))
    }

    async fn update(
        &self,
        info: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, Self::Error> {
        let mut store = self.store.lock().await;
        let key = info.name.clone();
        let r = store
            .get_mut(&key)
            .ok_or_else(|| ServiceError::NotFound { key: key.clone() })?;
        let paths = fieldpaths.unwrap_or_default();
        let mut labels = r.labels.clone();
        if paths.is_empty() {
            labels = info.labels.clone();
        }
        for path in &paths {
            if path == "labels" {
                labels = info.labels.clone();
            } else if let Some(label) = path.strip_prefix("labels.") {
                match info.labels.get(label) {
                    Some(v) => labels.insert(label.to_string(), v.clone()),
                    None => labels.remove(label),
                };
            } else {
                return Err(ServiceError::UpdateField {
                    field: path.clone(),
                });
            }
        }
        let before = r.clone();
        r.labels = labels;
        r.updated = timestamp(SystemTime::now());
        let out = Self::info(&key, r);
        if let Err(err) = store.save() {
            store.insert(key, before);
            return Err(err.into());
        }
        Ok(out)
    }

    async fn usage(&self, key: String) -> Result<Usage, Self::Error> {
        let (id, kind, stored, remote) = {
            let store = self.store.lock().await;
            let r = store
                .get(&key)
                .ok_or_else(|| ServiceError::NotFound { key: key.clone() })?;
            (r.id, r.kind, r.usage, r.remote.is_some())
        };
        if remote {
            if let Some((size, inodes)) = self.remote.usage(id) {
                return Ok(Usage { size, inodes });
            }
        }
        if let (SnapshotKind::Committed, Some((size, inodes))) = (kind, stored) {
            return Ok(Usage { size, inodes });
        }
        let (size, inodes) = Self::measure(self.dir(id).join("fs")).await?;
        Ok(Usage { size, inodes })
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Self::Error> {
        let store = self.store.lock().await;
        if store.get(&key).is_none() {
            return Err(ServiceError::NotFound { key });
        }
        Ok(mounts::for_snapshot(&self.root, &store, &key))
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        self.create(SnapshotKind::Active, key, parent, labels).await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        self.create(SnapshotKind::View, key, parent, labels).await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Self::Error> {
        let id = {
            let store = self.store.lock().await;
            let r = store
                .get(&key)
                .ok_or_else(|| ServiceError::NotFound { key: key.clone() })?;
            if r.kind != SnapshotKind::Active {
                return Err(ServiceError::NotActive { key });
            }
            r.id
        };
        // Measure outside the lock: big layers take a while to walk.
        let usage = Self::measure(self.dir(id).join("fs")).await?;
        let mut store = self.store.lock().await;
        if store.get(&name).is_some() {
            return Err(ServiceError::AlreadyExists { key: name });
        }
        let mut r = store
            .remove(&key)
            .ok_or_else(|| ServiceError::NotFound { key: key.clone() })?;
        let before = r.clone();
        r.kind = SnapshotKind::Committed;
        r.labels = labels;
        r.usage = Some(usage);
        r.updated = timestamp(SystemTime::now());
        store.insert(name.clone(), r);
        if let Err(err) = store.save() {
            store.remove(&name);
            store.insert(key, before);
            return Err(err.into());
        }
        drop(store);
        // The work dir is only needed while active.
        let _ = std::fs::remove_dir_all(self.dir(id).join("work"));
        if let Some(images) = &self.unpacked_images {
            images.queue(id, self.dir(id), usage.0.max(0) as u64);
        }
        Ok(())
    }

    async fn remove(&self, key: String) -> Result<(), Self::Error> {
        let mut store = self.store.lock().await;
        if store.get(&key).is_none() {
            return Err(ServiceError::NotFound { key });
        }
        if store.has_children(&key) {
            return Err(ServiceError::HasChildren { key });
        }
        let Some(r) = store.remove(&key) else {
            return Err(ServiceError::NotFound { key });
        };
        if let Err(err) = store.save() {
            store.insert(key, r);
            return Err(err.into());
        }
        // The image's chunks that no other remote layer shares leave the cache with it.
        let other_layers: Vec<PathBuf> = match r.remote {
            Some(_) => store
                .iter()
                .filter(|(_, other)| other.remote.is_some())
                .map(|(_, other)| self.dir(other.id))
                .collect(),
            None => Vec::new(),
        };
        drop(store);
        if r.remote.is_some() {
            let remote = self.remote.clone();
            let dir = self.dir(r.id);
            let id = r.id;
            let _ = tokio::task::spawn_blocking(move || {
                remote.unmount(id);
                let freed = chunks::release(
                    remote.cache(),
                    &dir,
                    other_layers.iter().map(PathBuf::as_path),
                );
                tracing::info!(id, freed, "freed the removed layer's chunks");
            })
            .await;
        }
        if let Some(images) = &self.unpacked_images {
            images.cancel(r.id).await;
        }
        self.remove_dir(r.id);
        Ok(())
    }

    async fn clear(&self) -> Result<(), Self::Error> {
        let known: std::collections::HashSet<String> = self
            .store
            .lock()
            .await
            .iter()
            .map(|(_, r)| r.id.to_string())
            .collect();
        let snapshots = self.root.join("snapshots");
        let entries = std::fs::read_dir(&snapshots).map_err(|source| ServiceError::ReadDir {
            path: snapshots.clone(),
            source,
        })?;
        let orphans: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| !known.contains(&*e.file_name().to_string_lossy()))
            .map(|e| e.path())
            .collect();
        tokio::task::spawn_blocking(move || {
            for path in orphans {
                // Stops an orphaned layer daemon (if any) and detaches its mount.
                daemon::stop(&path);
                if let Err(err) = std::fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), error = %err, "cleanup could not remove an orphaned snapshot");
                }
            }
        })
        .await
        .map_err(|source| ServiceError::Join { source })
    }

    type InfoStream = futures::stream::Iter<std::vec::IntoIter<Result<Info, ServiceError>>>;

    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, Self::Error> {
        let filters = Filters::parse(&filters)?;
        let store = self.store.lock().await;
        let infos: Vec<Result<Info, ServiceError>> = store
            .iter()
            .filter(|(k, r)| filters.matches(k, &r.parent, r.kind, &r.labels))
            .map(|(k, r)| Ok(Self::info(k, r)))
            .collect();
        Ok(futures::stream::iter(infos))
    }
}

/// Root of the snapshot directories, for tools.
pub fn snapshots_dir(root: &Path) -> PathBuf {
    root.join("snapshots")
}

#[cfg(test)]
mod image_tests;
#[cfg(test)]
mod native_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod trust_tests;
#[cfg(test)]
mod unpacked_images_tests;
