use super::*;

#[test]
fn a_dead_spares_dir_is_swept_and_a_live_one_kept() {
    let pool = tempfile::tempdir().unwrap();
    let live = pool.path().join("abc-1");
    let dead = pool.path().join("abc-2");
    let other = pool.path().join("def-1");
    for dir in [&live, &dead, &other] {
        std::fs::create_dir(dir).unwrap();
    }
    let _held = try_lock(&live).unwrap().expect("free at first");
    assert!(
        try_lock(&live).unwrap().is_none(),
        "a held lock is seen as held"
    );
    assert_eq!(
        spare_dirs(pool.path(), "abc"),
        vec![live.clone(), dead.clone()]
    );
    assert!(is_live(&live));
    assert!(!is_live(&dead));
    assert!(!dead.exists(), "a dead spare's dir is removed");
    assert!(other.exists());
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
