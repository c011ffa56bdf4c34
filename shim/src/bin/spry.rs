//! `spry`: Spry's command line.
use clap::Parser;
use spry_shim::cli::{
    run_assets_build, run_install, run_uninstall, run_vm, AssetsCommand, Cli, Command, VmCommand,
};
use spry_shim::error_chain;

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
        Command::Install(args) => run_install(&args).map_err(|e| error_chain(&e)),
        Command::Uninstall(args) => run_uninstall(&args).map_err(|e| error_chain(&e)),
        Command::Assets(AssetsCommand::Build(args)) => {
            run_assets_build(&args).map_err(|e| error_chain(&e))
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
