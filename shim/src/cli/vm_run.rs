//! `spry vm run`: boot a VM, run one container in it, stream its stdio, return its exit code.

use std::path::PathBuf;
use std::time::Duration;

use spry_proto::agent as pb;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use super::spec::{container_spec, ProcessOptions};
use super::stdio::{copy_output, copy_stdin, terminal_size, RawTerminal};
use super::VmRunArgs;
use crate::agent_client::{AgentError, OutputStream, ProcessId};
use crate::config::{Config, ConfigError, VmSettings};
use crate::host::Host;
use crate::rootfs::RootfsSource;
use crate::sandbox::{PodVm, Sandbox, SandboxError, SandboxIdentity};
use crate::template::start_sandbox;
use crate::vm::{VmConfig, VmExit};

const CONTAINER_ID: &str = "main";

/// Why `spry vm run` could not report an exit code of the user's command.
#[derive(Debug, thiserror::Error)]
pub enum VmRunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("rootfs {path} does not exist or is not a directory")]
    Rootfs { path: PathBuf },
    #[error(transparent)]
    GuestAsset(#[from] MissingGuestAsset),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("lost the container's process")]
    Process(#[source] AgentError),
    #[error("the VM died while the container ran ({exit}); console tail:\n{console_tail}")]
    VmDied { exit: String, console_tail: String },
}

/// A guest kernel or initramfs that is not there.
#[derive(Debug, thiserror::Error)]
#[error(
    "guest {what} {path} does not exist: build the guest with `scripts/build-guest.sh` and \
     install it with `spry install`, run the `spry` of that checkout (it finds \
     build/guest/current), or pass --kernel and --initramfs"
)]
pub struct MissingGuestAsset {
    what: &'static str,
    path: PathBuf,
}

/// Runs the command and returns the container's exit code.
pub async fn run_vm(config_path: &std::path::Path, args: VmRunArgs) -> Result<i32, VmRunError> {
    let config = Config::load(config_path)?;
    // Checked here, before a VM is booted for nothing.
    if !args.rootfs.is_dir() {
        return Err(VmRunError::Rootfs { path: args.rootfs });
    }
    let id = format!("vm-run-{}", std::process::id());
    let host = Host::new(config);
    let base = host.vm_config(&id);
    let (kernel, initramfs) = guest_assets(&args, &base)?;
    let vm_config = VmConfig {
        kernel,
        initramfs,
        cpus: args.cpus.unwrap_or(base.cpus),
        memory_mib: args.memory.unwrap_or(base.memory_mib),
        accel: args.accel.map(Into::into).unwrap_or(base.accel),
        ..base
    };
    let identity = SandboxIdentity {
        hostname: args.hostname.clone().unwrap_or_else(|| "spry".into()),
        ..Default::default()
    };
    // Same start path as pods: from the template unless the config says `template = "off"`.
    let make_share = host.rootfs_share_factory(&id);
    let request = host.launch_request(vm_config, identity);
    let launch = start_sandbox(request, &make_share).await?;
    let sandbox = launch.sandbox;
    let result = run_container(&sandbox, &args).await;
    if let Err(e) = sandbox.remove_container(CONTAINER_ID).await {
        if sandbox.is_running() {
            warn!(error = %e, "cannot remove the container");
        }
    }
    if let Err(e) = sandbox.shutdown(Duration::from_secs(10)).await {
        warn!(error = %e, "VM did not shut down cleanly");
    }
    result
}

/// The kernel and initramfs to boot: the flags', else the config's; when those are the
/// installed defaults and absent, the guest built in the checkout this `spry` was built in
/// (`<repo>/target/<profile>/spry` → `<repo>/build/guest/current`).
fn guest_assets(
    args: &VmRunArgs,
    base: &VmConfig,
) -> Result<(PathBuf, PathBuf), MissingGuestAsset> {
    let defaults = VmSettings::default();
    let mut kernel = args.kernel.clone().unwrap_or(base.kernel.clone());
    let mut initramfs = args.initramfs.clone().unwrap_or(base.initramfs.clone());
    let installed_defaults = kernel == defaults.kernel && initramfs == defaults.initramfs;
    if installed_defaults && !kernel.is_file() {
        if let Some(dir) = checkout_guest_dir() {
            info!(dir = %dir.display(), "no installed guest; using the checkout's");
            kernel = dir.join("vmlinux");
            initramfs = dir.join("initramfs.img");
        }
    }
    for (what, path) in [("kernel", &kernel), ("initramfs", &initramfs)] {
        if !path.is_file() {
            return Err(MissingGuestAsset {
                what,
                path: path.clone(),
            });
        }
    }
    Ok((kernel, initramfs))
}

