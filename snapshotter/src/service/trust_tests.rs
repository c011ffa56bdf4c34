//! The snapshotter's state as another local user or a crash would find it: root-only
//! directories, layer jobs that carry one registry's credentials at 0600, and snapshot ids
//! that a restart never hands out twice.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use containerd_snapshots::Snapshotter;

use super::store::RemoteSource;
use super::*;
use crate::registry::HostConfig;

use super::tests::{config, do_mount, mount_lazily, remote_fixture, require_root, unmount};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

#[tokio::test]
async fn state_directories_are_root_only_even_when_they_existed_wider() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("state");
    std::fs::create_dir_all(root.join("snapshots")).unwrap();
    for d in [root.clone(), root.join("snapshots")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let _sn = SprySnapshotter::open(&config(&root)).await.unwrap();
    for d in [root.clone(), root.join("snapshots"), root.join("cache")] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
}

#[tokio::test]
async fn a_layer_job_carries_only_its_registrys_credentials_and_is_0600() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("state"));
    for (host, password) in [("reg.a", "pass-a"), ("reg.b", "pass-b")] {
        let settings = HostConfig {
            username: Some("user".into()),
            password: Some(password.into()),
            ..HostConfig::default()
        };
        cfg.registry.hosts.insert(host.into(), settings);
    }
    let sn = SprySnapshotter::open(&cfg).await.unwrap();
    let source = RemoteSource {
        image_ref: "reg.a/team/app:1".into(),
        layer_digest: format!("sha256:{}", "a".repeat(64)),
        toc_digest: format!("sha256:{}", "b".repeat(64)),
        chain_id: String::new(),
        parent_chain: String::new(),
    };
    let snapshot_dir = dir.path().join("snap");
    std::fs::create_dir(&snapshot_dir).unwrap();
    let job = sn
        .remote_layers()
        .daemon_job(&source, &snapshot_dir, &[])
        .unwrap();
    let hosts: Vec<&String> = job.registry.hosts.keys().collect();
    assert_eq!(hosts, ["reg.a"]);
    // The job file is written before the daemon starts (here one that fails at once).
    let err = daemon::spawn(Path::new("/bin/false"), &snapshot_dir, &job).unwrap_err();
    assert!(matches!(err, DaemonError::Failed { .. }), "{err:?}");
    let job_file = snapshot_dir.join("layer.json");
    assert_eq!(mode(&job_file), 0o600);
    let text = std::fs::read_to_string(&job_file).unwrap();
    assert!(
        text.contains("pass-a") && !text.contains("pass-b"),
        "{text}"
    );
}

#[tokio::test]
async fn an_id_whose_directory_exists_is_never_handed_out_again() {
    // A crash after a remote layer's id was used on disk but before its record was saved.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("state");
    std::fs::create_dir_all(root.join("snapshots/41/fs")).unwrap();
    let sn = SprySnapshotter::open(&config(&root)).await.unwrap();
    sn.prepare("fresh".into(), String::new(), HashMap::new())
        .await
        .unwrap();
    let id = sn.id_of("fresh").await.unwrap();
    assert!(id > 41, "id {id} reuses a directory left on disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_lazy_image_frees_its_chunks() {
    require_root();
    let fx = remote_fixture(&[]);
    let dir = tempfile::tempdir().unwrap();
    let sn = SprySnapshotter::open(&config(dir.path())).await.unwrap();
    let id = mount_lazily(&sn, &fx.labels).await;
    let layer = sn.remote_layers().layer(id).unwrap();
    tokio::task::spawn_blocking({
        let layer = layer.clone();
        move || layer.fetch_all(&mut |_, _| {}).unwrap()
    })
    .await
    .unwrap();
    let cache = sn.remote_layers().cache().clone();
    assert!(cache.size() > 0);
    drop(layer);
    sn.remove("sha256:chain1".into()).await.unwrap();
    assert_eq!(cache.size(), 0, "the removed image's chunks stayed cached");
    sn.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_a_lazy_layer_only_implies_keeps_the_lower_layers_attributes() {
    require_root();
    // The sample layer has usr/ddd…/file but no entry for usr/ddd…/ itself.
    let implied = format!("usr/{}", "d".repeat(120));
    let fx = remote_fixture(&[]);
    let dir = tempfile::tempdir().unwrap();
    let sn = SprySnapshotter::open(&config(dir.path())).await.unwrap();
    // The layer below: that directory, 0700, 1000:1001, with an xattr.
    let mounts = sn
        .prepare("extract-base".into(), String::new(), HashMap::new())
        .await
        .unwrap();
    let target = dir.path().join("target");
    std::fs::create_dir(&target).unwrap();
    do_mount(&mounts, &target);
    let lower_dir = target.join(&implied);
    std::fs::create_dir_all(&lower_dir).unwrap();
    std::fs::set_permissions(&lower_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(&lower_dir, Some(1000.into()), Some(1001.into())).unwrap();
    crate::sys::setxattr(&lower_dir, "user.owner", b"app").unwrap();
    unmount(&target);
    sn.commit("base".into(), "extract-base".into(), HashMap::new())
        .await
        .unwrap();
    let err = sn
        .prepare("k".into(), "base".into(), fx.labels.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::AlreadyExists { .. }), "{err:?}");
    let id = sn.id_of("sha256:chain1").await.unwrap();
    let served = dir.path().join(format!("snapshots/{id}/fs/{implied}"));
    let meta = std::fs::metadata(&served).unwrap();
    let owner = crate::sys::getxattr(&served, "user.owner");
    sn.remove("sha256:chain1".into()).await.unwrap();
    sn.shutdown();
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o700, 1000, 1001),
        "the lazy layer hid the lower directory's mode and owner"
    );
    assert_eq!(owner.unwrap(), b"app");
}

