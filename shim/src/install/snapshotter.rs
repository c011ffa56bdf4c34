//! `spry install --snapshotter`: `spry-snapshotter` as a systemd service, registered with
//! containerd (`proxy_plugins`) and made the snapshotter of the `spry` handler, with its
//! layers also served as erofs images so Spry pods start lazily (`vm_images`).
//!
//! The snapshotter's own config is the admin's once written (registry hosts, credentials):
//! install writes it only when absent and otherwise asks `spry-snapshotter check-config`
//! for the socket containerd must dial, so the two never disagree.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{write, write_atomically, InstallError, Report};

/// containerd's name for the snapshotter (`proxy_plugins.spry`; `spry upgrade
/// --lazy-snapshotter` defaults to it).
pub const SNAPSHOTTER_NAME: &str = "spry";
pub const SNAPSHOTTER_BINARY: &str = "spry-snapshotter";
pub const UNIT_NAME: &str = "spry-snapshotter.service";
/// Where `spry-snapshotter` (and so `spry warm` / `spry convert`) reads its config by
/// default; `snapshotter/src/config.rs` names the same path.
pub const DEFAULT_CONFIG: &str = "/etc/spry/snapshotter.toml";
pub const DEFAULT_SYSTEMD_DIR: &str = "/etc/systemd/system";
const DEFAULT_SOCKET: &str = "/run/spry-snapshotter/snapshotter.sock";

/// Where the snapshotter's files go.
#[derive(Debug, Clone)]
pub struct SnapshotterOptions {
    /// Its config (written with defaults only when absent).
    pub config: PathBuf,
    /// Where its systemd unit goes.
    pub systemd_dir: PathBuf,
    /// Enable and start (or stop and disable) the service with `systemctl`: whether systemd
    /// runs this machine and reads the unit there ([`systemd_manages`]), false in tests.
    pub systemctl: bool,
}

impl SnapshotterOptions {
    pub fn unit_path(&self) -> PathBuf {
        self.systemd_dir.join(UNIT_NAME)
    }
}

/// What install needs of the snapshotter's config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct SnapshotterSettings {
    pub socket: PathBuf,
    pub vm_images: bool,
}

/// Checked before anything is written: the binary is built and its config (if any) is
/// one the snapshotter accepts.
pub fn prepare(
    binaries_from: &Path,
    opts: &SnapshotterOptions,
) -> Result<SnapshotterSettings, InstallError> {
    let binary = binaries_from.join(SNAPSHOTTER_BINARY);
    super::require(
        &binary,
        "build it first (cargo build --release -p spry-snapshotter)",
    )?;
    settings(&binary, opts)
}

/// After the binaries are in `bin_dir`: the config (when absent), the unit, and the service
/// enabled and started where systemd runs (else the command to start it is noted).
pub fn install_files(
    bin_dir: &Path,
    opts: &SnapshotterOptions,
    settings: &SnapshotterSettings,
    dry_run: bool,
    report: &mut Report,
) -> Result<(), InstallError> {
    if !opts.config.exists() {
        write(&opts.config, &default_config(), dry_run, report)?;
    }
    if !settings.vm_images {
        report.notes.push(format!(
            "warning: {} has `vm_images = false`: Spry pods will fetch whole images before \
             they start (runc pods still pull lazily); set it under [lazy] to start them lazily",
            opts.config.display()
        ));
    }
    let text = unit(&bin_dir.join(SNAPSHOTTER_BINARY), &opts.config);
    let unit_path = opts.unit_path();
    let unit_changed = std::fs::read_to_string(&unit_path).ok().as_deref() != Some(text.as_str());
    if unit_changed {
        report
            .actions
            .push(format!("write {}", unit_path.display()));
        if !dry_run {
            write_atomically(&unit_path, text.as_bytes(), 0o644)?;
        }
    }
    report.notes.push(format!(
        "kubelet passes a pod's RuntimeClass to image pulls only with the feature gate \
         RuntimeClassInImageCriApi=true; without it, images for Spry pods are pulled in full \
         and unpacked into the `{SNAPSHOTTER_NAME}` snapshotter on first use"
    ));
    if !opts.systemctl {
        report.notes.push(format!(
            "the service is not started (no systemd here, or a unit dir systemd does not \
             read): start the snapshotter before containerd with `{}` (it listens on {})",
            exec_start(&text).unwrap_or_default(),
            settings.socket.display()
        ));
        return Ok(());
    }
    if dry_run {
        report
            .actions
            .push(format!("run systemctl enable --now {UNIT_NAME}"));
        return Ok(());
    }
    if unit_changed {
        systemctl(&["daemon-reload"], report)?;
    }
    systemctl(&["enable", "--now", UNIT_NAME], report)
}

