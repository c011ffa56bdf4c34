//! Mounts real FUSE filesystems: needs root and /dev/fuse, and fails
//! (never skips) without them.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::cache::ChunkCache;
use crate::layer::RetryPolicy;
use crate::testutil::{build, MemBlob, MountedLayer};

fn require_root_and_fuse() {
    assert!(nix::unistd::geteuid().is_root(), "FUSE tests need root");
    assert!(Path::new("/dev/fuse").exists(), "FUSE tests need /dev/fuse");
}

struct Mounted {
    layer: MountedLayer,
    mem: Arc<MemBlob>,
    files: Vec<(String, Vec<u8>)>,
}

fn mounted() -> Mounted {
    require_root_and_fuse();
    let (blob, out, _, files) = build(&[]);
    let mem = MemBlob::new(blob);
    let layer = MountedLayer::new(mem.clone(), &out.toc_digest, "test");
    Mounted { layer, mem, files }
}

impl Mounted {
    fn mnt(&self) -> PathBuf {
        self.layer.mnt()
    }
}

#[test]
fn files_links_and_metadata_read_back() {
    let m = mounted();
    let root = m.mnt();
    for (path, data) in &m.files {
        assert_eq!(&std::fs::read(root.join(path)).unwrap(), data, "{path}");
    }
    assert_eq!(
        std::fs::read_link(root.join("usr/bin/sh")).unwrap(),
        Path::new("app")
    );
    let app = std::fs::metadata(root.join("usr/bin/app")).unwrap();
    let app2 = std::fs::metadata(root.join("usr/bin/app2")).unwrap();
    assert_eq!(app.ino(), app2.ino());
    assert_eq!(app.nlink(), 2);
    assert_eq!(app.mode() & 0o7777, 0o644);
    assert_eq!(app.mtime(), 1_700_000_000);
    let mut names: Vec<String> = std::fs::read_dir(root.join("usr/bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["app", "app2", "big", "sh"]);
    assert!(
        std::fs::write(root.join("etc/hostname"), b"x").is_err(),
        "layer must be read-only"
    );
}

#[test]
fn whiteouts_are_presented_the_overlayfs_way() {
    let m = mounted();
    let root = m.mnt();
    let wh = std::fs::symlink_metadata(root.join("etc/removed")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    let opaque = xattr_get(&root.join("opq"), OPAQUE_XATTR);
    assert_eq!(opaque.as_deref(), Some(&b"y"[..]));
    assert!(!root.join("opq/.wh..wh..opq").exists());
}

#[test]
fn overlay_on_top_hides_whited_out_lower_files() {
    let m = mounted();
    let base = m.layer.dir.path().join("base");
    std::fs::create_dir_all(base.join("etc")).unwrap();
    std::fs::create_dir_all(base.join("opq")).unwrap();
    std::fs::write(base.join("etc/removed"), b"old").unwrap();
    std::fs::write(base.join("etc/kept"), b"kept").unwrap();
    std::fs::write(base.join("opq/hidden"), b"old").unwrap();
    let merged = m.layer.dir.path().join("merged");
    crate::testutil::overlay_ro(&merged, &m.mnt(), &base, "");
    let check = || -> Result<(), String> {
        if merged.join("etc/removed").exists() || merged.join("opq/hidden").exists() {
            return Err("whiteout did not hide a lower file".into());
        }
        if std::fs::read(merged.join("etc/kept")).ok().as_deref() != Some(&b"kept"[..]) {
            return Err("lower file lost".into());
        }
        if std::fs::read(merged.join("etc/hostname")).ok().as_deref() != Some(&b"spry\n"[..]) {
            return Err("lazy file not visible".into());
        }
        Ok(())
    };
    let result = check();
    nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH).unwrap();
    result.unwrap();
}

#[test]
fn unreachable_registry_gives_eio_then_recovers() {
    let m = mounted();
    m.mem.down.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let err = std::fs::read(m.mnt().join("usr/bin/big")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "read hung for {:?}",
        started.elapsed()
    );
    m.mem.down.store(false, Ordering::SeqCst);
    let data = &m.files.iter().find(|(p, _)| p == "usr/bin/big").unwrap().1;
    assert_eq!(&std::fs::read(m.mnt().join("usr/bin/big")).unwrap(), data);
}

fn xattr_get(path: &Path, name: &str) -> Option<Vec<u8>> {
    crate::sys::getxattr(path, name).ok()
}

#[test]
fn corrupted_chunk_gives_eio_never_wrong_bytes() {
    require_root_and_fuse();
    let (mut blob, out, _, _) = build(&[]);
    // Find usr/bin/big's 4th chunk and replace its member with valid gzip of zeros.
    let probe = MemBlob::new(blob.clone());
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ChunkCache::open(&dir.path().join("probe")).unwrap());
    let layer = RemoteLayer::open(probe, cache, &out.toc_digest, RetryPolicy::default()).unwrap();
    let big = layer
        .index()
        .entries
        .iter()
        .position(|e| e.name == "usr/bin/big")
        .unwrap();
    let chunk = layer.index().chunks[&big][3].clone();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, &vec![0u8; chunk.size as usize]).unwrap();
    let fake = enc.finish().unwrap();
    let at = chunk.compressed_offset as usize;
    blob[at..at + fake.len()].copy_from_slice(&fake);

    let mount =
        crate::testutil::mount_blob(MemBlob::new(blob), &out.toc_digest, dir.path(), "corrupt");
    let mnt = dir.path().join("mnt");
    let err = std::fs::read(mnt.join("usr/bin/big")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // Intact files of the same layer still read.
    assert_eq!(std::fs::read(mnt.join("etc/hostname")).unwrap(), b"spry\n");
    mount.unmount().unwrap();
}

#[test]
fn full_cache_disk_gives_enospc() {
    require_root_and_fuse();
    let (blob, out, _, _) = build(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    std::fs::create_dir(&cache_dir).unwrap();
    // A 16 KiB tmpfs: the 10 KB file's chunks do not all fit.
    nix::mount::mount(
        Some("tmpfs"),
        &cache_dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=16k"),
    )
    .unwrap();
    let result = std::panic::catch_unwind(|| {
        let cache = Arc::new(ChunkCache::open(&cache_dir).unwrap());
        let filler = vec![1u8; 12 * 1024];
        cache
            .insert(&crate::estargz::sha256_digest(&filler), &filler)
            .unwrap();
        let layer = crate::testutil::open_layer(MemBlob::new(blob), &out.toc_digest, cache);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mount = LayerMount::mount(layer, &mnt, "full", None).unwrap();
        let err = std::fs::read(mnt.join("usr/bin/big")).unwrap_err();
        mount.unmount().unwrap();
        err
    });
    nix::mount::umount2(&cache_dir, nix::mount::MntFlags::MNT_DETACH).unwrap();
    let err = result.unwrap();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
}
