//! The packer against the kernel: an image of a tree with every kind of file is mounted
//! (file-backed erofs; root needed, fails without) and must show the same tree.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use super::*;

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    sys::xattr::set(path, name.as_bytes(), value)
        .unwrap_or_else(|e| panic!("{name} on {path:?}: {e}"));
}

/// An entry's xattrs, sorted, values in hex.
fn xattrs_of(path: &Path) -> Vec<String> {
    let parent = File::open(path.parent().unwrap()).unwrap();
    let name = std::ffi::CString::new(path.file_name().unwrap().as_bytes()).unwrap();
    let mut list: Vec<String> = sys::xattr::list_at(parent.as_fd(), &name)
        .unwrap()
        .into_iter()
        .map(|(k, v)| format!("{}={}", String::from_utf8_lossy(&k), hex::encode(v)))
        .collect();
    list.sort();
    list
}

/// A tree with directories (one of several blocks), files of sizes around block
/// boundaries, symlinks (one to a host secret), a hard-link pair, a fifo, a device,
/// special modes, ownership, nanosecond mtimes, xattrs and a non-UTF-8 name.
fn sample_tree(root: &Path) {
    std::fs::create_dir_all(root.join("usr/lib/deep/er")).unwrap();
    for (name, size) in [("empty", 0), ("one", 1), ("block", 4096), ("block1", 4097)] {
        std::fs::write(root.join("usr").join(name), vec![b'x'; size]).unwrap();
    }
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.join("usr/lib/big"), &big).unwrap();
    for i in 0..600 {
        std::fs::write(
            root.join(format!("usr/lib/deep/file-{i:04}")),
            i.to_string(),
        )
        .unwrap();
    }
    symlink("/etc/shadow", root.join("secret")).unwrap();
    symlink("../one", root.join("usr/lib/rel")).unwrap();
    std::fs::hard_link(root.join("usr/one"), root.join("usr/lib/one-again")).unwrap();
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &root.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .expect("mknod needs root");
    let suid = root.join("usr/suid");
    std::fs::write(&suid, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::lchown(&suid, Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(root.join("secret"), Some(7), Some(8)).unwrap();
    set_xattr(&suid, "user.note", b"kept");
    // VFS_CAP_REVISION_2 with the effective flag: CAP_NET_BIND_SERVICE permitted.
    let mut cap = vec![1, 0, 0, 2, 0, 4, 0, 0];
    cap.resize(20, 0);
    set_xattr(&suid, "security.capability", &cap);
    set_xattr(&root.join("usr/lib"), "trusted.dir", b"d");
    let odd = root.join(OsStr::from_bytes(b"name-\xff-not-utf8"));
    std::fs::write(&odd, b"odd").unwrap();
    let times = nix::sys::time::TimeSpec::new(1_600_000_000, 123_456_789);
    nix::sys::stat::utimensat(
        None,
        &root.join("usr/block1"),
        &times,
        &times,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

/// Every entry under `root`: what a container would see of it.
fn describe(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    let mut inodes: BTreeMap<u64, PathBuf> = BTreeMap::new();
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let mut line = format!(
                "mode {:o} uid {} gid {} mtime {}.{} rdev {}",
                meta.mode(),
                meta.uid(),
                meta.gid(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.rdev()
            );
            if meta.is_dir() {
                line += &format!(" nlink {}", meta.nlink());
                pending.push(path.clone());
            } else if meta.is_symlink() {
                line += &format!(" -> {:?}", std::fs::read_link(&path).unwrap());
            } else if meta.is_file() {
                let data = std::fs::read(&path).unwrap();
                let digest = hex::encode(sha2::Sha256::digest(&data));
                line += &format!(
                    " size {} sha256 {digest} nlink {}",
                    meta.len(),
                    meta.nlink()
                );
                // Hard links: the same inode under each of their names.
                let first = inodes.entry(meta.ino()).or_insert_with(|| rel.clone());
                line += &format!(" inode-of {first:?}");
            }
            line += &format!(" xattrs {:?}", xattrs_of(&path));
            out.insert(rel, line);
        }
    }
    out
}

use sha2::Digest;

/// Mounts an erofs image file read-only; unmounts on drop.
struct Mounted(tempfile::TempDir);

impl Mounted {
    fn new(image: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some(image),
            dir.path(),
            Some("erofs"),
            nix::mount::MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .expect("mounting a file-backed erofs image needs root and Linux 6.12+");
        Self(dir)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount(self.0.path());
    }
}

/// Packs the sample tree at `root` and checks the mounted image shows the same tree.
fn packs_as_the_same_tree(root: &Path, image: &Path) {
    sample_tree(root);
    let packed = pack(root, image, &AtomicBool::new(false), |_| Ok(())).unwrap();
    assert_eq!(packed, Packed::Done);
    let mounted = Mounted::new(image);
    let (want, got) = (describe(root), describe(mounted.0.path()));
    assert_eq!(want.len(), 600 + 16, "{want:#?}");
    for (path, line) in &want {
        assert_eq!(got.get(path), Some(line), "{path:?}");
    }
    assert_eq!(got.len(), want.len());
}

#[test]
fn a_packed_tree_mounts_as_the_same_tree() {
    // Tree and image on one file system: the data is copied in the kernel.
    let dir = tempfile::tempdir().unwrap();
    packs_as_the_same_tree(&dir.path().join("root"), &dir.path().join("img.erofs"));
}

#[test]
fn a_tree_on_another_file_system_is_copied_through_a_buffer_alike() {
    // As from containerd's overlay to the state dir: copy_file_range says EXDEV.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64m"),
    )
    .expect("mounting a tmpfs needs root");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = nix::mount::umount(self.0);
        }
    }
    let _unmount = Unmount(&root);
    packs_as_the_same_tree(&root, &dir.path().join("img.erofs"));
}

