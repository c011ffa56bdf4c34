//! The mounts containerd performs for a snapshot, as the overlay snapshotter
//! builds them.

use std::path::Path;

use containerd_snapshots::api::types::Mount;

use super::store::{SnapshotKind, Store};

/// Mounts for `key` (which must exist in `store`).
pub fn for_snapshot(root: &Path, store: &Store, key: &str) -> Vec<Mount> {
    let Some(record) = store.get(key) else {
        return Vec::new();
    };
    let dir = |id: u64| root.join("snapshots").join(id.to_string());
    let fs = |id: u64| dir(id).join("fs").to_string_lossy().into_owned();
    let chain = store.chain(key);
    // A committed snapshot is shown read-only with itself as the top layer.
    let (own, parents): (Option<u64>, Vec<u64>) = match record.kind {
        SnapshotKind::Committed => (None, chain),
        _ => (Some(record.id), chain[1..].to_vec()),
    };
    match (record.kind, own, parents.as_slice()) {
        (SnapshotKind::Active, Some(id), []) => vec![bind(fs(id), "rw")],
        (SnapshotKind::Active, Some(id), lowers) => {
            let lowerdir = lowers.iter().map(|l| fs(*l)).collect::<Vec<_>>().join(":");
            vec![Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![
                    "index=off".into(),
                    format!("workdir={}", dir(id).join("work").display()),
                    format!("upperdir={}", fs(id)),
                    format!("lowerdir={lowerdir}"),
                ],
            }]
        }
        (_, Some(id), []) => vec![bind(fs(id), "ro")],
        (_, _, [single]) => vec![bind(fs(*single), "ro")],
        (_, _, lowers) => {
            let lowerdir = lowers.iter().map(|l| fs(*l)).collect::<Vec<_>>().join(":");
            vec![Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec!["index=off".into(), format!("lowerdir={lowerdir}")],
            }]
        }
    }
}

fn bind(source: String, mode: &str) -> Mount {
    Mount {
        r#type: "bind".into(),
        source,
        target: String::new(),
        options: vec![mode.into(), "rbind".into()],
    }
}
