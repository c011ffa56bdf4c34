//! Install and uninstall against stand-in binaries, guest assets and containerd.

use super::*;

/// Built binaries and guest assets (stand-ins) in `dir`, and install options into `dir`
/// with a stand-in containerd printing `containerd_version`.
fn fixture(dir: &Path, containerd_version: &str) -> InstallOptions {
    let guest = dir.join("guest");
    let built = dir.join("built");
    std::fs::create_dir(&guest).unwrap();
    std::fs::create_dir(&built).unwrap();
    for f in GUEST_FILES {
        std::fs::write(guest.join(f), f).unwrap();
    }
    for bin in BINARIES.iter().chain(&OPTIONAL_BINARIES) {
        std::fs::write(built.join(bin), bin).unwrap();
    }
    InstallOptions {
        binaries_from: built,
        containerd_config: dir.join("containerd.toml"),
        prefix: dir.join("prefix"),
        guest_dir: guest,
        spry_config: dir.join("spry/config.toml"),
        containerd_bin: Some(containerd_version::fake_containerd(dir, containerd_version)),
        force: false,
        with_snapshotter: false,
        snapshotter: snapshotter::SnapshotterOptions {
            config: dir.join("snapshotter.toml"),
            systemd_dir: dir.join("systemd"),
            systemctl: false,
        },
        dry_run: false,
    }
}

#[test]
fn install_is_idempotent_keeps_a_backup_and_uninstall_reverts() {
    let dir = tempfile::tempdir().unwrap();
    let opts = fixture(
        dir.path(),
        "containerd github.com/containerd/containerd/v2 v2.2.9 x",
    );
    let containerd_config = opts.containerd_config.clone();
    std::fs::write(&containerd_config, "version = 3\n# keep me\n").unwrap();
    let dry = install(&InstallOptions {
        dry_run: true,
        ..opts.clone()
    })
    .unwrap();
    assert!(dry.containerd_config_changed);
    assert!(
        dry.notes[0].starts_with("containerd 2.2.9 (binary "),
        "{:?}",
        dry.notes
    );
    assert_eq!(
        std::fs::read_to_string(&containerd_config).unwrap(),
        "version = 3\n# keep me\n"
    );
    assert!(!opts.prefix.exists(), "dry run wrote files");

    let first = install(&opts).unwrap();
    assert!(first.containerd_config_changed);
    let patched = std::fs::read_to_string(&containerd_config).unwrap();
    assert!(patched.contains("# keep me") && patched.contains(RUNTIME_TYPE));
    assert!(dir.path().join("containerd.toml.spry-backup").exists());
    assert!(opts.prefix.join("share/spry/guest/vmlinux").exists());
    assert!(opts.prefix.join("bin/spry-snapshotter").exists());
    Config::load(&opts.spry_config).expect("the written spry config is valid");

    let second = install(&opts).unwrap();
    assert!(!second.containerd_config_changed);
    assert_eq!(
        std::fs::read_to_string(&containerd_config).unwrap(),
        patched
    );

    uninstall(&opts).unwrap();
    let reverted = std::fs::read_to_string(&containerd_config).unwrap();
    assert!(!reverted.contains(RUNTIME_TYPE) && reverted.contains("# keep me"));
    assert!(!opts.prefix.join("bin/spry").exists());
    assert!(!opts.prefix.join("bin/spry-snapshotter").exists());
}

#[test]
fn a_containerd_config_spry_cannot_read_stops_the_install_before_any_copy() {
    let dir = tempfile::tempdir().unwrap();
    let opts = fixture(
        dir.path(),
        "containerd github.com/containerd/containerd/v2 v2.2.9 x",
    );
    std::fs::write(
        &opts.containerd_config,
        "version = 3
[plugins
",
    )
    .unwrap();
    assert!(install(&opts).is_err());
    assert!(!opts.prefix.exists(), "binaries were copied");
    assert_eq!(
        std::fs::read_to_string(&opts.containerd_config).unwrap(),
        "version = 3\n[plugins\n"
    );
}

#[test]
fn missing_guest_assets_fail_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let opts = InstallOptions {
        binaries_from: dir.path().join("no-binaries"),
        containerd_config: dir.path().join("containerd.toml"),
        prefix: dir.path().join("prefix"),
        guest_dir: dir.path().join("no-guest"),
        spry_config: dir.path().join("spry.toml"),
        containerd_bin: None,
        force: true,
        with_snapshotter: false,
        snapshotter: snapshotter::SnapshotterOptions {
            config: dir.path().join("snapshotter.toml"),
            systemd_dir: dir.path().join("systemd"),
            systemctl: false,
        },
        dry_run: false,
    };
    let err = install(&opts).unwrap_err();
    assert!(err.to_string().contains("no-binaries/spry"), "{err}");
    assert!(!opts.prefix.exists() && !opts.containerd_config.exists());
}

#[test]
fn a_1x_containerd_is_refused_before_anything_is_written_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let opts = fixture(
        dir.path(),
        "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1",
    );
    let err = install(&opts).unwrap_err();
    assert!(
        matches!(err, InstallError::ContainerdVersion(_)) && err.to_string().contains("1.6.20"),
        "{err}"
    );
    assert!(!opts.prefix.exists() && !opts.containerd_config.exists());
    let forced = install(&InstallOptions {
        force: true,
        ..opts.clone()
    })
    .unwrap();
    assert!(
        forced.notes[0].starts_with("warning: installing anyway (--force)"),
        "{:?}",
        forced.notes
    );
    assert!(opts.containerd_config.exists());
}

