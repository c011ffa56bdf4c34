//! `spry install`, `spry uninstall` and `spry assets build`.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::assets::{build_guest_assets, AssetsError, GuestAssetsConfig, KernelSource};
use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use crate::install::{
    drop_unused_layer_images, install, runtime_class, snapshotter, stop_pool, uninstall_into,
    InstallError, InstallOptions, Report,
};

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// containerd's config file to patch (created when missing).
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    pub containerd_config: PathBuf,
    /// Install prefix: binaries in PREFIX/bin, guest assets in PREFIX/share/spry/guest.
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Guest assets to install (from scripts/build-guest.sh).
    #[arg(long, default_value = "build/guest/current")]
    pub guest_dir: PathBuf,
    /// Spry's config file (written with defaults only when absent).
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    pub spry_config: PathBuf,
    /// The containerd binary that reads --containerd-config (default: the running daemon
    /// reading it, else `containerd` on PATH); its version is checked (2.x needed).
    #[arg(long)]
    pub containerd_bin: Option<PathBuf>,
    /// Install even if containerd is older than 2.0 (its pods would fail).
    #[arg(long)]
    pub force: bool,
    /// Also install spry-snapshotter (lazy pulling) as a systemd service, register it with
    /// containerd and make it the snapshotter of the `spry` handler.
    #[arg(long)]
    pub snapshotter: bool,
    /// spry-snapshotter's config file (written with defaults, `vm_images = true`, only when
    /// absent).
    #[arg(long, default_value = snapshotter::DEFAULT_CONFIG)]
    pub snapshotter_config: PathBuf,
    /// Where spry-snapshotter's systemd unit goes.
    #[arg(long, default_value = snapshotter::DEFAULT_SYSTEMD_DIR)]
    pub systemd_dir: PathBuf,
    /// Print what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct AssetsBuildArgs {
    /// The static agent binary that becomes /init.
    #[arg(long)]
    pub agent: PathBuf,
    /// Output directory (a per-input-hash build dir plus a `current` link).
    #[arg(long, default_value = "build/guest")]
    pub output: PathBuf,
    /// Use this kernel .deb instead of fetching the pinned one.
    #[arg(long)]
    pub kernel_deb: Option<PathBuf>,
}

/// Why an install command failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallCommandError {
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Assets(#[from] AssetsError),
    #[error("cannot find the running spry binary")]
    CurrentExe(#[source] std::io::Error),
}

fn options(args: &InstallArgs) -> Result<InstallOptions, InstallCommandError> {
    let exe = std::env::current_exe().map_err(InstallCommandError::CurrentExe)?;
    Ok(InstallOptions {
        binaries_from: exe.parent().unwrap_or(Path::new("/")).to_path_buf(),
        containerd_config: args.containerd_config.clone(),
        prefix: args.prefix.clone(),
        guest_dir: args.guest_dir.clone(),
        spry_config: args.spry_config.clone(),
        containerd_bin: args.containerd_bin.clone(),
        force: args.force,
        with_snapshotter: args.snapshotter,
        snapshotter: snapshotter::SnapshotterOptions {
            config: args.snapshotter_config.clone(),
            systemd_dir: args.systemd_dir.clone(),
            systemctl: snapshotter::systemd_manages(&args.systemd_dir),
        },
        dry_run: args.dry_run,
    })
}

fn print_report(report: &Report, dry_run: bool) {
    for note in &report.notes {
        eprintln!("spry: {note}");
    }
    let verb = if dry_run { "would" } else { "did" };
    for action in &report.actions {
        eprintln!("spry: {verb} {action}");
    }
    if report.containerd_config_changed && !dry_run {
        eprintln!("spry: restart containerd to load the new runtime handler");
    }
}

/// Installs, then prints the RuntimeClass manifest on stdout (for `kubectl apply -f -`).
pub fn run_install(args: &InstallArgs) -> Result<(), InstallCommandError> {
    let report = install(&options(args)?)?;
    print_report(&report, args.dry_run);
    let config = if args.dry_run || !args.spry_config.exists() {
        Config::default()
    } else {
        Config::load(&args.spry_config)?
    };
    print!("{}", runtime_class(&config));
    Ok(())
}

/// Ends the warm pool (its spare shims run the binaries about to go) and deletes the
/// layer images kept for containers to come, then uninstalls.
pub async fn run_uninstall(args: &InstallArgs) -> Result<(), InstallCommandError> {
    let opts = options(args)?;
    let mut report = Report::default();
    stop_pool(&opts.spry_config, opts.dry_run, &mut report).await?;
    drop_unused_layer_images(&opts.spry_config, opts.dry_run, &mut report)?;
    let report = uninstall_into(&opts, report)?;
    print_report(&report, args.dry_run);
    Ok(())
}

pub fn run_assets_build(args: &AssetsBuildArgs) -> Result<(), InstallCommandError> {
    let mut config = GuestAssetsConfig::new(&args.output, &args.agent);
    if let Some(deb) = &args.kernel_deb {
        config.kernel = KernelSource::Deb(deb.clone());
    }
    let assets = build_guest_assets(&config)?;
    println!("vmlinux:   {}", assets.vmlinux.display());
    println!("initramfs: {}", assets.initramfs.display());
    Ok(())
}
