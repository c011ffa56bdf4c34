//! Where a container's rootfs comes from on the host, read from containerd's mounts.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Beside a layer's tree: Spry's snapshotter's erofs image of it (a lazily pulled layer's,
/// served; an unpacked layer's, built after its commit).
const SERVED_IMAGE_DIR: &str = "erofs";
const SERVED_IMAGE_FILE: &str = "layer.erofs";
/// Beside the image while the snapshotter is still building it (an unpacked layer's).
const SERVED_IMAGE_PENDING: &str = "layer.erofs.pending";
/// The longest a container waits for the snapshotter's images of its layers before it
/// packs them itself: building them here costs about as much as waiting, and the
/// snapshotter usually started during the pull.
const SERVED_IMAGE_WAIT: Duration = Duration::from_secs(30);
/// How often the wait looks again.
const SERVED_IMAGE_POLL: Duration = Duration::from_millis(20);

/// Where a container's root filesystem comes from on the host.
#[derive(Debug, Clone)]
pub enum RootfsSource {
    /// A plain directory tree (e.g. `spry vm run --rootfs DIR`, or a mounted bundle rootfs).
    Directory(PathBuf),
    /// An image's read-only layers (overlay lowerdirs, top first) whose merged view with
    /// an empty writable layer is mounted at `merged`: its erofs image is built once per
    /// layer chain and shared (see `cache.rs`).
    Layers {
        merged: PathBuf,
        lowers: Vec<PathBuf>,
    },
    /// Image layers (merged at `merged`, as for `Layers`) that Spry's lazy-pulling
    /// snapshotter also serves as erofs images, topmost first: each is attached as it is,
    /// and the guest stacks them, so the VM reads (and fetches) only what it uses.
    Served {
        merged: PathBuf,
        images: Vec<PathBuf>,
    },
}

impl RootfsSource {
    /// The source for a container whose rootfs containerd gave as `mounts` (type and
    /// options each) and the shim mounted at `merged`: when it is one overlay whose
    /// writable layer is still empty (the usual new container), the snapshotter's images
    /// of its layers if it serves one for each, else the shared layer image; anything
    /// else is the merged directory itself.
    pub fn for_mounts(mounts: &[(&str, &[String])], merged: &Path) -> Self {
        let merged = merged.to_path_buf();
        match image_layers(mounts) {
            Some(lowers) => match served_images(&lowers) {
                Some(images) => Self::Served { merged, images },
                None => Self::Layers { merged, lowers },
            },
            None => Self::Directory(merged),
        }
    }

    /// The host directory the container's merged rootfs is at.
    pub fn merged(&self) -> &Path {
        match self {
            Self::Directory(dir) => dir,
            Self::Layers { merged, .. } | Self::Served { merged, .. } => merged,
        }
    }
}

/// Waits while Spry's snapshotter is still building the images of some of `mounts`'
/// layers (an image just pulled: its last layers were committed moments ago), so that the
/// container attaches them rather than packing the same layers itself. No wait when a
/// layer has neither an image nor a build coming (the layers are packed anyway), and
/// none past [`SERVED_IMAGE_WAIT`].
pub async fn await_served_images(mounts: &[(&str, &[String])]) {
    let Some(lowers) = image_layers(mounts) else {
        return;
    };
    let started = tokio::time::Instant::now();
    loop {
        let mut pending = 0;
        for lower in &lowers {
            let dir = lower.with_file_name(SERVED_IMAGE_DIR);
            // The snapshotter names the image before it drops the marker.
            if dir.join(SERVED_IMAGE_FILE).is_file() {
                continue;
            }
            if !dir.join(SERVED_IMAGE_PENDING).exists() {
                return;
            }
            pending += 1;
        }
        if pending == 0 {
            return;
        }
        if started.elapsed() >= SERVED_IMAGE_WAIT {
            tracing::warn!(
                pending,
                waited_ms = started.elapsed().as_millis() as u64,
                "the snapshotter is still building layer images; packing the layers instead"
            );
            return;
        }
        tokio::time::sleep(SERVED_IMAGE_POLL).await;
    }
}

