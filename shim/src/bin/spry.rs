//! `spry`: Spry's command line.
use clap::Parser;
use spry_shim::cli::{run_vm, Cli, Command, VmCommand};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPRY_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("start the async runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Vm(VmCommand::Run(args)) => run_vm(&cli.config, args).await,
        }
    });
    // stdin is read on a blocking thread that may never return; don't wait for it.
    runtime.shutdown_background();
    match result {
        Ok(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
        Err(err) => {
            eprintln!("spry: {}", error_chain(&err));
            // 125: the runtime failed, not the user's command (docker's convention).
            std::process::ExitCode::from(125)
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
