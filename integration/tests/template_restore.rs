//! Template restore failures below the shim: a template that passes its integrity check but
//! cannot be restored (its device state is garbage) must still give a working sandbox, cold,
//! and a rebuilt template; a VM asked to restore a broken stream fails cleanly. Real QEMU,
//! real guest, real agent. Needs root (see scripts/test.sh).

mod vm_support;

use std::sync::Arc;
use std::time::Duration;

use spry_shim::rootfs::{ErofsBlockShare, RootfsShare};
use spry_shim::sandbox::{SandboxIdentity, DEFAULT_BOOT_TIMEOUT};
use spry_shim::template::{
    build_template, start_sandbox, LaunchRequest, Manifest, TemplatePolicy, TemplateStore,
};
use spry_shim::vm::{GuestMemory, Hypervisor, QemuHypervisor, VmConfig, VmError};
use vm_support::*;

fn request(area: &TestArea, id: &str, store: &TemplateStore) -> LaunchRequest {
    LaunchRequest {
        hypervisor: Arc::new(QemuHypervisor::new(shared_state_root())),
        store: store.clone(),
        policy: TemplatePolicy::Auto,
        vm_config: area.vm_config(id),
        identity: SandboxIdentity {
            hostname: id.to_string(),
            ..Default::default()
        },
        boot_timeout: DEFAULT_BOOT_TIMEOUT,
    }
}

/// Rewrites `dir`'s manifest so that it vouches for the files as they are now.
fn bless(dir: &std::path::Path) {
    let path = dir.join("manifest.json");
    let mut manifest: Manifest = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let state = dir.join("state");
    let meta = std::fs::metadata(&state).unwrap();
    use std::os::unix::fs::MetadataExt;
    manifest.state.size = meta.size();
    manifest.state.inode = meta.ino();
    manifest.state.mtime_s = meta.mtime();
    manifest.state.mtime_ns = meta.mtime_nsec();
    use sha2::Digest;
    manifest.state_sha256 = hex::encode(sha2::Sha256::digest(std::fs::read(&state).unwrap()));
    std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_fails_to_restore_gives_a_cold_sandbox_and_is_rebuilt() {
    let area = TestArea::new();
    let store = TemplateStore::new(area.dir.path().join("templates"));
    let rootfs = area.dir.path().join("rootfs");
    let make_share =
        move || Box::new(ErofsBlockShare::new(rootfs.join("restore-test"))) as Box<dyn RootfsShare>;

    // First sandbox: builds the template and restores from it.
    let first = start_sandbox(request(&area, "tpl-ok", &store), &make_share)
        .await
        .expect("first sandbox");
    assert!(first.restored, "the first sandbox was not restored");
    first.sandbox.shutdown(SHORT).await.unwrap();
    let template = store.list().unwrap().remove(0).1.unwrap();

    // Garbage device state that still matches the manifest: only the restore can tell.
    std::fs::write(template.state_path(), vec![0x5a; 4096]).unwrap();
    bless(&template.dir);
    assert!(store.get(&template.manifest.key).unwrap().is_some());

    let launch = start_sandbox(request(&area, "tpl-bad", &store), &make_share)
        .await
        .expect("a broken template must not fail the sandbox");
    assert!(!launch.restored, "restored from a garbage template?");
    assert_eq!(
        launch.sandbox.agent().info.kernel_release,
        "6.1.0-56-cloud-amd64"
    );
    let rebuild = launch.rebuild.expect("a rebuild was started");
    tokio::time::timeout(Duration::from_secs(120), rebuild)
        .await
        .expect("rebuild finished")
        .unwrap();
    launch.sandbox.shutdown(SHORT).await.unwrap();
    let rebuilt = store
        .get(&template.manifest.key)
        .unwrap()
        .expect("template rebuilt");
    assert_ne!(rebuilt.manifest.state_sha256, "");

    let again = start_sandbox(request(&area, "tpl-again", &store), &make_share)
        .await
        .unwrap();
    assert!(again.restored, "the rebuilt template was not used");
    again.sandbox.shutdown(SHORT).await.unwrap();
    area.assert_no_leaks();
    let builds: Vec<_> = std::fs::read_dir(store.root())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".build-"))
        .collect();
    assert!(builds.is_empty(), "half-built templates left: {builds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_a_broken_stream_fails_cleanly() {
    let area = TestArea::new();
    let store = TemplateStore::new(area.dir.path().join("templates"));
    let hypervisor = QemuHypervisor::new(shared_state_root());
    let base = area.vm_config("tpl-src");
    let key = hypervisor.snapshot_fingerprint(&base).await.unwrap();
    let template = build_template(&hypervisor, &store, &base, &key, Duration::from_secs(60))
        .await
        .unwrap();
    let broken = area.dir.path().join("broken-state");
    std::fs::write(&broken, b"QEVM but not really").unwrap();
    let clone = VmConfig {
        memory: GuestMemory::PrivateFile {
            path: template.memory_path(),
        },
        restore: Some(broken.clone()),
        ..area.vm_config("tpl-broken")
    };
    let err = match hypervisor.start(clone).await {
        Ok(_) => panic!("a garbage stream restored"),
        Err(err) => err,
    };
    assert!(
        matches!(err, VmError::Restore { ref state, .. } if *state == broken),
        "{err}"
    );
    area.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_initramfs_gets_a_new_template_and_the_old_one_goes() {
    let area = TestArea::new();
    let store = TemplateStore::new(area.dir.path().join("templates"));
    // A private copy of the initramfs, so replacing it touches no other test.
    let initramfs = area.dir.path().join("initramfs.img");
    std::fs::copy(guest_dir().join("initramfs.img"), &initramfs).unwrap();
    let rootfs = area.dir.path().join("rootfs");
    let make_share =
        move || Box::new(ErofsBlockShare::new(rootfs.join("stale-test"))) as Box<dyn RootfsShare>;
    let launch = |id: &str| {
        let mut request = request(&area, id, &store);
        request.vm_config.initramfs = initramfs.clone();
        request
    };

    let first = start_sandbox(launch("tpl-old"), &make_share).await.unwrap();
    assert!(first.restored);
    first.sandbox.shutdown(SHORT).await.unwrap();
    let old: Vec<_> = store.list().unwrap().into_iter().map(|(d, _)| d).collect();
    assert_eq!(old.len(), 1);

    // An upgrade replaces the file (new inode, same content is enough to count as new).
    let staged = area.dir.path().join("initramfs.new");
    std::fs::copy(&initramfs, &staged).unwrap();
    std::fs::rename(&staged, &initramfs).unwrap();

    let second = start_sandbox(launch("tpl-new"), &make_share).await.unwrap();
    assert!(second.restored, "not restored from the new template");
    second.sandbox.shutdown(SHORT).await.unwrap();
    let now: Vec<_> = store.list().unwrap().into_iter().map(|(d, _)| d).collect();
    assert_eq!(now.len(), 1, "superseded template kept: {now:?}");
    assert_ne!(now, old, "the stale template was reused");
    area.assert_no_leaks();
}
