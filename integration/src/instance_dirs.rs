//! Where a harness containerd keeps its files, and the record a containerd left running
//! (the quickstart's) keeps so that a later command can find and stop it.
//!
//! Test instances live in temp dirs under [`crate::paths::harness_dir`] and
//! [`crate::paths::harness_run_dir`], swept by `stale.rs` once their test process is gone.
//! A kept instance has fixed dirs outside those, so no sweep takes it down.

use crate::stale::InstanceId;
use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// The on-disk dir (root, config, logs) and the short tmpfs dir (socket, state).
pub enum InstanceDirs {
    /// Removed on drop if the instance's cleanup did not.
    Temp { dir: TempDir, run: TempDir },
    /// Chosen by the caller; removed only by the instance's cleanup.
    Fixed { dir: PathBuf, run: PathBuf },
}

impl InstanceDirs {
    /// Creates fixed dirs; the run dir must not hold a live instance (see [`KeptRecord`]).
    pub fn fixed(dir: &Path, run: &Path) -> Result<Self> {
        for d in [dir, run] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(Self::Fixed {
            dir: dir.to_path_buf(),
            run: run.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        match self {
            Self::Temp { dir, .. } => dir.path(),
            Self::Fixed { dir, .. } => dir,
        }
    }

    pub fn run(&self) -> &Path {
        match self {
            Self::Temp { run, .. } => run.path(),
            Self::Fixed { run, .. } => run,
        }
    }
}

/// What identifies a containerd left running: written to `<run dir>/instance.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeptRecord {
    pub pid: u32,
    /// `SPRY_IT_INSTANCE=...`, inherited by its shims.
    pub marker: String,
    pub bridge: String,
}

impl KeptRecord {
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("instance.json")
    }

    pub fn write(&self, run_dir: &Path) -> Result<()> {
        let path = Self::path(run_dir);
        fs::write(&path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The record in `run_dir`, if there is one.
    pub fn read(run_dir: &Path) -> Result<Option<Self>> {
        let path = Self::path(run_dir);
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .with_context(|| format!("parsing {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// A temp dir `<parent>/<id>-<random>`: swept by `stale.rs` once `id`'s process is gone.
pub fn make_temp_dir(parent: &Path, id: &InstanceId) -> Result<tempfile::TempDir> {
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    tempfile::Builder::new()
        .prefix(&format!("{}-", id.id()))
        .tempdir_in(parent)
        .with_context(|| format!("creating a temp dir in {}", parent.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_its_absence_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(KeptRecord::read(dir.path()).unwrap(), None);
        let record = KeptRecord {
            pid: 42,
            marker: "SPRY_IT_INSTANCE=quickstart-1-0000002a".into(),
            bridge: "spryit0000002a".into(),
        };
        record.write(dir.path()).unwrap();
        assert_eq!(KeptRecord::read(dir.path()).unwrap(), Some(record));
        fs::write(KeptRecord::path(dir.path()), "{\"pid\": 1}").unwrap();
        assert!(KeptRecord::read(dir.path()).is_err());
    }

    #[test]
    fn fixed_dirs_are_created_and_named() {
        let base = tempfile::tempdir().unwrap();
        let dirs = InstanceDirs::fixed(&base.path().join("d"), &base.path().join("r")).unwrap();
        assert!(dirs.dir().is_dir() && dirs.run().is_dir());
        assert_eq!(dirs.run(), base.path().join("r"));
    }
}
