//! Service tests with real overlay and FUSE mounts: need root and
//! /dev/fuse, and fail without them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use containerd_snapshots::{Kind, Snapshotter};
use futures::StreamExt;

use super::remote::{IMAGE_REF_LABEL, LAYER_DIGEST_LABEL, TARGET_LABEL};
use super::*;
use crate::config::Config;
use crate::estargz::TOC_DIGEST_ANNOTATION;
use crate::testutil::registry::{Auth, MockRegistry};
use crate::testutil::{build, pattern};

pub(super) fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "service tests mount overlays and need root"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "service tests need /dev/fuse"
    );
}

pub(super) fn config(root: &Path) -> Config {
    let mut c = Config {
        root: root.to_path_buf(),
        ..Config::default()
    };
    c.lazy.background_fetch = false;
    // The test binary cannot be a layer daemon; the e2e tests cover those.
    c.lazy.fuse_daemon = false;
    c.lazy.fetch_attempts = 2;
    c.lazy.fetch_backoff_ms = 10;
    c.registry.request_timeout_ms = 2_000;
    c
}

/// Performs containerd's mounts at `target` (as containerd would).
pub(super) fn do_mount(mounts: &[Mount], target: &Path) {
    assert_eq!(mounts.len(), 1);
    let m = &mounts[0];
    let ro = m.options.iter().any(|o| o == "ro");
    if m.r#type == "bind" {
        let mut flags = nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC;
        nix::mount::mount(
            Some(m.source.as_str()),
            target,
            None::<&str>,
            flags,
            None::<&str>,
        )
        .unwrap();
        if ro {
            flags |= nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY;
            nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>).unwrap();
        }
    } else {
        let opts: Vec<&str> = m
            .options
            .iter()
            .map(String::as_str)
            .filter(|o| *o != "ro")
            .collect();
        let data = opts.join(",");
        let flags = if ro {
            nix::mount::MsFlags::MS_RDONLY
        } else {
            nix::mount::MsFlags::empty()
        };
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            flags,
            Some(data.as_str()),
        )
        .unwrap();
    }
}

pub(super) fn unmount(target: &Path) {
    nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH).unwrap();
}

pub(super) async fn in_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_lifecycle_with_real_mounts() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let sn = SprySnapshotter::open(&config(dir.path())).await.unwrap();
    let target = dir.path().join("target");
    std::fs::create_dir(&target).unwrap();

    // Layer 1: bind mount of an empty dir; "apply" a file; commit.
    let mounts = sn
        .prepare("extract-1".into(), String::new(), HashMap::new())
        .await
        .unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    do_mount(&mounts, &target);
    std::fs::write(target.join("a.txt"), b"layer one").unwrap();
    unmount(&target);
    sn.commit("layer-1".into(), "extract-1".into(), HashMap::new())
        .await
        .unwrap();
    assert!(matches!(
        sn.stat("extract-1".into()).await,
        Err(ServiceError::NotFound { .. })
    ));
    let info = sn.stat("layer-1".into()).await.unwrap();
    assert_eq!(info.kind, Kind::Committed);
    assert!(sn.usage("layer-1".into()).await.unwrap().size > 0);

    // Layer 2 on top: overlay, delete a.txt (whiteout), add b.txt.
    let mounts = sn
        .prepare("extract-2".into(), "layer-1".into(), HashMap::new())
        .await
        .unwrap();
    assert_eq!(mounts[0].r#type, "overlay");
    do_mount(&mounts, &target);
    assert_eq!(std::fs::read(target.join("a.txt")).unwrap(), b"layer one");
    std::fs::remove_file(target.join("a.txt")).unwrap();
    std::fs::write(target.join("b.txt"), b"layer two").unwrap();
    unmount(&target);
    sn.commit("layer-2".into(), "extract-2".into(), HashMap::new())
        .await
        .unwrap();

    // A container: rw overlay over both; a view: ro.
    let mounts = sn
        .prepare("container".into(), "layer-2".into(), HashMap::new())
        .await
        .unwrap();
    do_mount(&mounts, &target);
    assert!(!target.join("a.txt").exists());
    assert_eq!(std::fs::read(target.join("b.txt")).unwrap(), b"layer two");
    std::fs::write(target.join("c.txt"), b"rw").unwrap();
    unmount(&target);
    let mounts = sn
        .view("view".into(), "layer-1".into(), HashMap::new())
        .await
        .unwrap();
    do_mount(&mounts, &target);
    assert!(
        std::fs::write(target.join("x"), b"no").is_err(),
        "view must be read-only"
    );
    assert_eq!(std::fs::read(target.join("a.txt")).unwrap(), b"layer one");
    unmount(&target);
    assert_eq!(
        sn.mounts("container".into()).await.unwrap(),
        sn.mounts("container".into()).await.unwrap()
    );

    // Error semantics.
    let err = sn
        .prepare("container".into(), String::new(), HashMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::AlreadyExists { .. }));
    let err = sn
        .prepare("x".into(), "container".into(), HashMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::ParentNotCommitted { .. }));
    let err = sn
        .prepare("x".into(), "missing".into(), HashMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound { .. }));
    let err = sn.remove("layer-1".into()).await.unwrap_err();
    assert!(matches!(err, ServiceError::HasChildren { .. }));
    let err = sn
        .commit("c2".into(), "layer-2".into(), HashMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotActive { .. }));

    // Walk with filters, label updates.
    let all: Vec<_> = sn
        .list(String::new(), vec![])
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(all.len(), 4);
    let committed: Vec<_> = sn
        .list(String::new(), vec!["kind==committed".into()])
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(committed.len(), 2);
    let mut info = sn.stat("layer-2".into()).await.unwrap();
    info.labels
        .insert("containerd.io/gc.root".into(), "x".into());
    sn.update(info, Some(vec!["labels.containerd.io/gc.root".into()]))
        .await
        .unwrap();
    let hits: Vec<_> = sn
        .list(
            String::new(),
            vec![r#"labels."containerd.io/gc.root"==x"#.into()],
        )
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(hits.len(), 1);

    // Metadata survives a restart.
    let id = sn.id_of("container").await.unwrap();
    drop(sn);
    let sn = SprySnapshotter::open(&config(dir.path())).await.unwrap();
    assert_eq!(
        sn.stat("layer-2".into()).await.unwrap().labels["containerd.io/gc.root"],
        "x"
    );
    assert_eq!(sn.id_of("container").await, Some(id));

    // Remove everything; Cleanup drops orphans.
    for key in ["view", "container", "layer-2", "layer-1"] {
        sn.remove(key.into()).await.unwrap();
    }
    std::fs::create_dir_all(dir.path().join("snapshots/999/fs")).unwrap();
    sn.clear().await.unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path().join("snapshots"))
            .unwrap()
            .count(),
        0
    );
}

