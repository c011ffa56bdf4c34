//! `ErofsBlockShare` against a VM double that records its hot-plugs: what a container's
//! attach plugs, what its detach unplugs, and what a failed attach leaves (nothing).

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use super::*;
use crate::vm::test_vm::TestVm as DiskVm;

/// A layer dir, a container's merged rootfs over it, and a share with a layer cache.
struct Setup {
    _root: tempfile::TempDir,
    share: ErofsBlockShare,
    lower: PathBuf,
    root: PathBuf,
}

fn setup() -> Setup {
    let root = tempfile::tempdir().unwrap();
    let lower = root.path().join("layer");
    std::fs::create_dir_all(lower.join("bin")).unwrap();
    std::fs::write(lower.join("bin/app"), "app").unwrap();
    let share = ErofsBlockShare::new(root.path().join("work"))
        .with_layer_cache(LayerCache::new(root.path().join("cache"), 0));
    Setup {
        share,
        lower,
        root: root.path().to_path_buf(),
        _root: root,
    }
}

impl Setup {
    /// A new container's rootfs as the shim sees it: the merged view of the layer.
    fn container(&self, name: &str) -> RootfsSource {
        let merged = self.root.join(name);
        std::fs::create_dir_all(&merged).unwrap();
        std::fs::create_dir_all(merged.join("bin")).unwrap();
        std::fs::write(merged.join("bin/app"), "app").unwrap();
        RootfsSource::Layers {
            merged,
            lowers: vec![self.lower.clone()],
        }
    }
}

#[tokio::test]
async fn containers_of_one_image_share_the_layer_disk_until_the_last_goes() {
    let s = setup();
    let vm = DiskVm::default();
    let first = s
        .share
        .attach(&vm, "first", &s.container("a"))
        .await
        .unwrap();
    let second = s
        .share
        .attach(&vm, "second", &s.container("b"))
        .await
        .unwrap();
    let plugged = vm.plugged.lock().unwrap().clone();
    // One layer disk and two writable disks.
    assert_eq!(plugged.len(), 3, "{plugged:?}");
    assert_eq!(first.rootfs.layers, second.rootfs.layers);
    // The layer image holds the image's files, not a writable layer made beside them.
    let layer_image = &plugged[0].1;
    // (Its bytes on disk: the image is sparse between metadata and data, and at its end.)
    let size = std::fs::metadata(layer_image).unwrap().blocks() * 512;
    assert!(size < 1 << 20, "layer image of {size} bytes");

    s.share.detach(&vm, first).await.unwrap();
    assert_eq!(
        *vm.unplugged.lock().unwrap(),
        [plugged[1].0],
        "only the first container's writable disk goes"
    );
    s.share.detach(&vm, second).await.unwrap();
    let unplugged = vm.unplugged.lock().unwrap().clone();
    assert_eq!(unplugged.len(), 3);
    assert!(unplugged.contains(&plugged[0].0), "the layer disk stayed");
    assert!(
        !layer_image.exists(),
        "the layer image outlived its users (the cache keeps none)"
    );
}

