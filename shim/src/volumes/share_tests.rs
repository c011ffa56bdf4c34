//! Tests of the host side of the file share (mounts: need root). The hand-over to a real
//! server in its own namespace is tested in integration/tests/volume_server.rs.

use std::os::fd::AsFd;

use nix::mount::{mount, MsFlags};

use super::*;
use crate::sys::mount::{attach_tree, clone_tree};

fn volume(source: &Path, is_dir: bool, readonly: ReadOnly) -> SharedVolume {
    SharedVolume {
        destination: "/v".into(),
        source: source.to_path_buf(),
        is_dir,
        readonly,
        options: vec!["rbind".into(), "ro".into()],
    }
}

/// What the server does with a handed-over volume, here in the test's own namespace.
fn attach_here(volume: &SharedVolume, target: &Path) {
    place(volume, target).unwrap();
    let readonly = volume.readonly != ReadOnly::No;
    let tree = clone_tree(
        &volume.source,
        readonly,
        volume.readonly == ReadOnly::Recursive,
    )
    .unwrap();
    attach_tree(tree.as_fd(), target).unwrap();
}

fn is_mountpoint(path: &Path) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(path))
}

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root"
    );
}

/// Also what `delete` relies on for the state of a killed shim of an older version, which
/// bound volumes on the host.
#[test]
fn teardown_detaches_mounts_and_never_deletes_the_users_data() {
    require_root();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("precious"), "keep me").unwrap();
    let file = root.path().join("file");
    std::fs::write(&file, "keep me too").unwrap();
    let share = root.path().join("share");

    prepare_staging(&share).unwrap();
    assert!(!is_mountpoint(&share), "the staging dir is no mount");
    let container = share.join("c1");
    create_dir(&container).unwrap();
    attach_here(&volume(&data, true, ReadOnly::No), &container.join("0"));
    attach_here(
        &volume(&file, false, ReadOnly::TopMount),
        &container.join("1"),
    );
    assert_eq!(
        std::fs::read_to_string(container.join("0/precious")).unwrap(),
        "keep me"
    );
    // Read-only from the start.
    let err = std::fs::write(container.join("1"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));

    unbind_all(&[container.join("0"), container.join("1")]);
    remove_staging(&share);
    assert!(!share.exists(), "the share dir is left");
    assert_eq!(
        std::fs::read_to_string(data.join("precious")).unwrap(),
        "keep me"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me too");
}

/// A plain read-only volume leaves a mount under its source writable, in the tree handed
/// over and in what the guest is told; a recursive one does not.
#[test]
fn mounts_under_a_read_only_volume_keep_their_flag_unless_it_is_recursive() {
    require_root();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let tmpfs = data.join("tmpfs");
    std::fs::create_dir_all(&tmpfs).unwrap();
    let none = None::<&str>;
    mount(Some("none"), &tmpfs, Some("tmpfs"), MsFlags::empty(), none).unwrap();
    let share = root.path().join("share");
    prepare_staging(&share).unwrap();

    let plain = volume(&data, true, ReadOnly::TopMount);
    let target = share.join("0");
    attach_here(&plain, &target);
    let top = std::fs::write(target.join("file"), "x").unwrap_err();
    assert_eq!(top.raw_os_error(), Some(libc::EROFS));
    std::fs::write(target.join("tmpfs/file"), "x").unwrap();
    let told: Vec<_> = submount_binds(&plain, "c/0")
        .into_iter()
        .map(|b| (b.destination, b.source, b.options))
        .collect();
    let share_path = |p: &str| Some(volume_mount::Source::SharePath(p.into()));
    assert_eq!(
        told,
        [
            (
                "/v".into(),
                share_path("c/0"),
                vec!["rbind".into(), "ro".into()]
            ),
            (
                "/v/tmpfs".into(),
                share_path("c/0/tmpfs"),
                vec!["rbind".into(), "rw".into()]
            ),
        ]
    );

    let mut recursive = volume(&data, true, ReadOnly::Recursive);
    recursive.options = vec!["rbind".into(), "rro".into()];
    let target = share.join("1");
    attach_here(&recursive, &target);
    let below = std::fs::write(target.join("tmpfs/other"), "x").unwrap_err();
    assert_eq!(below.raw_os_error(), Some(libc::EROFS));

    unbind_all(&[share.join("0"), share.join("1")]);
    assert!(tmpfs.is_dir());
    remove_staging(&share);
    umount2(&tmpfs, MntFlags::MNT_DETACH).unwrap();
    assert!(!share.exists());
}
