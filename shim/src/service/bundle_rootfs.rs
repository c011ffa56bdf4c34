//! The host side of a container's rootfs: containerd's mounts at `<bundle>/rootfs`.
//!
//! A writable overlay is mounted `volatile`. Unmounting an overlay otherwise syncs its
//! whole upper filesystem (overlayfs' `sync_fs`, i.e. all of `/var/lib`'s dirty pages:
//! 0.9 s after an image pull here), and containerd's StopContainer waits for that unmount,
//! so every stop after a pull paid for the pull's writeback. The rootfs of a container is
//! ephemeral: after a host crash kubelet makes new containers, never reuses a writable
//! layer, which is why a synced upper buys nothing (containerd offers the same option as
//! `mount_options = ["volatile"]` on its overlay snapshotter).
//!
//! The markers such a mount leaves are noted before it is mounted, in the bundle of the
//! task that owns the pod's VM (the sandbox's): when the shim dies, containerd runs
//! `shim delete` for that task only (an app container's delete just fails), and that
//! cleanup removes them as a live shim's unmount does.

use std::path::{Component, Path, PathBuf};

use containerd_shim::protos::api::Mount;
use tracing::{debug, warn};

use super::error::ShimError;

const VOLATILE: &str = "volatile";
/// Where, under an overlay's workdir, the kernel keeps its volatile marker.
const MARKER_IN_WORKDIR: &str = "work/incompat/volatile";
/// The bundle dir with a file per container naming its volatile overlays' markers, one
/// per line.
const MARKER_NOTES: &str = "spry-volatile-markers";

/// containerd's rootfs mounts, mounted at a task's `<bundle>/rootfs`.
#[derive(Debug)]
pub struct MountedRootfs {
    target: PathBuf,
    /// Where its markers are noted.
    note: Option<PathBuf>,
    /// The markers of the overlays mounted `volatile`: the kernel refuses to mount an
    /// upper directory again while its marker is there (a crash may have lost writes).
    volatile_markers: Vec<PathBuf>,
}

/// Mounts containerd's rootfs mounts (usually one overlay) at `target`; `None` when there
/// are none (the rootfs is already in the bundle). Volatile markers are noted in
/// `owner_bundle`, the bundle of the task that owns the VM.
pub async fn mount(
    id: &str,
    mounts: &[Mount],
    target: &Path,
    owner_bundle: &Path,
) -> Result<Option<MountedRootfs>, ShimError> {
    let mut mounted = MountedRootfs {
        target: target.to_path_buf(),
        note: note_path(owner_bundle, id),
        volatile_markers: Vec::new(),
    };
    for m in mounts {
        if let Some((fast, marker)) = volatile(m) {
            // Noted first: a shim killed right after the mount must not leave an
            // unnoted marker.
            mounted.volatile_markers.push(marker);
            note_markers(mounted.note.as_deref(), &mounted.volatile_markers);
            match containerd_shim::asynchronous::util::mount_rootfs(&fast, target).await {
                Ok(()) => continue,
                // A kernel older than 5.10 does not know the option.
                Err(error) => {
                    debug!(%error, "cannot mount the overlay volatile; mounting it as given")
                }
            }
        }
        containerd_shim::asynchronous::util::mount_rootfs(m, target)
            .await
            .inspect_err(|_| {
                if let Some(note) = &mounted.note {
                    let _ = std::fs::remove_file(note);
                }
            })
            .map_err(|source| ShimError::MountRootfs {
                id: id.to_string(),
                target: target.to_path_buf(),
                source,
            })?;
    }
    Ok((!mounts.is_empty()).then_some(mounted))
}

/// `m` with the `volatile` option, and the marker the kernel will create, if `m` is a
/// writable overlay without it.
fn volatile(m: &Mount) -> Option<(Mount, PathBuf)> {
    if m.type_ != "overlay"
        || !m.options.iter().any(|o| o.starts_with("upperdir="))
        || m.options.iter().any(|o| o == VOLATILE)
    {
        return None;
    }
    let workdir = m.options.iter().find_map(|o| o.strip_prefix("workdir="))?;
    let mut fast = m.clone();
    fast.options.push(VOLATILE.to_string());
    Some((fast, Path::new(workdir).join(MARKER_IN_WORKDIR)))
}

/// The file noting container `id`'s markers (containerd's ids are plain names).
fn note_path(owner_bundle: &Path, id: &str) -> Option<PathBuf> {
    let plain = !id.is_empty() && id != "." && id != ".." && !id.contains('/');
    plain.then(|| owner_bundle.join(MARKER_NOTES).join(id))
}

