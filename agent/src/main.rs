//! `spry-agent`: PID 1 of the pod VM, or `serve` on a unix socket for host tests.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use spry_agent::container::helper::{helper_main, HELPER_SUBCOMMAND};
use spry_agent::sandbox::SandboxOptions;
use spry_agent::server::{serve, AgentConfig, SHARED_FS_TAG};
use spry_agent::storage::SharedFs;
use spry_agent::{channel, init};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(version, about = "Spry's in-guest agent (PID 1 of the pod VM)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the agent API without PID-1 setup (host tests, debugging). Needs root.
    Serve {
        /// `unix:///path`, `vsock` or `virtio-serial`.
        #[arg(long)]
        listen: String,
        /// Directory that Rootfs `shared_path`s are relative to (instead of virtio-fs).
        #[arg(long)]
        shared_dir: Option<PathBuf>,
        /// The agent's runtime directory (containers, libcontainer state, resolv.conf).
        #[arg(long, default_value = "/run/spry")]
        run_dir: PathBuf,
        /// Let CreateSandbox set the system clock (off: it would change the host's clock).
        #[arg(long)]
        set_clock: bool,
        /// Log filter (tracing EnvFilter syntax).
        #[arg(long, default_value = "info")]
        log: String,
    },
}

fn log_to_stderr(filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

/// Logs to a close-on-exec duplicate of stderr. In the helper, libcontainer logs from the
/// container's init process after it has put the container's stdio on fds 0-2: writing to fd 2
/// would put libcontainer's logs into the container's stderr.
fn log_to_private_stderr(filter: &str) {
    use std::os::fd::AsFd;
    let Ok(log) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return;
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::sync::Mutex::new(std::fs::File::from(log)))
        .with_ansi(false)
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the async runtime")
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some(HELPER_SUBCOMMAND) {
        log_to_private_stderr(&std::env::var("SPRY_LOG").unwrap_or_else(|_| "info".into()));
        return ExitCode::from(helper_main() as u8);
    }
    if nix::unistd::getpid().as_raw() == 1 {
        run_as_pid1();
    }
    let cli = Cli::parse();
    match run_serve(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("spry-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_serve(command: Command) -> anyhow::Result<()> {
    let Command::Serve {
        listen,
        shared_dir,
        run_dir,
        set_clock,
        log,
    } = command;
    log_to_stderr(&log);
    std::env::set_var("SPRY_LOG", &log);
    // Orphaned container processes must come back to us, as they would to PID 1.
    nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
    let channel = channel::from_name(&listen)?;
    let shared = match shared_dir {
        Some(dir) => SharedFs::HostDir(dir),
        None => SharedFs::VirtioFs {
            tag: SHARED_FS_TAG.into(),
        },
    };
    let config = AgentConfig {
        run_dir,
        shared,
        sandbox: SandboxOptions {
            set_clock,
            own_network: false,
            pod_mounts: false,
            set_sysctls: false,
        },
        power_off_on_shutdown: false,
    };
    runtime()?.block_on(serve(channel, config))?;
    Ok(())
}

/// PID 1: set the VM up, serve forever; on a fatal error, power off (PID 1 must not exit).
fn run_as_pid1() -> ! {
    let early = init::make_root_pivotable().and_then(|()| init::mount_early_filesystems());
    let console = init::attach_console();
    let params = init::kernel_params().unwrap_or_default();
    log_to_stderr(&params.log);
    std::env::set_var("SPRY_LOG", &params.log);
    if let Err(err) = console {
        tracing::warn!(error = %spry_agent::error_chain(&err), "no console");
    }
    if let Err(err) = early {
        tracing::error!(error = %spry_agent::error_chain(&err), "early mounts failed");
        init::power_off();
    }
    init::load_modules();
    let failed = init::enable_cgroup_controllers(std::path::Path::new("/sys/fs/cgroup"));
    if !failed.is_empty() {
        tracing::warn!(?failed, "cgroup controllers not enabled");
    }
    let result = channel::from_name(&params.channel)
        .map_err(anyhow::Error::from)
        .and_then(|channel| {
            let config = AgentConfig {
                run_dir: "/run/spry".into(),
                shared: SharedFs::VirtioFs {
                    tag: SHARED_FS_TAG.into(),
                },
                sandbox: SandboxOptions {
                    set_clock: true,
                    own_network: true,
                    pod_mounts: true,
                    set_sysctls: true,
                },
                power_off_on_shutdown: true,
            };
            runtime()?.block_on(serve(channel, config))?;
            Ok(())
        });
    if let Err(err) = result {
        tracing::error!(error = format!("{err:#}"), "agent failed");
    }
    init::power_off();
}