/// The read-only layers (overlay lowerdirs, top first) of a container's rootfs `mounts`
/// when they are one overlay whose writable layer is still empty: the layer chain whose
/// image `LayerCache` shares. `None` for anything else.
fn image_layers(mounts: &[(&str, &[String])]) -> Option<Vec<PathBuf>> {
    let [("overlay", options)] = mounts else {
        return None;
    };
    let option = |name: &str| {
        options
            .iter()
            .find_map(|o| o.strip_prefix(name)?.strip_prefix('='))
    };
    let (lowerdir, upperdir) = (option("lowerdir")?, option("upperdir")?);
    // Escaped separators would need overlayfs's own parsing; not worth it.
    if lowerdir.contains('\\') {
        return None;
    }
    let lowers: Vec<PathBuf> = lowerdir.split(':').map(PathBuf::from).collect();
    let upper_empty = std::fs::read_dir(upperdir)
        .map(|mut entries| entries.next().is_none())
        .unwrap_or(false);
    (upper_empty && lowers.iter().all(|l| l.is_absolute())).then_some(lowers)
}

/// The erofs image Spry's snapshotter serves for each layer (`<snapshot>/fs` is the
/// layer's tree, `<snapshot>/erofs/layer.erofs` its image: the snapshotter's
/// `fs::IMAGE_DIR` and `IMAGE_FILE`), when every layer has one.
fn served_images(lowers: &[PathBuf]) -> Option<Vec<PathBuf>> {
    lowers
        .iter()
        .map(|lower| {
            let image = lower
                .with_file_name(SERVED_IMAGE_DIR)
                .join(SERVED_IMAGE_FILE);
            image.is_file().then_some(image)
        })
        .collect()
}

