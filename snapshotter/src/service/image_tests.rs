//! `vm_images`: a remote layer is also served as an erofs image beside its tree, and goes
//! with it. Real FUSE and loop mounts: root needed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use containerd_snapshots::Snapshotter;

use super::tests::{config, remote_fixture, require_root};
use super::*;

/// The image a lower directory's snapshot serves (the path Spry's shim looks for).
fn image_of(lowerdir: &str) -> PathBuf {
    Path::new(lowerdir)
        .with_file_name(crate::fs::IMAGE_DIR)
        .join(crate::fs::IMAGE_FILE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_layer_is_served_as_an_erofs_image_too_and_removed_with_it() {
    require_root();
    let fx = remote_fixture(&[]);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.lazy.vm_images = true;
    let sn = SprySnapshotter::open(&cfg).await.unwrap();
    let _ = sn
        .prepare(
            "extract-1 sha256:chain1".into(),
            String::new(),
            fx.labels.clone(),
        )
        .await
        .unwrap_err();
    let mounts = sn
        .prepare("container".into(), "sha256:chain1".into(), HashMap::new())
        .await
        .unwrap();
    let lowerdir = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap()
        .to_owned();
    let image = image_of(&lowerdir);
    let served = fx.reg.state.blob_bytes_served.load(Ordering::SeqCst);
    let check = tokio::task::spawn_blocking(move || {
        let mnt = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "erofs", "-o", "ro,loop"])
            .arg(&image)
            .arg(mnt.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let hostname = std::fs::read(mnt.path().join("etc/hostname"));
        let same = std::fs::read_dir(mnt.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<std::collections::BTreeSet<_>>()
            == std::fs::read_dir(&lowerdir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
        let _ = std::process::Command::new("umount")
            .arg(mnt.path())
            .status();
        (hostname.ok(), same)
    })
    .await
    .unwrap();
    assert_eq!(check.0.as_deref(), Some(&b"spry\n"[..]));
    assert!(check.1, "the image's root differs from the layer's tree");
    let after = fx.reg.state.blob_bytes_served.load(Ordering::SeqCst);
    assert!(
        after - served < fx.blob_size / 2,
        "reading one file through the image fetched {} of {} bytes",
        after - served,
        fx.blob_size
    );

    sn.remove("container".into()).await.unwrap();
    sn.remove("sha256:chain1".into()).await.unwrap();
    sn.shutdown();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(&dir.path().to_string_lossy().into_owned()),
        "mounts left: {mountinfo}"
    );
}
