//! Synced volumes in the guest: kubelet's atomic-writer volumes (configMap, secret,
//! projected, downwardAPI) copied from the host and swapped the way kubelet swaps them:
//! the payload in a fresh `..<version>` dir, a `..data_tmp` symlink to it renamed over
//! `..data`, the user-visible names as symlinks into `..data`, the old payload removed.
//! A reader sees the old version or the new one, never a mix, and inotify watchers on the
//! volume see the same events as on the host.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use spry_proto::agent::{snapshot_entry, VolumeSnapshot};

use super::{relative_inside as relative, single_name, VolumeError};

const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// Applies `snapshot` to the volume under `root` (the pod's synced-volume tmpfs); returns
/// the volume's directory. Applying the version already in place changes nothing.
pub fn apply(root: &Path, snapshot: &VolumeSnapshot) -> Result<PathBuf, VolumeError> {
    let bad = |what: &str| VolumeError::BadSnapshot {
        id: snapshot.id.clone(),
        what: what.to_string(),
    };
    let id = relative(&snapshot.id).ok_or_else(|| bad("its id is not a relative path"))?;
    let version = &snapshot.version;
    if !version.starts_with("..")
        || version == DATA
        || version == DATA_TMP
        || single_name(version).is_none()
    {
        return Err(bad("its version is not a `..<name>` dir name"));
    }
    // Everything is checked before anything is written.
    if snapshot.entries.iter().any(|e| relative(&e.path).is_none()) {
        return Err(bad("an entry path leaves it"));
    }
    if snapshot
        .names
        .iter()
        .any(|n| single_name(n).is_none_or(|n| n.starts_with("..")))
    {
        return Err(bad("a name is not a plain file name"));
    }
    let dir = root.join(id);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VolumeError::Dir { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let payload = dir.join(version);
    if std::fs::read_link(dir.join(DATA)).is_ok_and(|t| t == Path::new(version)) {
        return Ok(dir);
    }
    // A leftover of an interrupted apply of this version goes first.
    let _ = std::fs::remove_dir_all(&payload);
    std::fs::create_dir(&payload).map_err(io(&payload))?;
    for entry in &snapshot.entries {
        let path = payload.join(&entry.path);
        match &entry.kind {
            Some(snapshot_entry::Kind::Dir(_)) => {
                std::fs::create_dir_all(&path).map_err(io(&path))?
            }
            Some(snapshot_entry::Kind::Content(content)) => {
                std::fs::write(&path, content).map_err(io(&path))?
            }
            Some(snapshot_entry::Kind::Symlink(target)) => {
                symlink(target, &path).map_err(io(&path))?
            }
            _ => return Err(bad("an entry is neither file, dir nor symlink")),
        }
        if !matches!(entry.kind, Some(snapshot_entry::Kind::Symlink(_))) {
            let mode = std::fs::Permissions::from_mode(entry.mode & 0o7777);
            std::fs::set_permissions(&path, mode).map_err(io(&path))?;
        }
    }
    // The swap: one rename, as kubelet does it.
    let tmp = dir.join(DATA_TMP);
    let _ = std::fs::remove_file(&tmp);
    symlink(version, &tmp).map_err(io(&tmp))?;
    std::fs::rename(&tmp, dir.join(DATA)).map_err(io(&dir.join(DATA)))?;
    // User-visible names: new ones appear, gone ones go, existing ones already point
    // through ..data.
    for name in &snapshot.names {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("{DATA}/{name}"), &link).map_err(io(&link))?;
        }
    }
    let entries = std::fs::read_dir(&dir).map_err(io(&dir))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with("..") {
            if name != DATA && name != *version {
                let _ = std::fs::remove_dir_all(&path);
            }
        } else if !snapshot.names.contains(&name) {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use spry_proto::agent::SnapshotEntry;

    fn file(path: &str, content: &str) -> SnapshotEntry {
        SnapshotEntry {
            path: path.into(),
            mode: 0o644,
            kind: Some(snapshot_entry::Kind::Content(content.as_bytes().to_vec())),
            ..Default::default()
        }
    }

    fn snapshot(version: &str, entries: Vec<SnapshotEntry>, names: &[&str]) -> VolumeSnapshot {
        VolumeSnapshot {
            id: "c1/0".into(),
            version: version.into(),
            entries,
            names: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn versions_swap_like_kubelets_atomic_writer() {
        let root = tempfile::tempdir().unwrap();
        let first = snapshot("..2026_1", vec![file("key", "one")], &["key"]);
        let dir = apply(root.path(), &first).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("key")).unwrap(), "one");
        assert_eq!(
            std::fs::read_link(dir.join("..data")).unwrap(),
            Path::new("..2026_1")
        );
        assert_eq!(
            std::fs::read_link(dir.join("key")).unwrap(),
            Path::new("..data/key")
        );

        let dir_entry = SnapshotEntry {
            path: "sub".into(),
            mode: 0o755,
            kind: Some(snapshot_entry::Kind::Dir(true)),
            ..Default::default()
        };
        let second = snapshot(
            "..2026_2",
            vec![dir_entry, file("sub/nested", "n"), file("other", "two")],
            &["sub", "other"],
        );
        apply(root.path(), &second).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("other")).unwrap(), "two");
        assert_eq!(
            std::fs::read_to_string(dir.join("sub/nested")).unwrap(),
            "n"
        );
        assert!(!dir.join("key").exists(), "a removed key stays visible");
        assert!(!dir.join("..2026_1").exists(), "the old payload is left");
        // The same version again is a no-op.
        apply(root.path(), &second).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("other")).unwrap(), "two");
    }

    #[test]
    fn a_swap_is_one_rename_that_inotify_reports_like_kubelets() {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let root = tempfile::tempdir().unwrap();
        let dir = apply(
            root.path(),
            &snapshot("..v1", vec![file("key", "one")], &["key"]),
        )
        .unwrap();
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
        inotify
            .add_watch(&dir, AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CREATE)
            .unwrap();
        apply(
            root.path(),
            &snapshot("..v2", vec![file("key", "two")], &["key"]),
        )
        .unwrap();
        let events = inotify.read_events().unwrap();
        let moved: Vec<_> = events
            .iter()
            .filter(|e| e.mask.contains(AddWatchFlags::IN_MOVED_TO))
            .filter_map(|e| e.name.as_ref()?.to_str().map(str::to_string))
            .collect();
        assert_eq!(moved, ["..data"], "{events:?}");
        assert_eq!(std::fs::read_to_string(dir.join("key")).unwrap(), "two");
    }

    #[test]
    fn a_hostile_snapshot_cannot_write_outside_its_volume() {
        let root = tempfile::tempdir().unwrap();
        let cases = [
            snapshot("..v", vec![file("../../escape", "x")], &[]),
            snapshot("..v", vec![file("/abs", "x")], &[]),
            snapshot("../v", vec![], &[]),
            snapshot("..data", vec![], &[]),
            snapshot("plain", vec![], &[]),
            snapshot("..v", vec![], &["../x"]),
            snapshot("..v", vec![], &["..data"]),
        ];
        for case in cases {
            let err = apply(root.path(), &case).unwrap_err();
            assert!(matches!(err, VolumeError::BadSnapshot { .. }), "{err}");
        }
        let mut bad_id = snapshot("..v", vec![], &[]);
        bad_id.id = "../../etc".into();
        assert!(apply(root.path(), &bad_id).is_err());
        assert!(!root.path().join("escape").exists());
    }
}
