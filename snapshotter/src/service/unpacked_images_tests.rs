//! `vm_images` for unpacked layers: each committed layer gets an erofs image of its tree,
//! built in the background, with overlay's whiteouts as they are; it goes with its
//! snapshot, and a restart finishes what a build left. Real overlay and loop mounts: root.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use containerd_snapshots::Snapshotter;

use super::tests::{config, do_mount, require_root, unmount};
use super::*;
use crate::fs::{IMAGE_DIR, IMAGE_FILE};

/// `<snapshot>/erofs` of the snapshot `key`.
async fn image_dir(sn: &SprySnapshotter, root: &Path, key: &str) -> PathBuf {
    let id = sn.id_of(key).await.unwrap();
    root.join("snapshots").join(id.to_string()).join(IMAGE_DIR)
}

/// Prepares `key` on `parent`, lets `apply` change it through containerd's mounts, commits
/// it as `name`.
async fn layer(
    sn: &SprySnapshotter,
    target: &Path,
    name: &str,
    parent: &str,
    apply: impl FnOnce(&Path),
) {
    let key = format!("extract-{name}");
    let mounts = sn
        .prepare(key.clone(), parent.into(), HashMap::new())
        .await
        .unwrap();
    do_mount(&mounts, target);
    apply(target);
    unmount(target);
    sn.commit(name.into(), key, HashMap::new()).await.unwrap();
}