pub(super) struct RemoteFixture {
    pub(super) reg: Arc<MockRegistry>,
    pub(super) labels: HashMap<String, String>,
    pub(super) blob_size: u64,
    pub(super) files: Vec<(String, Vec<u8>)>,
    /// The layer's real diffID (the labels claim "sha256:chain1").
    pub(super) diff_id: String,
}

/// Prepares the fixture's remote layer (containerd's unpack of it): committed lazily under
/// its target chain ID. Returns the snapshot's id.
pub(super) async fn mount_lazily(sn: &SprySnapshotter, labels: &HashMap<String, String>) -> u64 {
    let err = sn
        .prepare("k".into(), String::new(), labels.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::AlreadyExists { .. }), "{err:?}");
    sn.id_of(&labels[TARGET_LABEL]).await.unwrap()
}

pub(super) fn remote_fixture(prioritized: &[&str]) -> RemoteFixture {
    let reg = MockRegistry::start(&tokio::runtime::Handle::current(), Auth::None, true);
    let (blob, out, _, files) = build(prioritized);
    let blob_size = blob.len() as u64;
    let digest = reg.put_blob(blob);
    let labels: HashMap<String, String> = [
        (TARGET_LABEL, "sha256:chain1".to_string()),
        (
            IMAGE_REF_LABEL,
            format!("{}/spry/sample:estargz", reg.host()),
        ),
        (LAYER_DIGEST_LABEL, digest),
        (TOC_DIGEST_ANNOTATION, out.toc_digest.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    RemoteFixture {
        reg,
        labels,
        blob_size,
        files,
        diff_id: out.diff_id,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_snapshot_is_mounted_lazily_and_survives_restart() {
    require_root();
    let fx = remote_fixture(&[]);
    let dir = tempfile::tempdir().unwrap();
    let sn = SprySnapshotter::open(&config(dir.path())).await.unwrap();
    let err = sn
        .prepare(
            "extract-1 sha256:chain1".into(),
            String::new(),
            fx.labels.clone(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::AlreadyExists { .. }), "{err:?}");
    let info = sn.stat("sha256:chain1".into()).await.unwrap();
    assert_eq!(info.kind, Kind::Committed);
    // containerd's metadata layer finds the target with this filter.
    let found: Vec<_> = sn
        .list(String::new(), vec!["target==sha256:chain1,parent==".into()])
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(found.len(), 1);
    let after_open = fx.reg.state.blob_bytes_served.load(Ordering::SeqCst);
    assert!(
        after_open < fx.blob_size,
        "opening fetched {after_open} of {} bytes",
        fx.blob_size
    );

    // A container on top reads one file.
    let mounts = sn
        .prepare("container".into(), "sha256:chain1".into(), HashMap::new())
        .await
        .unwrap();
    assert!(mounts[0].options.iter().any(|o| o.starts_with("lowerdir=")));
    let target = dir.path().join("rootfs");
    std::fs::create_dir(&target).unwrap();
    do_mount(&mounts, &target);
    let t = target.clone();
    let hostname = in_blocking(move || std::fs::read(t.join("etc/hostname")))
        .await
        .unwrap();
    assert_eq!(hostname, b"spry\n");
    let served = fx.reg.state.blob_bytes_served.load(Ordering::SeqCst);
    assert!(
        served < fx.blob_size / 2,
        "reading one small file fetched {served} of {} bytes",
        fx.blob_size
    );
    unmount(&target);

    // Restart: the layer is remounted and still reads.
    sn.shutdown();
    drop(sn);
    let sn = SprySnapshotter::open(&config(dir.path())).await.unwrap();
    let mounts = sn.mounts("container".into()).await.unwrap();
    do_mount(&mounts, &target);
    let t = target.clone();
    let files = fx.files.clone();
    let result = in_blocking(move || {
        files
            .iter()
            .all(|(p, data)| std::fs::read(t.join(p)).ok().as_deref() == Some(data.as_slice()))
    })
    .await;
    unmount(&target);
    assert!(result, "files differ after restart");
    sn.remove("container".into()).await.unwrap();
    sn.remove("sha256:chain1".into()).await.unwrap();
    sn.shutdown();
    assert!(
        !String::from_utf8_lossy(&std::fs::read("/proc/self/mountinfo").unwrap())
            .contains(&dir.path().to_string_lossy().into_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_fetches_prioritized_files_before_they_are_read() {
    require_root();
    let fx = remote_fixture(&["usr/bin/app"]);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.lazy.prefetch = true;
    let sn = SprySnapshotter::open(&cfg).await.unwrap();
    let id = mount_lazily(&sn, &fx.labels).await;
    let layer = sn.remote_layers().layer(id).unwrap();
    // Wait for the prefetch thread to cache the prioritized file.
    let index = layer.index();
    let app_idx = index
        .entries
        .iter()
        .position(|e| e.name == "usr/bin/app")
        .unwrap();
    let digests: Vec<String> = index.chunks[&app_idx]
        .iter()
        .map(|c| c.digest.clone())
        .collect();
    let all_cached = || digests.iter().all(|d| layer.is_cached(d));
    for _ in 0..250 {
        if all_cached() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(all_cached(), "prefetch did not cache the prioritized file");
    let requests = fx.reg.state.range_requests.load(Ordering::SeqCst);
    let app = dir.path().join(format!("snapshots/{id}/fs/usr/bin/app"));
    let data = in_blocking(move || std::fs::read(app)).await.unwrap();
    assert_eq!(data, pattern(2_500, 9));
    assert_eq!(
        fx.reg.state.range_requests.load(Ordering::SeqCst),
        requests,
        "prefetched file was fetched again"
    );
    assert!(layer.stats().bytes_fetched.load(Ordering::SeqCst) < fx.blob_size);
    sn.remove("sha256:chain1".into()).await.unwrap();
    sn.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_toc_digest_falls_back_to_a_normal_pull() {
    require_root();
    let mut fx = remote_fixture(&[]);
    fx.labels.insert(
        TOC_DIGEST_ANNOTATION.into(),
        crate::estargz::sha256_digest(b"forged"),
    );
    let dir = tempfile::tempdir().unwrap();
    let sn = SprySnapshotter::open(&config(dir.path())).await.unwrap();
    let mounts = sn
        .prepare("extract".into(), String::new(), fx.labels.clone())
        .await
        .unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    assert!(matches!(
        sn.stat("sha256:chain1".into()).await,
        Err(ServiceError::NotFound { .. })
    ));
    assert_eq!(sn.stat("extract".into()).await.unwrap().kind, Kind::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_outage_gives_eio_and_reads_recover() {
    require_root();
    let fx = remote_fixture(&[]);
    let dir = tempfile::tempdir().unwrap();
    let sn = SprySnapshotter::open(&config(dir.path())).await.unwrap();
    let id = mount_lazily(&sn, &fx.labels).await;
    let big = dir.path().join(format!("snapshots/{id}/fs/usr/bin/big"));
    fx.reg.go_down();
    let b = big.clone();
    let (result, elapsed) = in_blocking(move || {
        let started = std::time::Instant::now();
        (std::fs::read(b), started.elapsed())
    })
    .await;
    assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(
        elapsed < std::time::Duration::from_secs(10),
        "read took {elapsed:?}"
    );
    fx.reg.come_back();
    let data = in_blocking(move || std::fs::read(big)).await.unwrap();
    assert_eq!(data, pattern(10_000, 3));
    sn.remove("sha256:chain1".into()).await.unwrap();
    sn.shutdown();
}
