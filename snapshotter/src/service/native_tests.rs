//! Native mounts of fully fetched layers (`native.rs`) with real FUSE and erofs mounts:
//! need root, /dev/fuse and a kernel that mounts erofs images from files (>= 6.12).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;

use containerd_snapshots::Snapshotter;

use super::remote::{remote_request, TARGET_LABEL};
use super::*;
use crate::cache::ChunkCache;

use super::tests::{
    config, do_mount, in_blocking, mount_lazily, remote_fixture, require_root, unmount,
    RemoteFixture,
};

/// The fixture with the chain ID its real diffID gives (a base layer: the diffID itself).
fn honest_fixture() -> RemoteFixture {
    let mut fx = remote_fixture(&[]);
    fx.labels
        .insert(TARGET_LABEL.to_string(), fx.diff_id.clone());
    fx
}

/// Mounts the fixture's layer (over FUSE: nothing is verified yet), fetches all of it and
/// verifies its diffID, as the background fetch does; then stops the snapshotter.
async fn fetch_and_verify(root: &Path, fx: &RemoteFixture) -> u64 {
    let sn = SprySnapshotter::open(&config(root)).await.unwrap();
    let id = mount_lazily(&sn, &fx.labels).await;
    let dir = sn.dir(id);
    assert!(
        !native::is_mounted(&dir),
        "an unverified layer was mounted natively"
    );
    let layer = sn.remote_layers().layer(id).expect("served over FUSE");
    let cache = sn.remote_layers().cache().clone();
    let source = remote_request(&fx.labels).unwrap().source;
    let claim = in_blocking(move || {
        layer.fetch_all(&mut |_, _| {}).unwrap();
        verify::check_claim(&layer, &source, &dir, &cache)
    })
    .await;
    assert_eq!(claim, Some(true));
    sn.shutdown();
    id
}

fn files_read_back(root: &Path, files: &[(String, Vec<u8>)]) -> bool {
    files
        .iter()
        .all(|(p, data)| std::fs::read(root.join(p)).ok().as_deref() == Some(data.as_slice()))
}