/// Mounts the erofs image(s), topmost first, read-only at `at` (one image: itself; more:
/// an overlay of them, as the guest stacks them); returns what `read` found there.
fn read_images<T>(images: &[PathBuf], at: &Path, read: impl FnOnce(&Path) -> T) -> T {
    let mut mounted = Vec::new();
    for (n, image) in images.iter().enumerate() {
        let dir = at.join(format!("l{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "erofs", "-o", "ro,loop"])
            .arg(image)
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        mounted.push(dir);
    }
    let merged = at.join("merged");
    std::fs::create_dir_all(&merged).unwrap();
    let lowers: Vec<String> = mounted.iter().map(|d| d.display().to_string()).collect();
    let root = if mounted.len() == 1 {
        mounted[0].clone()
    } else {
        let data = format!("lowerdir={}", lowers.join(":"));
        nix::mount::mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(data.as_str()),
        )
        .unwrap();
        merged.clone()
    };
    let found = read(&root);
    if mounted.len() > 1 {
        unmount(&merged);
    }
    for dir in mounted {
        let _ = std::process::Command::new("umount").arg(&dir).status();
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpacked_layers_get_erofs_images_that_stack_as_their_trees_do() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.lazy.vm_images = true;
    let sn = SprySnapshotter::open(&cfg).await.unwrap();
    let target = dir.path().join("target");
    std::fs::create_dir(&target).unwrap();
    layer(&sn, &target, "layer-1", "", |t| {
        std::fs::write(t.join("a.txt"), b"layer one").unwrap();
        std::fs::hard_link(t.join("a.txt"), t.join("h.txt")).unwrap();
        std::fs::create_dir(t.join("d")).unwrap();
        std::fs::write(t.join("d/x"), b"old").unwrap();
        crate::sys::setxattr(&t.join("d/x"), "user.spry", b"1").unwrap();
        std::os::unix::fs::symlink("a.txt", t.join("s")).unwrap();
    })
    .await;
    // Pending (or, if quick, done) by the time Commit returns: a container created at once
    // waits for it rather than packing the layer.
    let one = image_dir(&sn, dir.path(), "layer-1").await;
    assert!(one.join(UNPACKED_IMAGE_PENDING_FILE).exists() || one.join(IMAGE_FILE).exists());
    // Through overlay: a file deleted (whiteout), a directory replaced (opaque), a new file.
    layer(&sn, &target, "layer-2", "layer-1", |t| {
        std::fs::remove_file(t.join("a.txt")).unwrap();
        std::fs::remove_dir_all(t.join("d")).unwrap();
        std::fs::create_dir(t.join("d")).unwrap();
        std::fs::write(t.join("d/y"), b"new").unwrap();
        std::fs::write(t.join("b.txt"), b"layer two").unwrap();
    })
    .await;
    sn.settle_unpacked_images().await;
    let two = image_dir(&sn, dir.path(), "layer-2").await;
    for d in [&one, &two] {
        let names: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [IMAGE_FILE], "in {}", d.display());
    }
    let (one_image, two_image) = (one.join(IMAGE_FILE), two.join(IMAGE_FILE));
    let scratch = dir.path().join("scratch");
    // The upper image holds overlay's whiteout and opaque marker as they are.
    let (whiteout, opaque) = read_images(std::slice::from_ref(&two_image), &scratch, |r| {
        let meta = std::fs::symlink_metadata(r.join("a.txt")).unwrap();
        (
            meta.file_type().is_char_device() && meta.rdev() == 0,
            crate::sys::getxattr(&r.join("d"), "trusted.overlay.opaque").unwrap(),
        )
    });
    assert!(whiteout, "a.txt is not a whiteout in the upper image");
    assert_eq!(opaque, b"y");
    // Stacked as the guest stacks them: the tree a container of layer-2 sees.
    let seen = read_images(&[two_image, one_image], &scratch, |r| {
        (
            r.join("a.txt").exists(),
            std::fs::read(r.join("h.txt")).unwrap(),
            std::fs::metadata(r.join("h.txt")).unwrap().nlink(),
            r.join("d/x").exists(),
            std::fs::read(r.join("d/y")).unwrap(),
            std::fs::read(r.join("b.txt")).unwrap(),
            std::fs::read_link(r.join("s")).unwrap(),
        )
    });
    assert_eq!(
        seen,
        (
            false,
            b"layer one".to_vec(),
            2,
            false,
            b"new".to_vec(),
            b"layer two".to_vec(),
            PathBuf::from("a.txt")
        )
    );
    let old = read_images(&[one.join(IMAGE_FILE)], &scratch, |r| {
        crate::sys::getxattr(&r.join("d/x"), "user.spry").unwrap()
    });
    assert_eq!(old, b"1");
    // The images go with their snapshots.
    let snapshot_one = one.parent().unwrap().to_path_buf();
    sn.remove("layer-2".into()).await.unwrap();
    sn.remove("layer-1".into()).await.unwrap();
    assert!(!two.parent().unwrap().exists() && !snapshot_one.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_finishes_cut_short_builds_and_a_removed_layer_leaves_nothing() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    std::fs::create_dir(&target).unwrap();
    // vm_images off: no image, no marker.
    let sn = SprySnapshotter::open(&config(dir.path())).await.unwrap();
    layer(&sn, &target, "layer-1", "", |t| {
        std::fs::write(t.join("a.txt"), vec![7u8; 200_000]).unwrap();
    })
    .await;
    let one = image_dir(&sn, dir.path(), "layer-1").await;
    assert!(!one.exists());
    drop(sn);

    // Turned on, and a build cut short by a crash: a partial image and its marker.
    let mut cfg = config(dir.path());
    cfg.lazy.vm_images = true;
    std::fs::create_dir(&one).unwrap();
    std::fs::write(one.join("layer.erofs.partial"), b"cut short").unwrap();
    std::fs::write(one.join(UNPACKED_IMAGE_PENDING_FILE), b"").unwrap();
    let sn = SprySnapshotter::open(&cfg).await.unwrap();
    sn.settle_unpacked_images().await;
    let names: Vec<_> = std::fs::read_dir(&one)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [IMAGE_FILE]);
    let size = read_images(&[one.join(IMAGE_FILE)], &dir.path().join("m"), |r| {
        std::fs::metadata(r.join("a.txt")).unwrap().len()
    });
    assert_eq!(size, 200_000);

    // Removed while its build is queued or running: nothing comes back.
    layer(&sn, &target, "layer-2", "layer-1", |t| {
        std::fs::write(t.join("b.txt"), vec![9u8; 4 << 20]).unwrap();
    })
    .await;
    let two = image_dir(&sn, dir.path(), "layer-2").await;
    sn.remove("layer-2".into()).await.unwrap();
    sn.settle_unpacked_images().await;
    assert!(
        !two.parent().unwrap().exists(),
        "the removed snapshot's dir came back"
    );
}