#[tokio::test]
async fn a_failed_attach_gives_everything_back() {
    let s = setup();
    let vm = DiskVm::default();
    let running = s
        .share
        .attach(&vm, "running", &s.container("a"))
        .await
        .unwrap();
    vm.refuse_writable.store(true, Ordering::SeqCst);
    let source = s.container("b");
    let err = s.share.attach(&vm, "failing", &source).await.unwrap_err();
    assert!(matches!(err, RootfsError::Hotplug { .. }), "{err}");
    let RootfsSource::Layers { merged, .. } = &source else {
        unreachable!()
    };
    assert!(!merged.join(writable::IMAGE_NAME).exists());
    // The shared layer disk keeps its one remaining user: detaching it unplugs it.
    assert!(vm.unplugged.lock().unwrap().is_empty());
    s.share.detach(&vm, running).await.unwrap();
    assert_eq!(vm.unplugged.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn served_layer_images_are_plugged_each_shared_and_never_deleted() {
    let s = setup();
    let vm = DiskVm::default();
    let images: Vec<PathBuf> = ["top", "base"]
        .iter()
        .map(|n| {
            let image = s.root.join(n).join("erofs/layer.erofs");
            std::fs::create_dir_all(image.parent().unwrap()).unwrap();
            std::fs::write(&image, "erofs").unwrap();
            image
        })
        .collect();
    let served = |name: &str| {
        let merged = s.root.join(name);
        std::fs::create_dir_all(&merged).unwrap();
        RootfsSource::Served {
            merged,
            images: images.clone(),
        }
    };
    let first = s.share.attach(&vm, "first", &served("a")).await.unwrap();
    // Both layers, topmost first, then the writable disk; plain files (not the
    // snapshotter's FUSE mount) keep the guest's readahead.
    assert_eq!(first.rootfs.layers.len(), 2);
    assert!(first.rootfs.layers.iter().all(|l| l.read_ahead_kib == 0));
    let plugged: Vec<PathBuf> = vm
        .plugged
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.1.clone())
        .collect();
    assert_eq!(&plugged[..2], &images[..], "{plugged:?}");
    let second = s.share.attach(&vm, "second", &served("b")).await.unwrap();
    assert_eq!(
        vm.plugged.lock().unwrap().len(),
        4,
        "the layer disks are shared"
    );
    assert_eq!(first.rootfs.layers, second.rootfs.layers);
    s.share.detach(&vm, first).await.unwrap();
    assert_eq!(vm.unplugged.lock().unwrap().len(), 1);
    s.share.detach(&vm, second).await.unwrap();
    assert_eq!(vm.unplugged.lock().unwrap().len(), 4);
    assert!(
        images.iter().all(|i| i.exists()),
        "the snapshotter's images were deleted"
    );
}

#[tokio::test]
async fn a_served_layer_that_cannot_be_plugged_gives_the_others_back() {
    let s = setup();
    let vm = DiskVm::default();
    let good = s.root.join("good/erofs/layer.erofs");
    std::fs::create_dir_all(good.parent().unwrap()).unwrap();
    std::fs::write(&good, "erofs").unwrap();
    let merged = s.root.join("c");
    std::fs::create_dir_all(&merged).unwrap();
    let source = RootfsSource::Served {
        merged: merged.clone(),
        images: vec![good.clone(), s.root.join("gone/erofs/layer.erofs")],
    };
    let err = s.share.attach(&vm, "c", &source).await.unwrap_err();
    assert!(matches!(err, RootfsError::Hotplug { .. }), "{err}");
    let plugged = vm.plugged.lock().unwrap().len();
    assert_eq!(
        vm.unplugged.lock().unwrap().len(),
        plugged,
        "a disk stayed plugged"
    );
    assert!(!merged.join(writable::IMAGE_NAME).exists());
    assert!(good.exists());
}

/// The writable image of `source`, as attach makes it in the container's snapshot.
fn writable_image(source: &RootfsSource) -> PathBuf {
    let RootfsSource::Layers { merged, .. } = source else {
        unreachable!()
    };
    merged.join(writable::IMAGE_NAME)
}

#[tokio::test]
async fn the_next_writable_layer_goes_on_the_disk_plugged_ahead() {
    let s = setup();
    let vm = DiskVm::default();
    let first = s
        .share
        .attach(&vm, "first", &s.container("a"))
        .await
        .unwrap();
    s.share.prepare_next(&vm).await.unwrap();
    s.share.prepare_next(&vm).await.unwrap();
    let plugged = vm.plugged.lock().unwrap().clone();
    let empty: Vec<_> = plugged
        .iter()
        .filter(|p| p.1.as_os_str().is_empty())
        .collect();
    assert_eq!(empty.len(), 1, "one empty disk at a time: {plugged:?}");
    let empty_addr = empty[0].0;

    let source = s.container("b");
    let second = s.share.attach(&vm, "second", &source).await.unwrap();
    let after = vm.plugged.lock().unwrap().clone();
    assert_eq!(
        after.len(),
        plugged.len(),
        "a new disk was plugged: {after:?}"
    );
    let filled = after.iter().find(|p| p.0 == empty_addr).unwrap();
    assert_eq!(
        filled.1,
        writable_image(&source),
        "the empty disk holds the layer"
    );
    let upper = second.rootfs.upper.as_ref().unwrap();
    let Some(pb::storage::Source::Scsi(disk)) = &upper.source else {
        panic!("{upper:?}")
    };
    assert_eq!((disk.target, disk.lun), (empty_addr.target, empty_addr.lun));

    // Taken: the next attach plugs a new disk again.
    let third = s
        .share
        .attach(&vm, "third", &s.container("c"))
        .await
        .unwrap();
    assert_eq!(vm.plugged.lock().unwrap().len(), plugged.len() + 1);
    s.share.detach(&vm, second).await.unwrap();
    assert!(vm.unplugged.lock().unwrap().contains(&empty_addr));
    s.share.detach(&vm, first).await.unwrap();
    s.share.detach(&vm, third).await.unwrap();
}

#[tokio::test]
async fn a_disk_plugged_ahead_that_cannot_be_filled_is_unplugged_for_a_new_one() {
    let s = setup();
    let vm = DiskVm::default();
    s.share.prepare_next(&vm).await.unwrap();
    let empty_addr = vm.plugged.lock().unwrap()[0].0;
    vm.refuse_fill.store(true, Ordering::SeqCst);
    let source = s.container("a");
    let attached = s.share.attach(&vm, "a", &source).await.unwrap();
    assert_eq!(*vm.unplugged.lock().unwrap(), [empty_addr]);
    let plugged = vm.plugged.lock().unwrap().clone();
    assert!(
        plugged.iter().any(|p| p.1 == writable_image(&source)),
        "the layer is not on a disk: {plugged:?}"
    );
    s.share.detach(&vm, attached).await.unwrap();
}
