//! Snapshot metadata, persisted as one JSON file replaced atomically
//! (write to a temp file, fsync, rename) on every change.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Errors loading or saving metadata.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to read metadata {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metadata {path} is corrupt")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("failed to write metadata {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Snapshot kinds, as containerd defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    View,
    Active,
    Committed,
}

impl SnapshotKind {
    /// The name containerd's filters use.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::View => "view",
            SnapshotKind::Active => "active",
            SnapshotKind::Committed => "committed",
        }
    }
}

/// Where a remote (lazily fetched) layer comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteSource {
    pub image_ref: String,
    pub layer_digest: String,
    pub toc_digest: String,
    /// The chain ID containerd commits the layer under, and its parent's ("" for a base
    /// layer): what the layer's content is checked against once fetched.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chain_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent_chain: String,
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Directory id under `snapshots/`.
    pub id: u64,
    pub kind: SnapshotKind,
    /// Key of the parent, empty for none.
    pub parent: String,
    pub labels: HashMap<String, String>,
    /// Seconds and nanoseconds since the epoch.
    pub created: (u64, u32),
    pub updated: (u64, u32),
    /// Bytes and inodes used, computed at commit.
    #[serde(default)]
    pub usage: Option<(i64, i64)>,
    #[serde(default)]
    pub remote: Option<RemoteSource>,
}

/// Converts a [`SystemTime`] for storage.
pub fn timestamp(t: SystemTime) -> (u64, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

/// Converts a stored timestamp back.
pub fn system_time(t: (u64, u32)) -> SystemTime {
    UNIX_EPOCH + Duration::new(t.0, t.1)
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    next_id: u64,
    snapshots: BTreeMap<String, Record>,
}

/// All snapshots by key.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    state: State,
}

impl Store {
    /// Loads `path`, or starts empty if it does not exist.
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        let state = match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StoreError::Parse {
                path: path.to_path_buf(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                next_id: 1,
                ..State::default()
            },
            Err(source) => {
                return Err(StoreError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Ok(Store {
            path: path.to_path_buf(),
            state,
        })
    }

    /// Writes the current state durably.
    pub fn save(&self) -> Result<(), StoreError> {
        let err = |source| StoreError::Write {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let bytes =
            serde_json::to_vec_pretty(&self.state).map_err(|e| err(std::io::Error::other(e)))?;
        let mut f = fs::File::create(&tmp).map_err(err)?;
        f.write_all(&bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        fs::rename(&tmp, &self.path).map_err(err)?;
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(err)?;
        }
        Ok(())
    }

    /// A fresh directory id.
    pub fn allocate_id(&mut self) -> u64 {
        let id = self.state.next_id.max(1);
        self.state.next_id = id + 1;
        id
    }

    /// Makes every later [`Self::allocate_id`] return more than `id`.
    pub fn reserve_ids_through(&mut self, id: u64) {
        self.state.next_id = self.state.next_id.max(id.saturating_add(1));
    }

    pub fn get(&self, key: &str) -> Option<&Record> {
        self.state.snapshots.get(key)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Record> {
        self.state.snapshots.get_mut(key)
    }

    pub fn insert(&mut self, key: String, record: Record) {
        self.state.snapshots.insert(key, record);
    }

    pub fn remove(&mut self, key: &str) -> Option<Record> {
        self.state.snapshots.remove(key)
    }

    /// All snapshots, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.state.snapshots.iter()
    }

    /// Whether any snapshot has `key` as its parent.
    pub fn has_children(&self, key: &str) -> bool {
        self.state.snapshots.values().any(|r| r.parent == key)
    }

    /// Ids of `key` and its ancestors, nearest first.
    pub fn chain(&self, key: &str) -> Vec<u64> {
        let mut out = Vec::new();
        let mut cur = self.state.snapshots.get(key);
        while let Some(r) = cur {
            out.push(r.id);
            if out.len() > self.state.snapshots.len() {
                break; // a cycle in corrupt metadata; never loop forever
            }
            cur = self.state.snapshots.get(&r.parent);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, parent: &str) -> Record {
        Record {
            id,
            kind: SnapshotKind::Committed,
            parent: parent.to_string(),
            labels: HashMap::new(),
            created: (1, 2),
            updated: (3, 4),
            usage: None,
            remote: None,
        }
    }

    #[test]
    fn persists_across_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.json");
        let mut store = Store::load(&path).unwrap();
        let a = store.allocate_id();
        store.insert("a".into(), record(a, ""));
        let b = store.allocate_id();
        store.insert("b".into(), record(b, "a"));
        store.save().unwrap();
        let store = Store::load(&path).unwrap();
        assert_eq!(store.chain("b"), vec![b, a]);
        assert!(store.has_children("a"));
        assert!(!store.has_children("b"));
        let mut store = store;
        assert_eq!(store.allocate_id(), b + 1);
    }

    #[test]
    fn corrupt_metadata_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.json");
        fs::write(&path, b"{not json").unwrap();
        assert!(matches!(Store::load(&path), Err(StoreError::Parse { .. })));
    }
}