/// Stops and removes the service (its config and cache stay, as Spry's config does; layer
/// daemons serving running pods stay until those pods go).
pub fn uninstall_files(
    opts: &SnapshotterOptions,
    dry_run: bool,
    report: &mut Report,
) -> Result<(), InstallError> {
    let unit_path = opts.unit_path();
    if !unit_path.exists() {
        return Ok(());
    }
    let running = opts.systemctl;
    if running && !dry_run {
        systemctl(&["disable", "--now", UNIT_NAME], report)?;
    }
    report
        .actions
        .push(format!("remove {}", unit_path.display()));
    if !dry_run {
        std::fs::remove_file(&unit_path).map_err(|source| InstallError::Write {
            path: unit_path.clone(),
            source,
        })?;
        if running {
            systemctl(&["daemon-reload"], report)?;
        }
    }
    report.notes.push(format!(
        "kept {} and the snapshotter's state (its `root`); remove them by hand if unwanted",
        opts.config.display()
    ));
    Ok(())
}

/// The config a new install writes: defaults, with Spry's VMs served lazily.
pub fn default_config() -> String {
    format!(
        "# spry-snapshotter configuration (see snapshotter/README.md). Unknown keys are errors.\n\
         # root = \"/var/lib/spry-snapshotter\"\nsocket = \"{DEFAULT_SOCKET}\"\n\n[lazy]\n\
         # Give each layer an erofs image too: Spry pods attach it as a disk and fetch only\n\
         # what they read of a lazy layer; an unpacked layer's is built once it is pulled\n\
         # (false: the shim packs each container's layers when it creates it, which fetches\n\
         # the whole image before the pod starts).\nvm_images = true\n\n\
         # Registries that need settings (plain HTTP, a CA, credentials, a mirror):\n\
         # [registry.hosts.\"registry.local:5000\"]\n# insecure = true\n"
    )
}

/// The settings of the config at `opts.config`: the defaults a new install writes when it
/// is absent, else what `binary check-config` reads from it (a config the snapshotter
/// would refuse stops the install here).
pub fn settings(
    binary: &Path,
    opts: &SnapshotterOptions,
) -> Result<SnapshotterSettings, InstallError> {
    if !opts.config.exists() {
        return Ok(SnapshotterSettings {
            socket: DEFAULT_SOCKET.into(),
            vm_images: true,
        });
    }
    let out = Command::new(binary)
        .arg("--config")
        .arg(&opts.config)
        .arg("check-config")
        .env("RUST_BACKTRACE", "0")
        .output()
        .map_err(|source| InstallError::Run {
            program: binary.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(InstallError::SnapshotterConfig {
            path: opts.config.clone(),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| InstallError::SnapshotterConfig {
        path: opts.config.clone(),
        reason: format!(
            "`{} check-config` printed no settings: {e}",
            binary.display()
        ),
    })
}

/// The systemd unit. `KillMode=process`: stopping or restarting the snapshotter leaves its
/// per-layer FUSE daemons, which serve running pods' mounts and are adopted again on start.
pub fn unit(binary: &Path, config: &Path) -> String {
    format!(
        "[Unit]\nDescription=Spry lazy-pulling snapshotter (containerd proxy plugin \"{SNAPSHOTTER_NAME}\")\n\
         After=network-online.target local-fs.target\nWants=network-online.target\n\
         Before=containerd.service\n\n[Service]\nExecStart={} --config {} serve\n\
         Restart=always\nRestartSec=1\nKillMode=process\nLimitNOFILE=1048576\n\n\
         [Install]\nWantedBy=multi-user.target\n",
        binary.display(),
        config.display()
    )
}

/// The command line the unit runs, for a node without systemd.
pub fn exec_start(unit_text: &str) -> Option<&str> {
    unit_text.lines().find_map(|l| l.strip_prefix("ExecStart="))
}

/// systemd's system unit directories: a unit elsewhere (a test's, a staging dir) is only
/// written, never enabled.
const SYSTEM_UNIT_DIRS: [&str; 5] = [
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// Whether systemd manages this machine (`sd_booted`) and will find a unit in `dir`.
pub fn systemd_manages(dir: &Path) -> bool {
    Path::new("/run/systemd/system").is_dir()
        && SYSTEM_UNIT_DIRS.iter().any(|d| Path::new(d) == dir)
}

/// `systemctl ARGS`, failing with its stderr.
pub fn systemctl(args: &[&str], report: &mut Report) -> Result<(), InstallError> {
    report
        .actions
        .push(format!("run systemctl {}", args.join(" ")));
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .map_err(|source| InstallError::Run {
            program: "systemctl".into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(InstallError::Systemctl {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_runs_the_installed_binary_and_leaves_layer_daemons_on_stop() {
        let text = unit(
            Path::new("/usr/local/bin/spry-snapshotter"),
            Path::new("/etc/spry/snapshotter.toml"),
        );
        assert_eq!(
            exec_start(&text),
            Some("/usr/local/bin/spry-snapshotter --config /etc/spry/snapshotter.toml serve")
        );
        assert!(text.contains("KillMode=process") && text.contains("Before=containerd.service"));
    }

    #[test]
    fn the_default_config_serves_vm_images_on_the_default_socket() {
        let parsed: toml::Table = default_config().parse().unwrap();
        assert_eq!(parsed["socket"].as_str(), Some(DEFAULT_SOCKET));
        assert_eq!(parsed["lazy"]["vm_images"].as_bool(), Some(true));
    }
}
