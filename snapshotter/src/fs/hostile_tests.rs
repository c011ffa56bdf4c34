//! A hostile image's layer on a real FUSE mount, checked as an attacker would probe it:
//! setuid binaries and device nodes are inert on the layer mount, `trusted.*` xattrs from
//! the image do not steer overlayfs, and huge directories list in one pass. Needs root and
//! /dev/fuse, and fails (never skips) without them.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::cache::ChunkCache;
use crate::layer::RetryPolicy;
use crate::testutil::{convert, MemBlob, MountedLayer};

fn require_root_and_fuse() {
    assert!(nix::unistd::geteuid().is_root(), "FUSE tests need root");
    assert!(Path::new("/dev/fuse").exists(), "FUSE tests need /dev/fuse");
}

fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(0);
    h
}

/// What an attacker's image carries.
fn hostile_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let xattr = |b: &mut tar::Builder<Vec<u8>>, name: &str, value: &[u8]| {
        let key = format!("SCHILY.xattr.{name}");
        b.append_pax_extensions([(key.as_str(), value)]).unwrap();
    };
    // An opaque marker that would hide the lower layer's etc/, and a redirect that would
    // make dst/ show src/'s contents.
    xattr(&mut b, "trusted.overlay.opaque", b"y");
    b.append_data(
        &mut header(tar::EntryType::Directory, 0o755),
        "etc/",
        std::io::empty(),
    )
    .unwrap();
    xattr(&mut b, "trusted.overlay.redirect", b"/src");
    b.append_data(
        &mut header(tar::EntryType::Directory, 0o755),
        "dst/",
        std::io::empty(),
    )
    .unwrap();
    xattr(&mut b, "user.origin", b"image");
    let mut h = header(tar::EntryType::Regular, 0o4755);
    let payload = b"#!/bin/sh\nid -u\n";
    h.set_size(payload.len() as u64);
    b.append_data(&mut h, "bin/su", &payload[..]).unwrap();
    // /dev/mem, to read the host's memory through the layer mount.
    let mut h = header(tar::EntryType::Char, 0o666);
    h.set_device_major(1).unwrap();
    h.set_device_minor(1).unwrap();
    b.append_data(&mut h, "dev/mem", std::io::empty()).unwrap();
    // A directory of many entries.
    for i in 0..3000 {
        b.append_data(
            &mut header(tar::EntryType::Regular, 0o644),
            format!("many/f{i:05}"),
            std::io::empty(),
        )
        .unwrap();
    }
    b.into_inner().unwrap()
}

fn mount_hostile() -> MountedLayer {
    require_root_and_fuse();
    let (blob, out) = convert(&hostile_tar(), &[]);
    MountedLayer::new(MemBlob::new(blob), &out.toc_digest, "hostile")
}

/// The per-mount options of the mount at `path`, from /proc/self/mountinfo.
fn mount_options(path: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(path))
        .unwrap_or_else(|| panic!("{path} is not mounted"));
    line.split(' ')
        .nth(5)
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect()
}

