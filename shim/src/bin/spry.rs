//! `spry`: Spry's command line.
use clap::Parser;
use spry_shim::cli::{
    run_assets_build, run_fs_serve, run_install, run_pool, run_template, run_uninstall,
    run_upgrade, run_vm, AssetsCommand, Cli, Command, VmCommand,
};
use spry_shim::error_chain;

/// Runs `spry-snapshotter SUBCOMMAND ARGS...` (next to this binary, else from PATH) and
/// returns its exit status.
fn snapshotter(subcommand: &str, args: Vec<std::ffi::OsString>) -> std::process::ExitCode {
    let bin = spry_shim::cli::snapshotter_program();
    match std::process::Command::new(&bin)
        .arg(subcommand)
        .args(args)
        .status()
    {
        Ok(status) => {
            std::process::ExitCode::from(status.code().unwrap_or(125).clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!(
                "spry: cannot run {}: {e} (build it: cargo build -p spry-snapshotter)",
                bin.display()
            );
            std::process::ExitCode::from(125)
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPRY_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Vm(VmCommand::Run(args)) => {
            let runtime = tokio::runtime::Runtime::new().expect("start the async runtime");
            let result = runtime.block_on(run_vm(&cli.config, args));
            // stdin is read on a blocking thread that may never return; don't wait for it.
            runtime.shutdown_background();
            match result {
                Ok(code) => return std::process::ExitCode::from(code.clamp(0, 255) as u8),
                Err(err) => Err(error_chain(&err)),
            }
        }
        Command::Template(command) => {
            let runtime = tokio::runtime::Runtime::new().expect("start the async runtime");
            runtime
                .block_on(run_template(&cli.config, command))
                .map_err(|e| error_chain(&e))
        }
        Command::Install(args) => run_install(&args).map_err(|e| error_chain(&e)),
        Command::Pool(command) => {
            let runtime = tokio::runtime::Runtime::new().expect("start the async runtime");
            runtime
                .block_on(run_pool(&cli.config, command))
                .map_err(|e| error_chain(&e))
        }
        Command::Uninstall(args) => {
            let runtime = tokio::runtime::Runtime::new().expect("start the async runtime");
            runtime
                .block_on(run_uninstall(&args))
                .map_err(|e| error_chain(&e))
        }
        Command::Assets(AssetsCommand::Build(args)) => {
            run_assets_build(&args).map_err(|e| error_chain(&e))
        }
        // Image conversion and warm-up live in the snapshotter's binary; `spry` only
        // forwards, so this binary does not link the snapshotter's registry/FUSE stack.
        Command::Convert { args } => return snapshotter("convert", args),
        Command::Warm { args } => return snapshotter("warm", args),
        Command::FsServe(args) => run_fs_serve(&args).map_err(|e| error_chain(&e)),
        Command::Upgrade(args) => {
            let runtime = tokio::runtime::Runtime::new().expect("start the async runtime");
            return match runtime.block_on(run_upgrade(&cli.config, &args)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("spry upgrade: {}", error_chain(&err));
                    std::process::ExitCode::from(err.exit_code())
                }
            };
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("spry: {message}");
            // 125: Spry itself failed, not a user's command (docker's convention).
            std::process::ExitCode::from(125)
        }
    }
}