#[test]
fn a_tree_erofs_cannot_hold_as_it_is_is_left_to_mkfs_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("f"), b"x").unwrap();
    // An xattr name that is not UTF-8 (the kernel takes any bytes).
    sys::xattr::set(&root.join("f"), b"user.\xff", b"v").unwrap();
    let image = dir.path().join("img.erofs");
    let packed = pack(&root, &image, &AtomicBool::new(false), |_| Ok(())).unwrap();
    assert!(matches!(packed, Packed::Unsupported(_)), "{packed:?}");
    assert!(!image.exists());
}

#[test]
fn a_cancelled_pack_and_a_refused_size_leave_no_image() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    sample_tree(&root);
    let image = dir.path().join("img.erofs");
    let packed = pack(&root, &image, &AtomicBool::new(true), |_| Ok(())).unwrap();
    assert_eq!(packed, Packed::Cancelled);
    assert!(!image.exists());
    let refused = pack(&root, &image, &AtomicBool::new(false), |bytes| {
        // The data alone is over 3 MiB.
        assert!(bytes > 3 << 20, "{bytes}");
        Err(ErofsError::NoRoom {
            source_dir: root.clone(),
            dir: dir.path().to_path_buf(),
            needed_mib: bytes >> 20,
            free_mib: 0,
        })
    });
    assert!(matches!(refused, Err(ErofsError::NoRoom { .. })));
    assert!(!image.exists());
}

#[test]
fn an_unreadable_tree_is_a_clear_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img.erofs");
    let err = pack(
        Path::new("/nonexistent/rootfs"),
        &image,
        &AtomicBool::new(false),
        |_| Ok(()),
    )
    .unwrap_err();
    assert!(matches!(err, ErofsError::ReadTree { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/rootfs"), "{err}");
    assert!(!image.exists());
}

#[test]
fn a_tree_nested_deeper_than_paths_can_name_is_left_to_mkfs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    // 30 levels of 200-byte names: 6 KiB of path, over PATH_MAX (4096). No one path
    // names the deepest level, so two chains of 15 are made and one moved under the other.
    let chain = |top: &Path| -> PathBuf {
        (0..15).fold(top.to_path_buf(), |p, i| p.join(format!("{i:0200}")))
    };
    let (upper, lower) = (chain(&root), chain(&dir.path().join("lower")));
    std::fs::create_dir_all(&upper).unwrap();
    std::fs::create_dir_all(&lower).unwrap();
    std::fs::write(lower.join("f"), b"x").unwrap();
    let lower_top = dir.path().join("lower").join(format!("{:0200}", 0));
    std::fs::rename(&lower_top, upper.join("moved")).unwrap();
    let image = dir.path().join("img.erofs");
    let packed = pack(&root, &image, &AtomicBool::new(false), |_| Ok(())).unwrap();
    assert!(
        matches!(&packed, Packed::Unsupported(why) if why.contains("PATH_MAX")),
        "{packed:?}"
    );
    assert!(!image.exists());
    // Removing it needs the same trick.
    let _ = std::process::Command::new("rm")
        .arg("-rf")
        .arg(&root)
        .status();
}