fn mounted_under(dir: &Path) -> bool {
    String::from_utf8_lossy(&std::fs::read("/proc/self/mountinfo").unwrap())
        .contains(&*dir.to_string_lossy())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_and_verified_layer_is_mounted_natively_and_survives_restarts() {
    require_root();
    let fx = honest_fixture();
    let tmp = tempfile::tempdir().unwrap();
    let id = fetch_and_verify(tmp.path(), &fx).await;

    // Restarted: the layer is fully cached and verified, so it is mounted from its image.
    let sn = SprySnapshotter::open(&config(tmp.path())).await.unwrap();
    let dir = sn.dir(id);
    assert!(
        native::is_mounted(&dir),
        "the layer was not mounted natively"
    );
    assert!(
        sn.remote_layers().layer(id).is_none(),
        "still served over FUSE"
    );
    let image = dir.join("erofs/layer.erofs");
    assert!(image.is_file(), "no image for VMs at {}", image.display());
    let usage = sn.usage(fx.diff_id.clone()).await.unwrap();
    assert!(usage.size > 0 && usage.inodes > 0, "{usage:?}");
    let served = fx.reg.state.blob_bytes_served.load(Ordering::SeqCst);
    let fs = dir.join("fs");
    let files = fx.files.clone();
    assert!(in_blocking(move || files_read_back(&fs, &files)).await);
    assert_eq!(
        fx.reg.state.blob_bytes_served.load(Ordering::SeqCst),
        served,
        "reading a native layer went to the registry"
    );
    // A container on it reads through overlayfs as on any other lower layer.
    let chain = fx.diff_id.clone();
    let mounts = sn
        .prepare("container".into(), chain.clone(), HashMap::new())
        .await
        .unwrap();
    let target = tmp.path().join("rootfs");
    std::fs::create_dir(&target).unwrap();
    do_mount(&mounts, &target);
    let (t, files) = (target.clone(), fx.files.clone());
    assert!(in_blocking(move || files_read_back(&t, &files)).await);
    unmount(&target);

    // A snapshotter restart leaves the mount (and containers on it) alone and adopts it.
    sn.shutdown();
    drop(sn);
    assert!(
        native::is_mounted(&dir),
        "shutdown unmounted a native layer"
    );
    let sn = SprySnapshotter::open(&config(tmp.path())).await.unwrap();
    assert!(native::is_mounted(&dir));
    sn.remove("container".into()).await.unwrap();
    sn.remove(chain).await.unwrap();
    assert!(
        !mounted_under(tmp.path()),
        "removing the layer left its mount"
    );
    assert!(!dir.exists(), "removing the layer left its directory");
    sn.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_cached_chunk_is_fetched_again_never_written_into_the_image() {
    require_root();
    let fx = honest_fixture();
    let tmp = tempfile::tempdir().unwrap();
    let id = fetch_and_verify(tmp.path(), &fx).await;
    // Every cached chunk changed on disk, same length (a torn write, a bad disk, an
    // attacker with the cache directory).
    let chunks = tmp.path().join("cache/sha256");
    let mut corrupted = 0;
    for entry in std::fs::read_dir(&chunks).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        if let Some(b) = bytes.first_mut() {
            *b ^= 0xff;
            std::fs::write(&path, &bytes).unwrap();
            corrupted += 1;
        }
    }
    assert!(corrupted > 0);
    let before = fx.reg.state.blob_bytes_served.load(Ordering::SeqCst);
    let sn = SprySnapshotter::open(&config(tmp.path())).await.unwrap();
    let dir = sn.dir(id);
    assert!(native::is_mounted(&dir));
    assert!(
        fx.reg.state.blob_bytes_served.load(Ordering::SeqCst) > before,
        "the corrupted chunks were not fetched again"
    );
    let (fs, files) = (dir.join("fs"), fx.files.clone());
    assert!(
        in_blocking(move || files_read_back(&fs, &files)).await,
        "the native image holds corrupted bytes"
    );
    sn.remove(fx.diff_id.clone()).await.unwrap();
    sn.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_whose_verified_diff_id_contradicts_its_claim_is_not_served_lazily() {
    require_root();
    // The labels claim chain "sha256:chain1"; the blob's verified diffID says otherwise.
    let fx = remote_fixture(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let cache = ChunkCache::open(&tmp.path().join("cache")).unwrap();
    let source = remote_request(&fx.labels).unwrap().source;
    cache
        .record_diff_id(&source.layer_digest, &fx.diff_id)
        .unwrap();
    let sn = SprySnapshotter::open(&cfg).await.unwrap();
    // Not committed remotely: containerd gets a normal snapshot to fill (and its own
    // diffID check of the download then fails the pull).
    let mounts = sn
        .prepare("k".into(), String::new(), fx.labels.clone())
        .await
        .unwrap();
    assert!(!mounts.is_empty());
    assert!(sn.stat("sha256:chain1".into()).await.is_err());
    assert!(!mounted_under(tmp.path()));
    sn.remove("k".into()).await.unwrap();
    sn.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_native_mounts_off_a_verified_layer_stays_on_fuse() {
    require_root();
    let fx = honest_fixture();
    let tmp = tempfile::tempdir().unwrap();
    let id = fetch_and_verify(tmp.path(), &fx).await;
    let mut cfg = config(tmp.path());
    cfg.lazy.native_mounts = false;
    let sn = SprySnapshotter::open(&cfg).await.unwrap();
    assert!(!native::is_mounted(&sn.dir(id)));
    assert!(sn.remote_layers().layer(id).is_some());
    sn.remove(fx.diff_id.clone()).await.unwrap();
    sn.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_fetched_a_served_layer_switches_to_native_for_new_containers_only() {
    require_root();
    let fx = honest_fixture();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    // Delayed, so that a container is mounted on the FUSE layer before the switch.
    cfg.lazy.background_fetch = false;
    let sn = SprySnapshotter::open(&cfg).await.unwrap();
    let id = mount_lazily(&sn, &fx.labels).await;
    let dir = sn.dir(id);
    let chain = fx.diff_id.clone();
    let mounts = sn
        .prepare("old".into(), chain.clone(), HashMap::new())
        .await
        .unwrap();
    let old_root = tmp.path().join("old");
    std::fs::create_dir(&old_root).unwrap();
    do_mount(&mounts, &old_root);

    // The background fetch, as `start_fetching` runs it once it is done.
    let layer = sn.remote_layers().layer(id).unwrap();
    let cache = sn.remote_layers().cache().clone();
    let source = remote_request(&fx.labels).unwrap().source;
    let d = dir.clone();
    in_blocking(move || {
        layer.fetch_all(&mut |_, _| {}).unwrap();
        assert_eq!(verify::check_claim(&layer, &source, &d, &cache), Some(true));
        super::remote::switch_to_native(&layer, crate::fs::LowerLayers::default(), &d, "fixture");
    })
    .await;
    assert!(
        native::is_mounted(&dir),
        "the fetched layer was not switched"
    );
    assert!(dir.join("native.erofs").is_file());

    // The container mounted before keeps reading (through the FUSE mount below); one
    // mounted now gets the native mount.
    let (t, files) = (old_root.clone(), fx.files.clone());
    assert!(in_blocking(move || files_read_back(&t, &files)).await);
    let mounts = sn
        .prepare("new".into(), chain.clone(), HashMap::new())
        .await
        .unwrap();
    let new_root = tmp.path().join("new");
    std::fs::create_dir(&new_root).unwrap();
    do_mount(&mounts, &new_root);
    let (t, files) = (new_root.clone(), fx.files.clone());
    assert!(in_blocking(move || files_read_back(&t, &files)).await);
    unmount(&new_root);
    unmount(&old_root);

    // Removing the layer takes both mounts down (the native one first, or the FUSE
    // session could not end).
    for key in ["new", "old"] {
        sn.remove(key.into()).await.unwrap();
    }
    sn.remove(chain).await.unwrap();
    assert!(!mounted_under(tmp.path()), "mounts left after removal");
    sn.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_fetch_switches_the_layer_once_it_is_verified() {
    require_root();
    let fx = honest_fixture();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.lazy.background_fetch = true;
    let sn = SprySnapshotter::open(&cfg).await.unwrap();
    let id = mount_lazily(&sn, &fx.labels).await;
    let dir = sn.dir(id);
    let started = std::time::Instant::now();
    while !native::is_mounted(&dir) && started.elapsed() < std::time::Duration::from_secs(20) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        native::is_mounted(&dir),
        "not switched after the background fetch"
    );
    let (fs, files) = (dir.join("fs"), fx.files.clone());
    assert!(in_blocking(move || files_read_back(&fs, &files)).await);
    sn.remove(fx.diff_id.clone()).await.unwrap();
    assert!(!mounted_under(tmp.path()), "mounts left after removal");
    sn.shutdown();
}
