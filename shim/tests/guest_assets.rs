//! The guest assets builder against the real pinned kernel package: output
//! layout, byte-identical rebuilds, reuse and repair. Needs apt access on the
//! first run (the package is cached in <repo>/build/guest/cache).

mod guest_support;

use std::path::Path;

use spry_shim::assets::vmlinux::pvh_entry;
use spry_shim::assets::{
    build_guest_assets, load_current, GuestAssetsConfig, KernelSource, CURRENT_LINK,
};

fn config(output: &Path, agent: &Path) -> GuestAssetsConfig {
    let mut config = GuestAssetsConfig::new(output, agent);
    // Share the one downloaded package between the test builds.
    config.kernel = KernelSource::Deb(guest_support::kernel_deb().path.clone());
    config
}

fn cpio_listing(image: &Path) -> String {
    let output = std::process::Command::new("cpio")
        .args(["-it", "--quiet", "-F"])
        .arg(image)
        .output()
        .expect("the test needs cpio (apt-get install cpio)");
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn builds_are_byte_identical_reused_and_repaired() {
    let agent = guest_support::busybox();
    let one = tempfile::tempdir().unwrap();
    let two = tempfile::tempdir().unwrap();

    let first = build_guest_assets(&config(one.path(), &agent)).unwrap();
    assert!(!first.reused);
    let manifest = &first.manifest;
    assert_eq!(manifest.kernel_package, "linux-image-6.1.0-56-cloud-amd64");
    assert_eq!(manifest.kernel_version, "6.1.192-2");
    assert_eq!(manifest.kernel_release, "6.1.0-56-cloud-amd64");
    assert_eq!(
        manifest.kernel_deb_sha256,
        guest_support::kernel_deb().sha256
    );
    assert_eq!(manifest.files.len(), 2);

    // The kernel is the PVH ELF, the initramfs has /init and the modules.
    let vmlinux = std::fs::read(&first.vmlinux).unwrap();
    assert!(pvh_entry(&vmlinux).unwrap() > 0);
    let listing = cpio_listing(&first.initramfs);
    for expected in [
        "init",
        "dev/console",
        "lib/modules/spry-modules.list",
        "tmp",
        "proc",
        "sys",
        "run",
        "etc",
    ] {
        assert!(
            listing.lines().any(|l| l == expected),
            "{expected} missing:\n{listing}"
        );
    }
    assert!(
        !listing.lines().any(|l| l.starts_with("bin")),
        "no shell in the guest:\n{listing}"
    );
    let position = |name: &str| {
        manifest
            .modules
            .iter()
            .position(|m| m.ends_with(name))
            .unwrap()
    };
    assert!(position("/virtio_ring.ko") < position("/virtio.ko"));
    assert!(position("/virtio.ko") < position("/virtio_scsi.ko"));
    assert!(position("/scsi_mod.ko") < position("/sd_mod.ko"));
    assert!(position("/libcrc32c.ko") < position("/erofs.ko"));
    assert!(position("/vsock.ko") < position("/vmw_vsock_virtio_transport.ko"));

    // The stable path scripts and tests use.
    let current = load_current(one.path()).unwrap();
    assert_eq!(current.manifest, first.manifest);
    assert!(one.path().join(CURRENT_LINK).join("vmlinux").exists());

    // Same inputs elsewhere: byte-identical files and the same key.
    let second = build_guest_assets(&config(two.path(), &agent)).unwrap();
    assert_eq!(second.manifest, first.manifest);
    for name in ["vmlinux", "initramfs.img", "manifest.json"] {
        let a = std::fs::read(first.dir.join(name)).unwrap();
        let b = std::fs::read(second.dir.join(name)).unwrap();
        assert!(a == b, "{name} differs between identical builds");
    }

    // Same inputs, same place: reused.
    let again = build_guest_assets(&config(one.path(), &agent)).unwrap();
    assert!(again.reused);
    assert_eq!(again.dir, first.dir);

    // A damaged build is rebuilt, not trusted.
    std::fs::write(first.dir.join("initramfs.img"), b"garbage").unwrap();
    assert!(load_current(one.path()).is_err());
    let repaired = build_guest_assets(&config(one.path(), &agent)).unwrap();
    assert!(!repaired.reused);
    assert_eq!(
        std::fs::read(&repaired.initramfs).unwrap(),
        std::fs::read(&second.initramfs).unwrap()
    );

    // Another agent: another key, and `current` follows.
    let other_agent = one.path().join("other-agent");
    std::fs::write(&other_agent, b"not really an agent").unwrap();
    let other = build_guest_assets(&config(one.path(), &other_agent)).unwrap();
    assert_ne!(other.manifest.cache_key, first.manifest.cache_key);
    assert_eq!(load_current(one.path()).unwrap().manifest, other.manifest);
}

#[test]
fn a_missing_agent_is_named() {
    let out = tempfile::tempdir().unwrap();
    let missing = out.path().join("no-such-agent");
    let error = build_guest_assets(&GuestAssetsConfig::new(out.path(), &missing)).unwrap_err();
    assert!(error.to_string().contains("no-such-agent"), "{error}");
}