/// Mounts the sample layer committed as `chain` (on no parent), fetches it in the
/// background and waits until the claim is checked. Returns whether a file still reads, the
/// poisoned marker, and whether a snapshot on top may be prepared.
async fn mount_claiming(chain: Option<&str>) -> (bool, Option<String>, bool) {
    let mut fx = remote_fixture(&[]);
    let (_, out, _, _) = crate::testutil::build(&[]);
    let chain = chain.map(str::to_string).unwrap_or(out.diff_id);
    fx.labels
        .insert(super::remote::TARGET_LABEL.into(), chain.clone());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.lazy.background_fetch = true;
    let sn = SprySnapshotter::open(&cfg).await.unwrap();
    let id = mount_lazily(&sn, &fx.labels).await;
    let snap = dir.path().join(format!("snapshots/{id}"));
    let layer = sn.remote_layers().layer(id).unwrap();
    // Background fetch, then the check: wait for the fetch, then for a verdict.
    let mut verdict = None;
    for _ in 0..250 {
        verdict = verify::poisoned(&snap);
        if verdict.is_some() || layer.fully_cached() {
            // The check streams the blob once more after the fetch: give it time.
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            verdict = verify::poisoned(&snap);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let file = snap.join("fs/etc/hostname");
    let reads = tokio::task::spawn_blocking(move || std::fs::read(file).is_ok())
        .await
        .unwrap();
    let on_top = sn
        .prepare("top".into(), chain.clone(), HashMap::new())
        .await;
    let may_build = match on_top {
        Ok(_) => true,
        Err(ServiceError::Poisoned { .. }) => false,
        Err(other) => panic!("unexpected {other:?}"),
    };
    if may_build {
        sn.remove("top".into()).await.unwrap();
    }
    drop(layer);
    sn.remove(chain).await.unwrap();
    sn.shutdown();
    (reads, verdict, may_build)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_layer_claiming_another_layers_diff_id_is_poisoned() {
    require_root();
    // An image whose config claims a popular base layer's diffID for this layer.
    let claimed = format!("sha256:{}", "5".repeat(64));
    let (reads, verdict, may_build) = mount_claiming(Some(&claimed)).await;
    let reason = verdict.expect("the lying layer was not marked poisoned");
    assert!(reason.contains("claims another layer"), "{reason}");
    assert!(!reads, "a poisoned layer still served a file");
    assert!(!may_build, "a snapshot was prepared on a poisoned layer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_layer_with_its_true_diff_id_keeps_serving() {
    require_root();
    let (reads, verdict, may_build) = mount_claiming(None).await;
    assert_eq!(verdict, None);
    assert!(reads && may_build);
}
