//! When the mirror has dropped the pinned kernel build, the builder falls back
//! to what `linux-image-cloud-amd64` depends on now. apt is faked through
//! PATH, in a re-executed child of this test so that no other test sees it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use spry_shim::assets::kernel::{fetch_kernel_deb, PINNED_KERNEL_PACKAGE, PINNED_KERNEL_VERSION};

fn script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

const CHILD_ENV: &str = "SPRY_KERNEL_FALLBACK_CHILD";

#[test]
fn a_vanished_pinned_kernel_falls_back_to_the_meta_package_dependency() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return fallback_with_fake_apt();
    }
    let fake = tempfile::tempdir().unwrap();
    let pinned = format!("{PINNED_KERNEL_PACKAGE}={PINNED_KERNEL_VERSION}");
    // apt-get download: the pinned build is gone, anything else "downloads".
    script(
        fake.path(),
        "apt-get",
        &format!(
            r#"[ "$1" = download ] || exit 2
if [ "$2" = "{pinned}" ]; then echo "E: Version '{PINNED_KERNEL_VERSION}' was not found" >&2; exit 100; fi
name=${{2%%=*}}; version=${{2#*=}}
echo "fake deb of $2" > "${{name}}_${{version}}_amd64.deb""#
        ),
    );
    // apt-cache: the lists no longer know the pinned build; the meta package names another.
    script(
        fake.path(),
        "apt-cache",
        &format!(
            r#"if [ "$2" = "{pinned}" ]; then echo "E: No packages found" >&2; exit 100; fi
echo "Package: linux-image-cloud-amd64"
echo "Depends: linux-image-6.1.0-99-cloud-amd64 (= 6.1.300-1)"
echo "Description: Linux for cloud platforms (meta-package)""#
        ),
    );
    let path = format!(
        "{}:{}",
        fake.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_vanished_pinned_kernel_falls_back_to_the_meta_package_dependency",
        ])
        .args(["--nocapture", "--test-threads=1"])
        .env("PATH", path)
        .env(CHILD_ENV, fake.path())
        .status()
        .unwrap();
    assert!(status.success(), "the fake-apt child failed: {status}");
}

/// Runs in the child, with the fake apt first on PATH.
fn fallback_with_fake_apt() {
    let fake = std::path::PathBuf::from(std::env::var_os(CHILD_ENV).unwrap());
    let cache = tempfile::tempdir().unwrap();
    let deb = fetch_kernel_deb(cache.path()).unwrap();
    assert_eq!(deb.package, "linux-image-6.1.0-99-cloud-amd64");
    assert_eq!(deb.version, "6.1.300-1");
    assert_eq!(
        std::fs::read_to_string(&deb.path).unwrap(),
        "fake deb of linux-image-6.1.0-99-cloud-amd64=6.1.300-1\n"
    );
    assert_eq!(deb.sha256.len(), 64);
    assert!(deb.path.starts_with(cache.path().join("debs")));

    // A broken apt-cache leaves no fallback: a clear error, not a guess.
    script(
        &fake,
        "apt-cache",
        r#"case "$*" in *linux-image-cloud-amd64*) echo 'Package: linux-image-cloud-amd64' ;; *) exit 100 ;; esac"#,
    );
    let empty_cache = tempfile::tempdir().unwrap();
    let error = fetch_kernel_deb(empty_cache.path()).unwrap_err();
    assert!(
        error.to_string().contains("no kernel dependency"),
        "{error}"
    );

    // The lists know the pinned build but the download fails (offline, DNS): that is an
    // error naming the cause, never a silent switch to another kernel.
    script(
        &fake,
        "apt-cache",
        "echo 'Package: linux-image-6.1.0-56-cloud-amd64'",
    );
    script(
        &fake,
        "apt-get",
        "echo 'E: Failed to fetch http://deb.debian.org/...  Temporary failure resolving' >&2; exit 100",
    );
    let offline_cache = tempfile::tempdir().unwrap();
    let error = fetch_kernel_deb(offline_cache.path()).unwrap_err();
    let chain = spry_shim::error_chain(&error);
    assert!(
        chain.contains("could not be downloaded") && chain.contains("Temporary failure resolving"),
        "{chain}"
    );
    assert!(
        !offline_cache
            .path()
            .join("debs")
            .read_dir()
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".deb")),
        "a kernel was downloaded after all"
    );
}