#[test]
fn setuid_bits_and_device_nodes_are_inert_on_the_layer_mount() {
    let h = mount_hostile();
    let options = mount_options(&h.mnt());
    for wanted in ["ro", "nosuid", "nodev"] {
        assert!(
            options.iter().any(|o| o == wanted),
            "{options:?} lacks {wanted}"
        );
    }
    // The image's metadata is shown as it is (a container's overlay needs it)...
    let su = std::fs::metadata(h.mnt().join("bin/su")).unwrap();
    assert_eq!(su.permissions().mode() & 0o7777, 0o4755);
    let mem = std::fs::symlink_metadata(h.mnt().join("dev/mem")).unwrap();
    assert_eq!(mem.rdev(), nix::sys::stat::makedev(1, 1));
    // ...but the device cannot be opened through this mount, not even by root.
    let err = std::fs::File::open(h.mnt().join("dev/mem")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
}

#[test]
fn image_xattrs_cannot_steer_overlayfs() {
    let h = mount_hostile();
    assert_eq!(
        crate::sys::getxattr(&h.mnt().join("etc"), OPAQUE_XATTR)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENODATA)
    );
    assert_eq!(
        crate::sys::getxattr(&h.mnt().join("bin/su"), "user.origin").unwrap(),
        b"image"
    );
    // Merged over a lower layer, as containerd would mount it for a container.
    let base = h.dir.path().join("base");
    std::fs::create_dir_all(base.join("etc")).unwrap();
    std::fs::create_dir_all(base.join("src")).unwrap();
    std::fs::write(base.join("etc/passwd"), b"root:x:0:0\n").unwrap();
    std::fs::write(base.join("src/secret"), b"secret").unwrap();
    let merged = h.dir.path().join("merged");
    crate::testutil::overlay_ro(&merged, &h.mnt(), &base, "redirect_dir=follow");
    let passwd = std::fs::read(merged.join("etc/passwd"));
    let redirected = merged.join("dst/secret").exists();
    nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert_eq!(
        passwd.unwrap(),
        b"root:x:0:0\n",
        "image hid a lower directory"
    );
    assert!(!redirected, "image redirected a directory to another path");
}

#[test]
fn a_large_directory_lists_every_entry_once() {
    let h = mount_hostile();
    let started = std::time::Instant::now();
    let mut names: Vec<String> = std::fs::read_dir(h.mnt().join("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let elapsed = started.elapsed();
    let count = names.len();
    names.sort();
    names.dedup();
    assert_eq!((count, names.len()), (3000, 3000));
    assert_eq!(names[0], "f00000");
    assert!(elapsed < Duration::from_secs(5), "listing took {elapsed:?}");
}

#[test]
fn a_frozen_registry_fails_a_read_within_the_deadline_then_at_once() {
    use crate::registry::{HostConfig, Reference, RegistryBlob, RegistryClient, RegistryConfig};
    use crate::testutil::registry::{Auth, MockRegistry};
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    require_root_and_fuse();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let reg = MockRegistry::start(runtime.handle(), Auth::None, false);
    let (blob, out, _, _) = crate::testutil::build(&[]);
    let digest = reg.put_blob(blob);
    let mut config = RegistryConfig::default();
    let settings = HostConfig {
        insecure: true,
        ..HostConfig::default()
    };
    config.hosts.insert(reg.host(), settings);
    // The request timeout alone would let one read wait 3 × 30 s.
    config.request_timeout_ms = 30_000;
    let client = Arc::new(RegistryClient::new(config).unwrap());
    let reference = Reference::parse(&format!("{}/spry/sample:1", reg.host())).unwrap();
    let fetcher = RegistryBlob::new(client, reference, digest, runtime.handle().clone());
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ChunkCache::open(&dir.path().join("cache")).unwrap());
    let retry = RetryPolicy {
        attempts: 3,
        backoff: Duration::from_millis(10),
        deadline: Duration::from_secs(1),
        cooldown: Duration::from_millis(1500),
    };
    let layer =
        Arc::new(RemoteLayer::open(Arc::new(fetcher), cache, &out.toc_digest, retry).unwrap());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mount = LayerMount::mount(layer, &mnt, "frozen", None).unwrap();

    reg.state.frozen.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let err = std::fs::read(mnt.join("usr/bin/big")).unwrap_err();
    let first = started.elapsed();
    let started = Instant::now();
    let again = std::fs::read(mnt.join("usr/bin/app")).unwrap_err();
    let second = started.elapsed();
    reg.state.frozen.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1600));
    let recovered = std::fs::read(mnt.join("usr/bin/app"));
    mount.unmount().unwrap();

    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        first < Duration::from_secs(3),
        "a read waited {first:?} on a frozen registry"
    );
    assert_eq!(again.raw_os_error(), Some(libc::EIO));
    assert!(
        second < Duration::from_millis(500),
        "the next read waited {second:?}"
    );
    assert_eq!(recovered.unwrap().len(), 2500, "reads did not recover");
}
