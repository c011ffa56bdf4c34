use super::*;

fn spec_with_path(path: &str) -> Spec {
    serde_json::from_value(serde_json::json!({
        "ociVersion": "1.1.0",
        "linux": { "cgroupsPath": path }
    }))
    .unwrap()
}

#[test]
fn cgroupfs_and_systemd_paths_become_relative_dirs() {
    let plan = plan(&spec_with_path("/kubepods/besteffort/pod1-2/abc"))
        .unwrap()
        .unwrap();
    assert_eq!(plan.relative, Path::new("kubepods/besteffort/pod1-2/abc"));
    assert_eq!(plan.oom_score_adj, Some(1000));
    let plan = plan_of("kubepods-burstable-pod1_2.slice:cri-containerd:abc");
    assert_eq!(
        plan.relative,
        Path::new(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1_2.slice/cri-containerd-abc.scope"
        )
    );
    assert_eq!(plan.oom_score_adj, None);
    // No path: nothing to join.
    let none: Spec = serde_json::from_value(serde_json::json!({"ociVersion": "1.1.0"})).unwrap();
    assert_eq!(super::plan(&none).unwrap(), None);
}

fn plan_of(path: &str) -> CgroupPlan {
    plan(&spec_with_path(path)).unwrap().unwrap()
}

#[test]
fn paths_that_climb_or_malformed_slices_are_refused() {
    for bad in [
        "/kubepods/../../etc",
        "..",
        "/",
        "a--b.slice:p:n",
        "-a.slice:p:n",
        "x:p:n",
    ] {
        assert!(
            matches!(plan(&spec_with_path(bad)), Err(CgroupError::BadPath { .. })),
            "{bad}"
        );
    }
}

/// A cgroup v1 layout: `cpu` and `cpuacct` links to `cpu,cpuacct` (as most distros mount
/// them), `memory`, and no `pids`/`blkio`.
fn fake_v1() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for dir in ["cpu,cpuacct", "memory", "freezer"] {
        std::fs::create_dir(root.path().join(dir)).unwrap();
    }
    std::os::unix::fs::symlink("cpu,cpuacct", root.path().join("cpu")).unwrap();
    std::os::unix::fs::symlink("cpu,cpuacct", root.path().join("cpuacct")).unwrap();
    root
}

#[test]
fn v1_joins_each_accounting_hierarchy_once_and_v2_the_one() {
    let v1 = fake_v1();
    let dirs = cgroup_dirs(v1.path(), Path::new("pods/p1"));
    let root = std::fs::canonicalize(v1.path()).unwrap();
    assert_eq!(
        dirs,
        [
            root.join("memory/pods/p1"),
            root.join("cpu,cpuacct/pods/p1")
        ]
    );
    let v2 = tempfile::tempdir().unwrap();
    std::fs::write(v2.path().join("cgroup.controllers"), "cpu memory").unwrap();
    assert_eq!(
        cgroup_dirs(v2.path(), Path::new("pods/p1")),
        [v2.path().join("pods/p1")]
    );
}

#[tokio::test]
async fn made_dirs_are_joined_and_only_they_are_removed() {
    let v1 = fake_v1();
    let root = std::fs::canonicalize(v1.path()).unwrap();
    // kubelet made the pod's cgroup in memory only; the sandbox's is Spry's to make.
    std::fs::create_dir_all(root.join("memory/pods/p1")).unwrap();
    let proc = tempfile::tempdir().unwrap();
    let cgroup = PodCgroup::with_roots(
        CgroupPlan {
            relative: "pods/p1/sandbox".into(),
            oom_score_adj: None,
        },
        &root,
        proc.path(),
    );
    cgroup.make_dirs().await.unwrap();
    // (A real cgroup dir has cgroup.procs; a plain dir takes the write as a new file.)
    join(cgroup.dirs(), 42).unwrap();
    for dir in &cgroup.dirs {
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.procs")).unwrap(),
            "42"
        );
        std::fs::remove_file(dir.join("cgroup.procs")).unwrap();
    }
    cgroup.remove_dirs().await;
    assert!(root.join("memory/pods/p1").is_dir(), "kubelet's dir stays");
    assert!(!root.join("memory/pods/p1/sandbox").exists());
    assert!(
        !root.join("cpu,cpuacct/pods").exists(),
        "what Spry made goes"
    );
}

#[tokio::test]
async fn a_dead_shims_pod_cgroup_goes_and_its_parents_stay() {
    let v1 = fake_v1();
    let root = std::fs::canonicalize(v1.path()).unwrap();
    for hierarchy in ["memory", "cpu,cpuacct"] {
        std::fs::create_dir_all(root.join(hierarchy).join("pods/p1/sandbox")).unwrap();
    }
    let proc = tempfile::tempdir().unwrap();
    let plan = CgroupPlan {
        relative: "pods/p1/sandbox".into(),
        oom_score_adj: None,
    };
    let cgroup = PodCgroup::with_roots(plan, &root, proc.path()).owning_existing_dirs();
    cgroup.remove().await;
    for hierarchy in ["memory", "cpu,cpuacct"] {
        assert!(!root.join(hierarchy).join("pods/p1/sandbox").exists());
        assert!(
            root.join(hierarchy).join("pods/p1").is_dir(),
            "a parent stays"
        );
    }
}

#[test]
fn oom_score_adj_is_only_ever_raised() {
    let proc = tempfile::tempdir().unwrap();
    let dir = proc.path().join("7");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("oom_score_adj"), "-997\n").unwrap();
    assert!(raise_oom_score_adj(proc.path(), 7, 1000).unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join("oom_score_adj")).unwrap(),
        "1000"
    );
    assert!(!raise_oom_score_adj(proc.path(), 7, 500).unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join("oom_score_adj")).unwrap(),
        "1000"
    );
}