fn checkout_guest_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    // target/<profile>/spry or target/<triple>/<profile>/spry
    exe.ancestors().skip(2).take(3).find_map(|repo| {
        let dir = repo.join("build/guest/current");
        (dir.join("vmlinux").is_file() && dir.join("initramfs.img").is_file()).then_some(dir)
    })
}

async fn run_container(sandbox: &Sandbox, args: &VmRunArgs) -> Result<i32, VmRunError> {
    let interactive = args.interactive || args.tty;
    let opts = ProcessOptions {
        args: args.command.clone(),
        env: args.env.clone(),
        cwd: args.cwd.clone(),
        hostname: args.hostname.clone(),
        terminal: args.tty,
        memory_limit: args.container_memory.map(|mib| i64::from(mib) << 20),
    };
    let (rows, cols) = terminal_size().unwrap_or((24, 80));
    let stdio = pb::StdioConfig {
        terminal: args.tty,
        stdin: interactive,
        rows,
        cols,
        ..Default::default()
    };
    sandbox
        .create_container(
            CONTAINER_ID,
            &container_spec(&opts),
            &RootfsSource::Directory(args.rootfs.clone()),
            stdio,
            crate::volumes::GuestVolumes::default(),
        )
        .await?;
    let agent = sandbox.agent().clone();
    let process = ProcessId::init(CONTAINER_ID);
    let stdout = tokio::spawn(copy_output(
        agent.clone(),
        process.clone(),
        OutputStream::Stdout,
        tokio::io::stdout(),
    ));
    let stderr = (!args.tty).then(|| {
        tokio::spawn(copy_output(
            agent.clone(),
            process.clone(),
            OutputStream::Stderr,
            tokio::io::stderr(),
        ))
    });
    sandbox.start_container(CONTAINER_ID).await?;
    let _raw = args.tty.then(RawTerminal::enter).flatten();
    let stdin = interactive.then(|| tokio::spawn(copy_stdin(agent.clone(), process.clone())));

    let mut vm_exit = sandbox.exit_watch();
    let mut sigint = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let mut sigterm = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut sigwinch = signal(SignalKind::window_change()).expect("install SIGWINCH handler");
    let wait = agent.wait_process(&process);
    tokio::pin!(wait);
    let status = loop {
        tokio::select! {
            status = &mut wait => break status.map_err(VmRunError::Process)?,
            exit = vm_exit.wait_for(|e| e.is_some()) => {
                let exit = exit.ok().and_then(|e| e.clone()).unwrap_or(VmExit { code: None, signal: None, console_tail: String::new() });
                return Err(VmRunError::VmDied { exit: exit.to_string(), console_tail: exit.console_tail.clone() });
            }
            _ = sigint.recv() => forward(&agent, &process, libc::SIGINT).await,
            _ = sigterm.recv() => forward(&agent, &process, libc::SIGTERM).await,
            _ = sigwinch.recv() => {
                if let Some((rows, cols)) = terminal_size() {
                    let _ = agent.resize_tty(&process, rows, cols).await;
                }
            }
        }
    };
    // Output written just before exit is still in flight: drain it before returning.
    let drain = async {
        let _ = stdout.await;
        if let Some(stderr) = stderr {
            let _ = stderr.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        warn!("output did not reach end of stream within 5 s after exit");
    }
    if let Some(stdin) = stdin {
        stdin.abort();
    }
    Ok(status.exit_code as i32)
}

async fn forward(agent: &crate::agent_client::AgentClient, process: &ProcessId, sig: i32) {
    if let Err(e) = agent.signal_process(process, sig as u32, false).await {
        warn!(signal = sig, error = %e, "cannot forward signal to the container");
    }
}