fn note_markers(note: Option<&Path>, markers: &[PathBuf]) {
    let Some(note) = note else {
        warn!("a container id unfit for a file name: its overlay's volatile marker is not noted; if this shim dies, its snapshot cannot be mounted again");
        return;
    };
    let mut text = Vec::new();
    for marker in markers {
        text.extend_from_slice(marker.as_os_str().as_encoded_bytes());
        text.push(b'\n');
    }
    let noted = note
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(note, text));
    if let Err(e) = noted {
        warn!(path = %note.display(), error = %e, "cannot note an overlay's volatile marker; if this shim dies, its snapshot cannot be mounted again");
    }
}

/// The markers noted in `owner_bundle`, for all its containers. Only paths shaped like
/// an overlay's marker are taken: the cleanup removes them as root.
fn noted_markers(owner_bundle: &Path) -> Vec<PathBuf> {
    let Ok(notes) = std::fs::read_dir(owner_bundle.join(MARKER_NOTES)) else {
        return Vec::new();
    };
    let mut markers = Vec::new();
    for note in notes.flatten() {
        let Ok(text) = std::fs::read_to_string(note.path()) else {
            continue;
        };
        markers.extend(text.lines().map(PathBuf::from).filter(|path| {
            path.is_absolute()
                && path.ends_with(MARKER_IN_WORKDIR)
                && path
                    .components()
                    .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        }));
    }
    markers
}

/// For the cleanup after a dead shim, once its rootfs mounts are gone: removes the
/// volatile markers noted in `owner_bundle` for any of the pod's containers.
pub fn remove_noted_markers(owner_bundle: &Path) {
    remove_markers(&noted_markers(owner_bundle));
    let _ = std::fs::remove_dir_all(owner_bundle.join(MARKER_NOTES));
}

fn remove_markers(markers: &[PathBuf]) {
    for marker in markers {
        match std::fs::remove_dir_all(marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(marker = %marker.display(), error = %e, "cannot remove an overlay's volatile marker")
            }
        }
    }
}

impl MountedRootfs {
    /// Unmounts it. Its volatile markers go too: the upper directory stays usable by
    /// whoever mounts the snapshot next (a commit, a diff), as with a plain overlay.
    pub fn unmount(&self) {
        if let Err(e) = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH) {
            warn!(target = %self.target.display(), error = %e, "cannot unmount container rootfs");
            return;
        }
        remove_markers(&self.volatile_markers);
        if let Some(note) = &self.note {
            let _ = std::fs::remove_file(note);
        }
    }
}

/// Each mount's type and options, as `RootfsSource::for_mounts` reads them.
pub fn kinds(mounts: &[Mount]) -> Vec<(&str, &[String])> {
    mounts
        .iter()
        .map(|m| (m.type_.as_str(), m.options.as_slice()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(options: &[&str]) -> Mount {
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: options.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_writable_overlays_are_made_volatile() {
        let writable = overlay(&["lowerdir=/l", "upperdir=/s/fs", "workdir=/s/work"]);
        let (fast, marker) = volatile(&writable).unwrap();
        assert_eq!(fast.options.last().map(String::as_str), Some("volatile"));
        assert_eq!(marker, Path::new("/s/work/work/incompat/volatile"));
        // Read-only views, mounts already volatile and binds are left as given.
        assert!(volatile(&overlay(&["lowerdir=/a:/b"])).is_none());
        let already = overlay(&["upperdir=/u", "workdir=/w", "volatile"]);
        assert!(volatile(&already).is_none());
        let bind = Mount {
            type_: "bind".into(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        };
        assert!(volatile(&bind).is_none());
    }

    #[test]
    fn a_dead_shims_noted_markers_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        std::fs::create_dir(&bundle).unwrap();
        let marker = dir.path().join("snap/work").join(MARKER_IN_WORKDIR);
        std::fs::create_dir_all(&marker).unwrap();
        let gone_already = dir.path().join("other/work").join(MARKER_IN_WORKDIR);
        note_markers(
            note_path(&bundle, "a").as_deref(),
            std::slice::from_ref(&marker),
        );
        note_markers(note_path(&bundle, "b").as_deref(), &[gone_already]);
        assert_eq!(note_path(&bundle, "../x"), None);
        assert_eq!(note_path(&bundle, ".."), None);
        // Lines a tampered note could hold: never removed.
        let victim = dir.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        let dotted = dir
            .path()
            .join("victim/../snap/work")
            .join(MARKER_IN_WORKDIR);
        std::fs::write(
            bundle.join(MARKER_NOTES).join("c"),
            format!(
                "{}\nrelative/{MARKER_IN_WORKDIR}\n{}\n",
                victim.display(),
                dotted.display()
            ),
        )
        .unwrap();
        assert_eq!(noted_markers(&bundle).len(), 2);

        remove_noted_markers(&bundle);
        assert!(!marker.exists());
        assert!(marker.parent().unwrap().is_dir(), "only the marker goes");
        assert!(victim.is_dir());
        assert!(!bundle.join(MARKER_NOTES).exists());
        // Nothing noted (no volatile overlay, or no bundle): nothing to do.
        remove_noted_markers(&dir.path().join("no-bundle"));
    }
}
