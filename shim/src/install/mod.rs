//! `spry install` / `spry uninstall`: put the binaries and guest assets in place, patch
//! containerd's config, and print the RuntimeClass. Non-interactive and idempotent, so
//! kubeadm-style node installers can run it as is.

mod config_file;
mod containerd_config;
mod containerd_version;
mod drain;
pub mod snapshotter;

use std::path::{Path, PathBuf};

pub use containerd_config::{
    add_handler, add_snapshotter, remove_handler, remove_snapshotter, ContainerdConfigError,
    HandlerSettings, HANDLER, RUNTIME_TYPE,
};
pub use containerd_version::{
    ContainerdSource, ContainerdVersion, ContainerdVersionError, FoundContainerd,
};

use crate::config::Config;

/// Binaries `spry install` copies (from the directory of the running `spry`).
pub const BINARIES: [&str; 2] = ["spry", "containerd-shim-spry-v2"];
/// Installed when built next to the others (`cargo build --release -p spry-snapshotter`);
/// `spry convert` / `spry warm` run it. It serves the `spry` handler's images only with
/// `--snapshotter` (see `snapshotter.rs`); runc pods keep containerd's default snapshotter.
pub const OPTIONAL_BINARIES: [&str; 1] = [snapshotter::SNAPSHOTTER_BINARY];
/// Guest asset files copied from the guest dir.
pub const GUEST_FILES: [&str; 3] = ["vmlinux", "initramfs.img", "manifest.json"];

