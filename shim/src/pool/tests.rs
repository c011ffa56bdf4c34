use super::*;

#[test]
fn a_dead_spares_dir_is_swept_with_its_vms_leftovers_and_a_live_one_kept() {
    let state = tempfile::tempdir().unwrap();
    let layout = crate::state_dir::StateDir::new(state.path().to_path_buf());
    let pool = layout.pool();
    std::fs::create_dir(&pool).unwrap();
    let live = pool.join("abc-1");
    let dead = pool.join("abc-2");
    let other = pool.join("def-1");
    for dir in [&live, &dead, &other] {
        std::fs::create_dir(dir).unwrap();
    }
    // A killed spare leaves the lock file it made, unlocked.
    std::fs::write(dead.join(LOCK_FILE), "").unwrap();
    // What a spare's VM keeps in the state dir; a killed spare leaves it.
    for name in ["abc-1", "abc-2"] {
        for dir in layout.per_vm_dirs(name) {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("console.log"), "booted").unwrap();
        }
    }
    let _held = try_lock(&live).unwrap().expect("free at first");
    assert!(
        try_lock(&live).unwrap().is_none(),
        "a held lock is seen as held"
    );
    assert_eq!(spare_dirs(&pool, "abc"), vec![live.clone(), dead.clone()]);
    assert!(is_live(&live));
    assert!(!is_live(&dead));
    assert!(!dead.exists(), "a dead spare's dir is removed");
    for dir in layout.per_vm_dirs("abc-2") {
        assert!(!dir.exists(), "the dead spare's VM left {}", dir.display());
    }
    for dir in layout.per_vm_dirs("abc-1") {
        assert!(dir.exists(), "a live spare's VM lost {}", dir.display());
    }
    assert!(other.exists());
}

/// A spare a pod took removes its pool dir, lock file and all, while its VM becomes the
/// pod's; a `start` or a drain that looks at the dir meanwhile (ten pods starting at once)
/// must neither count it nor take it for dead, or the sweep removes the pod's VM state.
#[tokio::test]
async fn a_spare_dir_being_removed_is_neither_live_nor_swept() {
    let state = tempfile::tempdir().unwrap();
    let layout = crate::state_dir::StateDir::new(state.path().to_path_buf());
    let leaving = layout.pool().join("abc-1");
    std::fs::create_dir_all(&leaving).unwrap();
    std::fs::write(leaving.join(CONTAINERD_FILE), "/run/a/containerd.sock").unwrap();
    for dir in layout.per_vm_dirs("abc-1") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("share.sock"), "").unwrap();
    }
    // Its lock file already gone, the rest of the dir not yet.
    assert!(!is_live(&leaving));
    assert!(
        !leaving.join(LOCK_FILE).exists(),
        "a lock file was made in a dir being removed"
    );
    let drained = drain_for_containerd(state.path(), "/run/a/containerd.sock")
        .await
        .unwrap();
    assert_eq!(drained, 0, "a spare that left the pool was counted");
    for dir in layout.per_vm_dirs("abc-1") {
        assert!(
            dir.join("share.sock").exists(),
            "the pod's VM lost {}",
            dir.display()
        );
    }
}

#[test]
fn markers_are_read_back_only_when_sane() {
    let bundle = tempfile::tempdir().unwrap();
    assert_eq!(recorded_vm_name(bundle.path()), None);
    std::fs::write(bundle.path().join(VM_NAME_MARKER), "abc-123\n").unwrap();
    assert_eq!(recorded_vm_name(bundle.path()).as_deref(), Some("abc-123"));
    for bad in ["../../etc", "..", ""] {
        std::fs::write(bundle.path().join(VM_NAME_MARKER), bad).unwrap();
        assert_eq!(recorded_vm_name(bundle.path()), None, "{bad:?}");
    }
    // A pid that is not a spare shim's is no shim of ours.
    std::fs::write(
        bundle.path().join(SHIM_PID_MARKER),
        std::process::id().to_string(),
    )
    .unwrap();
    assert_eq!(recorded_shim_pid(bundle.path()), None);
}

#[test]
fn configs_that_differ_get_different_keys() {
    let a = config_text(&Config::default()).unwrap();
    let mut other = Config::default();
    other.vm.memory_mib += 1;
    let b = config_text(&other).unwrap();
    assert_ne!(config_key(&a), config_key(&b));
    assert_eq!(config_key(&a), config_key(&a));
}

#[tokio::test]
async fn draining_for_a_containerd_ends_only_the_spares_made_for_it() {
    let state = tempfile::tempdir().unwrap();
    let pool = crate::state_dir::StateDir::new(state.path().to_path_buf()).pool();
    let made_for = |name: &str, containerd: Option<&str>| {
        let dir = pool.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(LOCK_FILE), "").unwrap();
        if let Some(address) = containerd {
            std::fs::write(dir.join(CONTAINERD_FILE), address).unwrap();
        }
        dir
    };
    let ours = made_for("abc-1", Some("/run/a/containerd.sock"));
    let ours_too = made_for("def-1", Some("unix:///run/a/containerd.sock"));
    let theirs = made_for("abc-2", Some("/run/b/containerd.sock"));
    let unknown = made_for("abc-3", None);
    // A live spare of ours: draining waits until it lets go of its lock.
    let held = try_lock(&ours).unwrap().expect("free");
    let released = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(held);
    });
    let started = std::time::Instant::now();
    let ended = drain_for_containerd(state.path(), "unix:///run/a/containerd.sock")
        .await
        .unwrap();
    released.join().unwrap();
    assert_eq!(ended, 2);
    assert!(started.elapsed() >= std::time::Duration::from_millis(150));
    assert!(!ours.exists() && !ours_too.exists());
    assert!(theirs.exists() && unknown.exists(), "other spares stay");
    assert_eq!(drain(state.path()).await.unwrap(), 2);
    assert!(!theirs.exists() && !unknown.exists());
}