/// The readahead, in KiB, the guest should read a served layer image's disk with: while
/// the snapshotter still serves the image over FUSE (fetching what is read), the FUSE
/// mount's readahead (`lazy.readahead_kib`, which the snapshotter gives the image mount):
/// what a recorded prefetch was recorded with, so the guest does not read past it into
/// chunks nobody fetched. `None` for an image that is a plain file (a fully fetched
/// layer's), which the guest reads ahead as far as its kernel likes.
pub fn lazy_read_ahead_kib(image: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let fs = nix::sys::statfs::statfs(image).ok()?;
    if fs.filesystem_type() != nix::sys::statfs::FUSE_SUPER_MAGIC {
        return None;
    }
    let dev = std::fs::metadata(image).ok()?.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    // A FUSE mount's backing device info is named after its device number.
    let bdi = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    std::fs::read_to_string(bdi).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_overlay_with_an_empty_upper_uses_the_shared_layer_image() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir(&upper).unwrap();
        let merged = dir.path().join("rootfs");
        let options = opts(&[
            "index=off",
            "workdir=/s/3/work",
            &format!("upperdir={}", upper.display()),
            "lowerdir=/s/2/fs:/s/1/fs",
        ]);
        match RootfsSource::for_mounts(&[("overlay", &options)], &merged) {
            RootfsSource::Layers { merged: m, lowers } => {
                assert_eq!(m, merged);
                assert_eq!(
                    lowers,
                    vec![PathBuf::from("/s/2/fs"), PathBuf::from("/s/1/fs")]
                );
            }
            other => panic!("expected layers, got {other:?}"),
        }
        // Something in the writable layer: the container's own view must be packed.
        std::fs::write(upper.join("f"), "x").unwrap();
        assert!(matches!(
            RootfsSource::for_mounts(&[("overlay", &options)], &merged),
            RootfsSource::Directory(_)
        ));
    }

    #[test]
    fn layers_the_snapshotter_serves_as_images_are_attached_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("3/fs");
        let lowers = [dir.path().join("2/fs"), dir.path().join("1/fs")];
        for d in lowers.iter().chain([&upper]) {
            std::fs::create_dir_all(d).unwrap();
        }
        let image = |n: &str| dir.path().join(n).join("erofs/layer.erofs");
        let options = opts(&[
            &format!("upperdir={}", upper.display()),
            &format!("lowerdir={}:{}", lowers[0].display(), lowers[1].display()),
        ]);
        let merged = dir.path().join("rootfs");
        // One layer without an image: the layer chain is packed as before.
        std::fs::create_dir_all(image("2").parent().unwrap()).unwrap();
        std::fs::write(image("2"), "").unwrap();
        assert!(matches!(
            RootfsSource::for_mounts(&[("overlay", &options)], &merged),
            RootfsSource::Layers { .. }
        ));
        std::fs::create_dir_all(image("1").parent().unwrap()).unwrap();
        std::fs::write(image("1"), "").unwrap();
        match RootfsSource::for_mounts(&[("overlay", &options)], &merged) {
            RootfsSource::Served { merged: m, images } => {
                assert_eq!(m, merged);
                assert_eq!(images, vec![image("2"), image("1")]);
            }
            other => panic!("expected served images, got {other:?}"),
        }
        // Plain files (a fully fetched layer's image) keep the guest's own readahead.
        assert_eq!(lazy_read_ahead_kib(&image("1")), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_waits_for_the_images_the_snapshotter_is_still_building() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("3/fs");
        let lowers = [dir.path().join("2/fs"), dir.path().join("1/fs")];
        for d in lowers.iter().chain([&upper]) {
            std::fs::create_dir_all(d).unwrap();
        }
        let erofs = |n: &str| dir.path().join(n).join("erofs");
        let options = opts(&[
            &format!("upperdir={}", upper.display()),
            &format!("lowerdir={}:{}", lowers[0].display(), lowers[1].display()),
        ]);
        let mounts = [("overlay", options.as_slice())];
        for n in ["1", "2"] {
            std::fs::create_dir_all(erofs(n)).unwrap();
        }
        // Layer 1 built, layer 2 pending: waits until the snapshotter names it.
        std::fs::write(erofs("1").join(SERVED_IMAGE_FILE), "").unwrap();
        std::fs::write(erofs("2").join(SERVED_IMAGE_PENDING), "").unwrap();
        let builder = {
            let dir = erofs("2");
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                std::fs::write(dir.join(SERVED_IMAGE_FILE), "").unwrap();
                std::fs::remove_file(dir.join(SERVED_IMAGE_PENDING)).unwrap();
            })
        };
        let started = tokio::time::Instant::now();
        await_served_images(&mounts).await;
        assert!(started.elapsed() >= Duration::from_secs(5));
        builder.await.unwrap();
        assert!(matches!(
            RootfsSource::for_mounts(&mounts, dir.path()),
            RootfsSource::Served { .. }
        ));
        // A build that never ends: given up after the bound.
        std::fs::remove_file(erofs("2").join(SERVED_IMAGE_FILE)).unwrap();
        std::fs::write(erofs("2").join(SERVED_IMAGE_PENDING), "").unwrap();
        let started = tokio::time::Instant::now();
        await_served_images(&mounts).await;
        assert_eq!(started.elapsed().as_secs(), SERVED_IMAGE_WAIT.as_secs());
        // A layer with no image coming: no wait at all.
        std::fs::remove_file(erofs("1").join(SERVED_IMAGE_FILE)).unwrap();
        let started = tokio::time::Instant::now();
        await_served_images(&mounts).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[test]
    fn anything_else_is_packed_from_the_merged_directory() {
        let merged = Path::new("/b/rootfs");
        let bind = opts(&["rbind", "ro"]);
        let relative = opts(&["lowerdir=fs:/s/1/fs", "upperdir=/nonexistent"]);
        for mounts in [
            vec![],
            vec![("bind", bind.as_slice())],
            vec![("overlay", relative.as_slice())],
            vec![("overlay", bind.as_slice()), ("bind", bind.as_slice())],
        ] {
            assert!(matches!(
                RootfsSource::for_mounts(&mounts, merged),
                RootfsSource::Directory(_)
            ));
        }
    }
}