#[test]
fn runtime_class_names_the_handler_and_overhead() {
    let rc = runtime_class(&Config::default());
    // 256 MiB of guest RAM, 64 of QEMU's own, 256 of TCG code cache (auto may fall
    // back to TCG).
    assert!(
        rc.contains("handler: spry") && rc.contains("memory: \"576Mi\""),
        "{rc}"
    );
    let mut kvm = Config::default();
    kvm.vm.accelerator = crate::vm::AccelChoice::Kvm;
    assert!(runtime_class(&kvm).contains("memory: \"320Mi\""));
    kvm.vm.accelerator = crate::vm::AccelChoice::Tcg;
    kvm.vm.tcg_cache_mib = 0;
    assert!(runtime_class(&kvm).contains("memory: \"1344Mi\""));
}

/// [`fixture`] with a containerd 2.x and `--snapshotter`.
fn with_snapshotter(dir: &Path) -> InstallOptions {
    InstallOptions {
        with_snapshotter: true,
        ..fixture(
            dir,
            "containerd github.com/containerd/containerd/v2 v2.2.9 x",
        )
    }
}

/// A stand-in `spry-snapshotter` whose `check-config` prints `settings_json` (and fails
/// with `error` on stderr when given).
fn fake_snapshotter(opts: &InstallOptions, settings_json: &str, error: Option<&str>) {
    use std::os::unix::fs::PermissionsExt;
    let path = opts.binaries_from.join(snapshotter::SNAPSHOTTER_BINARY);
    let body = match error {
        Some(e) => format!("echo '{e}' >&2; exit 1"),
        None => format!("echo '{settings_json}'"),
    };
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn install_with_the_snapshotter_registers_it_for_the_handler_and_uninstall_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let opts = with_snapshotter(dir.path());
    fake_snapshotter(
        &opts,
        r#"{"root":"/var/lib/spry-snapshotter","socket":"/run/spry-snapshotter/snapshotter.sock","vm_images":true}"#,
        None,
    );
    let report = install(&opts).unwrap();
    // A new config: defaults, with VM images on.
    let written = std::fs::read_to_string(&opts.snapshotter.config).unwrap();
    assert_eq!(written, snapshotter::default_config());
    let unit = std::fs::read_to_string(opts.snapshotter.unit_path()).unwrap();
    let bin = opts.prefix.join("bin/spry-snapshotter");
    assert_eq!(
        snapshotter::exec_start(&unit),
        Some(
            format!(
                "{} --config {} serve",
                bin.display(),
                opts.snapshotter.config.display()
            )
            .as_str()
        )
    );
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("RuntimeClassInImageCriApi")),
        "{:?}",
        report.notes
    );
    let parsed: toml::Value =
        toml::from_str(&std::fs::read_to_string(&opts.containerd_config).unwrap()).unwrap();
    assert_eq!(
        parsed["proxy_plugins"]["spry"]["address"].as_str(),
        Some("/run/spry-snapshotter/snapshotter.sock")
    );
    let runtime =
        &parsed["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["spry"];
    assert_eq!(runtime["snapshotter"].as_str(), Some("spry"));
    assert_eq!(
        parsed["plugins"]["io.containerd.cri.v1.images"]["disable_snapshot_annotations"].as_bool(),
        Some(false)
    );
    let again = install(&opts).unwrap();
    assert!(!again.containerd_config_changed, "{:?}", again.actions);
    assert!(
        again
            .actions
            .iter()
            .all(|a| a.ends_with("the spry handler is already configured")),
        "{:?}",
        again.actions
    );

    // An admin's config is kept and its socket is what containerd dials.
    std::fs::write(&opts.snapshotter.config, "socket = \"/run/other.sock\"\n").unwrap();
    fake_snapshotter(
        &opts,
        r#"{"root":"/r","socket":"/run/other.sock","vm_images":false}"#,
        None,
    );
    let report = install(&opts).unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("vm_images = false")),
        "{:?}",
        report.notes
    );
    let text = std::fs::read_to_string(&opts.containerd_config).unwrap();
    assert!(text.contains("/run/other.sock"), "{text}");

    uninstall(&opts).unwrap();
    let text = std::fs::read_to_string(&opts.containerd_config).unwrap();
    assert!(
        !text.contains("proxy_plugins") && !text.contains(RUNTIME_TYPE),
        "{text}"
    );
    assert!(!opts.snapshotter.unit_path().exists());
    assert!(!bin.exists());
    assert!(
        opts.snapshotter.config.exists(),
        "the admin's config is kept"
    );
}

#[test]
fn a_snapshotter_config_the_snapshotter_refuses_stops_the_install_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let opts = with_snapshotter(dir.path());
    std::fs::write(&opts.snapshotter.config, "bogus = 1\n").unwrap();
    fake_snapshotter(
        &opts,
        "",
        Some("Error: config is invalid: unknown field `bogus`"),
    );
    let err = install(&opts).unwrap_err();
    assert!(
        matches!(err, InstallError::SnapshotterConfig { .. })
            && err.to_string().contains("unknown field `bogus`"),
        "{err}"
    );
    assert!(!opts.prefix.exists() && !opts.containerd_config.exists());
    assert!(!opts.snapshotter.unit_path().exists());
}