/// Failure of install or uninstall.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path} is missing: {hint}")]
    Missing { path: PathBuf, hint: &'static str },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    ContainerdConfig(#[from] ContainerdConfigError),
    #[error(transparent)]
    ContainerdVersion(#[from] ContainerdVersionError),
    #[error("cannot run {program}")]
    Run {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the snapshotter config {path} is not usable: {reason}")]
    SnapshotterConfig { path: PathBuf, reason: String },
    #[error("systemctl {args} failed: {stderr}")]
    Systemctl { args: String, stderr: String },
    #[error("cannot read Spry's config")]
    SpryConfig(#[source] Box<crate::config::ConfigError>),
    #[error("cannot stop the warm pool")]
    Pool(#[source] Box<crate::pool::PoolError>),
}

/// Where things go.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// Where the built binaries are (the CLI passes the running `spry`'s directory).
    pub binaries_from: PathBuf,
    pub containerd_config: PathBuf,
    /// Binaries go to `<prefix>/bin`, guest assets to `<prefix>/share/spry/guest`.
    pub prefix: PathBuf,
    /// Guest assets to install (kernel, initramfs, manifest).
    pub guest_dir: PathBuf,
    /// Spry's own config; written (commented defaults) only when absent.
    pub spry_config: PathBuf,
    /// The containerd binary that reads `containerd_config`; found when None (see
    /// `containerd_version`).
    pub containerd_bin: Option<PathBuf>,
    /// Install even for a containerd that cannot drive the shim (1.x).
    pub force: bool,
    /// Install `spry-snapshotter` as the `spry` handler's snapshotter (install); the paths
    /// are also where uninstall looks for it.
    pub with_snapshotter: bool,
    pub snapshotter: snapshotter::SnapshotterOptions,
    pub dry_run: bool,
}

/// What install or uninstall did (or would do, with `dry_run`).
#[derive(Debug, Default)]
pub struct Report {
    /// What was found on the way (the containerd in use, warnings).
    pub notes: Vec<String>,
    pub actions: Vec<String>,
    /// Whether containerd's config changed (containerd must be restarted to see it).
    pub containerd_config_changed: bool,
}

impl InstallOptions {
    fn bin_dir(&self) -> PathBuf {
        self.prefix.join("bin")
    }

    fn guest_target(&self) -> PathBuf {
        self.prefix.join("share/spry/guest")
    }
}

pub fn install(opts: &InstallOptions) -> Result<Report, InstallError> {
    let mut report = Report::default();
    let exe_dir = opts.binaries_from.as_path();
    // Check every source first: a half-done install is worse than none.
    check_containerd(opts, &mut report)?;
    for bin in BINARIES {
        require(
            &exe_dir.join(bin),
            "build Spry first (cargo build --release)",
        )?;
    }
    for file in GUEST_FILES {
        require(
            &opts.guest_dir.join(file),
            "build the guest first (scripts/build-guest.sh) or pass --guest-dir",
        )?;
    }
    let snapshotter = if opts.with_snapshotter {
        Some(snapshotter::prepare(exe_dir, &opts.snapshotter)?)
    } else {
        None
    };
    // containerd's config is parsed and patched before anything is copied: a config
    // Spry cannot read stops the install with nothing changed.
    let current = read_or_empty(&config_file::target(&opts.containerd_config)?)?;
    let settings = HandlerSettings {
        shim_path: opts.bin_dir().join("containerd-shim-spry-v2"),
        spry_config: opts.spry_config.clone(),
    };
    let mut patched = add_handler(&current, &opts.containerd_config, &settings)?;
    if let Some(snapshotter) = &snapshotter {
        patched = add_snapshotter(
            &patched,
            &opts.containerd_config,
            snapshotter::SNAPSHOTTER_NAME,
            &snapshotter.socket,
        )?;
    }
    for bin in BINARIES {
        copy(
            &exe_dir.join(bin),
            &opts.bin_dir().join(bin),
            0o755,
            opts.dry_run,
            &mut report,
        )?;
    }
    for bin in OPTIONAL_BINARIES {
        let source = exe_dir.join(bin);
        if source.is_file() {
            copy(
                &source,
                &opts.bin_dir().join(bin),
                0o755,
                opts.dry_run,
                &mut report,
            )?;
        }
    }
    for file in GUEST_FILES {
        copy(
            &opts.guest_dir.join(file),
            &opts.guest_target().join(file),
            0o644,
            opts.dry_run,
            &mut report,
        )?;
    }
    if !opts.spry_config.exists() {
        let text = default_spry_config(&opts.guest_target());
        write(&opts.spry_config, &text, opts.dry_run, &mut report)?;
    }
    if let Some(settings) = &snapshotter {
        snapshotter::install_files(
            &opts.bin_dir(),
            &opts.snapshotter,
            settings,
            opts.dry_run,
            &mut report,
        )?;
    }
    if config_file::apply(opts, &current, &patched, &mut report)? {
        report.containerd_config_changed = true;
    } else {
        report.actions.push(format!(
            "{}: the spry handler is already configured",
            opts.containerd_config.display()
        ));
    }
    Ok(report)
}

/// Refuses a containerd that cannot drive the shim (unless forced); notes which one it is.
fn check_containerd(opts: &InstallOptions, report: &mut Report) -> Result<(), InstallError> {
    let found = containerd_version::find(opts.containerd_bin.as_deref(), &opts.containerd_config)?;
    let Some(found) = found else {
        let schema = read_or_empty(&opts.containerd_config)
            .ok()
            .and_then(|text| containerd_config::schema_version(&text));
        let hint = match schema {
            Some(3) => " (its config has `version = 3`, written for containerd 2.x)".to_string(),
            Some(v) => format!(" (its config has `version = {v}`; make sure it is containerd 2.x)"),
            None => " (make sure it is containerd 2.x)".to_string(),
        };
        report.notes.push(format!(
            "warning: no containerd found (no --containerd-bin, no running daemon reading {}, \
             none on PATH); Spry needs containerd 2.0 or newer{hint}",
            opts.containerd_config.display()
        ));
        return Ok(());
    };
    match containerd_version::check(&found) {
        Ok(()) => report
            .notes
            .push(format!("containerd {} ({})", found.version, found.source)),
        Err(err) if opts.force => report
            .notes
            .push(format!("warning: installing anyway (--force): {err}")),
        Err(err) => return Err(err.into()),
    }
    Ok(())
}

pub use drain::{drop_unused_layer_images, stop_pool};

/// Removes what install put in place. Run [`stop_pool`] first: spare shims run the
/// binaries removed here.
pub fn uninstall(opts: &InstallOptions) -> Result<Report, InstallError> {
    uninstall_into(opts, Report::default())
}

/// [`uninstall`], adding to `report`.
pub fn uninstall_into(opts: &InstallOptions, mut report: Report) -> Result<Report, InstallError> {
    let current = read_or_empty(&config_file::target(&opts.containerd_config)?)?;
    let patched = remove_handler(&current, &opts.containerd_config)?;
    let patched = remove_snapshotter(
        &patched,
        &opts.containerd_config,
        snapshotter::SNAPSHOTTER_NAME,
    )?;
    // The service goes before its binary.
    snapshotter::uninstall_files(&opts.snapshotter, opts.dry_run, &mut report)?;
    report.containerd_config_changed = config_file::apply(opts, &current, &patched, &mut report)?;
    let files = BINARIES
        .iter()
        .chain(OPTIONAL_BINARIES.iter())
        .map(|b| opts.bin_dir().join(b))
        .chain(GUEST_FILES.iter().map(|f| opts.guest_target().join(f)));
    for path in files.filter(|p| p.exists()) {
        report.actions.push(format!("remove {}", path.display()));
        if !opts.dry_run {
            std::fs::remove_file(&path).map_err(|source| InstallError::Write {
                path: path.clone(),
                source,
            })?;
        }
    }
    if !opts.dry_run {
        let _ = std::fs::remove_dir(opts.guest_target());
    }
    // Spry's own config is the admin's: kept, as packages keep conffiles on remove.
    Ok(report)
}

/// The RuntimeClass for Kubernetes. The overhead is the VM: its memory plus QEMU's own
/// (~64 MiB measured idle) plus, where VMs may run under TCG, the whole translated-code
/// cache (QEMU is in the pod's cgroup, so a pod with a memory limit must have room for
/// it), and a quarter CPU for QEMU threads.
pub fn runtime_class(config: &Config) -> String {
    let tcg_cache_mib = match (config.vm.accelerator, config.vm.tcg_cache_mib) {
        (crate::vm::AccelChoice::Kvm, _) => 0,
        (_, 0) => crate::config::QEMU_DEFAULT_TCG_CACHE_MIB,
        (_, mib) => mib,
    };
    let memory_mib = config.vm.memory_mib + 64 + tcg_cache_mib;
    format!(
        "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: {HANDLER}\nhandler: {HANDLER}\n\
         overhead:\n  podFixed:\n    memory: \"{memory_mib}Mi\"\n    cpu: \"250m\"\n"
    )
}

fn default_spry_config(guest: &Path) -> String {
    format!(
        "# Spry configuration (see README). Every key is optional; unknown keys are errors.\n\
         # log_level = \"info\"\n# state_dir = \"/run/spry\"\n\n[vm]\nkernel = \"{}\"\ninitramfs = \"{}\"\n\
         # qemu = \"/usr/bin/qemu-system-x86_64\"\n# accelerator = \"auto\"\n# cpus = 1\n# memory_mib = 256\n",
        guest.join("vmlinux").display(),
        guest.join("initramfs.img").display()
    )
}

fn require(path: &Path, hint: &'static str) -> Result<(), InstallError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(InstallError::Missing {
            path: path.to_path_buf(),
            hint,
        })
    }
}

fn read_or_empty(path: &Path) -> Result<String, InstallError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(InstallError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes through a temporary file and a rename, so a reader (or a running binary) never
/// sees a half-written file.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| InstallError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let tmp = path.with_extension("spry-tmp");
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn copy(
    from: &Path,
    to: &Path,
    mode: u32,
    dry_run: bool,
    report: &mut Report,
) -> Result<(), InstallError> {
    let bytes = std::fs::read(from).map_err(|source| InstallError::Read {
        path: from.to_path_buf(),
        source,
    })?;
    if std::fs::read(to).ok().as_deref() == Some(bytes.as_slice()) {
        return Ok(());
    }
    report
        .actions
        .push(format!("install {} -> {}", from.display(), to.display()));
    if dry_run {
        return Ok(());
    }
    write_atomically(to, &bytes, mode)
}

fn write(path: &Path, text: &str, dry_run: bool, report: &mut Report) -> Result<(), InstallError> {
    report.actions.push(format!("write {}", path.display()));
    if dry_run {
        return Ok(());
    }
    write_atomically(path, text.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests;
