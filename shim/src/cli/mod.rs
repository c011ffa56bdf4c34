//! The `spry` command line. `bin/spry.rs` only parses arguments and sets up logging.

mod install;
mod pool;
mod spec;
mod stdio;
mod template;
mod upgrade;
mod vm_run;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use install::{
    run_assets_build, run_install, run_uninstall, AssetsBuildArgs, InstallArgs, InstallCommandError,
};
pub use pool::{run_pool, PoolCommand, PoolCommandError};
pub use spec::{container_spec, ProcessOptions};
pub use template::{run_template, TemplateCommand, TemplateCommandError};
pub use upgrade::{run_upgrade, UpgradeArgs, UpgradeCommandError};
pub use vm_run::{run_vm, VmRunError};

use crate::config::DEFAULT_CONFIG_PATH;
use crate::vm::AccelChoice;

/// Spry: sandboxed, fast-start pods for containerd.
#[derive(Debug, Parser)]
#[command(name = "spry", version)]
pub struct Cli {
    /// Config file.
    #[arg(long, global = true, env = "SPRY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with microVMs directly (debugging).
    #[command(subcommand)]
    Vm(VmCommand),
    /// Install Spry on this node: binaries, guest assets, containerd's runtime handler;
    /// prints the RuntimeClass manifest.
    Install(InstallArgs),
    /// Remove what `spry install` added (Spry's own config file is kept).
    Uninstall(InstallArgs),
    /// Build guest assets.
    #[command(subcommand)]
    Assets(AssetsCommand),
    /// Manage the VM templates pods are restored from.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Manage the warm pool of VMs restored ahead of pods (`[pool] size`).
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Convert an image to eStargz and push it (runs `spry-snapshotter convert`).
    #[command(disable_help_flag = true)]
    Convert {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Prefetch an image into the node's lazy-pull cache (runs `spry-snapshotter warm`).
    #[command(disable_help_flag = true)]
    Warm {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Swap a running container to a new image in place, through containerd's CRI: pull
    /// while it serves, create the new container, stop the old, start the new, wait until
    /// ready, roll back if it is not. Exit codes: 0 upgraded, 1 runtime failure, 2 bad
    /// input, 3 image unavailable (nothing changed), 4 rolled back, 5 rollback failed.
    Upgrade(UpgradeArgs),
    /// Serve a pod's file share to its VM (started by the shim, one per pod).
    #[command(hide = true)]
    FsServe(FsServeArgs),
}

#[derive(Debug, Args)]
pub struct FsServeArgs {
    /// The share directory (the shim binds the pod's host volumes under it).
    #[arg(long)]
    pub dir: PathBuf,
    /// The unix socket QEMU serves the VM's `spry.fs` port on.
    #[arg(long)]
    pub socket: PathBuf,
    /// An inherited socket on which the shim sends the pod's volumes to attach.
    #[arg(long)]
    pub control_fd: Option<i32>,
}

/// `spry-snapshotter`: next to this binary (both install to one bin dir), else on PATH.
pub fn snapshotter_program() -> PathBuf {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("spry-snapshotter")));
    sibling
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "spry-snapshotter".into())
}

/// `spry fs-serve`: prints the ready line on stdout once it serves.
pub fn run_fs_serve(args: &FsServeArgs) -> Result<(), crate::volumes::server::ServerError> {
    use std::io::Write;
    let control = args
        .control_fd
        .map(crate::sys::take_inherited_socket)
        .transpose()
        .map_err(crate::volumes::server::ServerError::Control)?;
    crate::volumes::server::serve(&args.dir, &args.socket, control, || {
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "{}", crate::volumes::READY_LINE);
        let _ = stdout.flush();
    })
}

#[derive(Debug, Subcommand)]
pub enum AssetsCommand {
    /// Build the guest kernel and initramfs (content-addressed, reproducible).
    Build(AssetsBuildArgs),
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a VM, run CMD in a container on ROOTFS, stream its stdio, exit with its code.
    Run(VmRunArgs),
}

#[derive(Debug, Args)]
pub struct VmRunArgs {
    /// Directory holding the container's root filesystem.
    #[arg(long)]
    pub rootfs: PathBuf,
    /// VM memory in MiB (default from the config file).
    #[arg(long)]
    pub memory: Option<u32>,
    /// VM vCPUs (default from the config file).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Give the process a terminal (implies --interactive).
    #[arg(short, long)]
    pub tty: bool,
    /// Keep stdin open and pass it to the process.
    #[arg(short, long)]
    pub interactive: bool,
    /// Extra environment variable, KEY=VALUE (repeatable).
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    /// Working directory of the process.
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// Hostname of the container.
    #[arg(long)]
    pub hostname: Option<String>,
    /// Memory limit of the container's cgroup, MiB.
    #[arg(long)]
    pub container_memory: Option<u32>,
    /// Override the configured accelerator.
    #[arg(long, value_enum)]
    pub accel: Option<AccelArg>,
    /// Override the configured guest kernel.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Override the configured guest initramfs.
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    /// Command and arguments to run.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

impl From<AccelArg> for AccelChoice {
    fn from(a: AccelArg) -> Self {
        match a {
            AccelArg::Auto => AccelChoice::Auto,
            AccelArg::Kvm => AccelChoice::Kvm,
            AccelArg::Tcg => AccelChoice::Tcg,
        }
    }
}
