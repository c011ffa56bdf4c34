//! Builds the guest assets until `spry assets build` exists:
//! `cargo run -p spry-shim --example build_guest -- --agent PATH [--output DIR] [--kernel-deb PATH]`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use spry_shim::assets::{build_guest_assets, default_output_dir, GuestAssetsConfig, KernelSource};

#[derive(Parser)]
struct Args {
    /// The static agent binary that becomes /init.
    #[arg(long)]
    agent: PathBuf,
    /// Output directory (default: <repo>/build/guest).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Use this kernel .deb instead of fetching the pinned one.
    #[arg(long)]
    kernel_deb: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let output = args.output.unwrap_or_else(|| default_output_dir(&repo));
    let mut config = GuestAssetsConfig::new(output, args.agent);
    if let Some(deb) = args.kernel_deb {
        config.kernel = KernelSource::Deb(deb);
    }
    let assets = build_guest_assets(&config).context("building the guest assets")?;
    println!("{}", serde_json::to_string_pretty(&assets.manifest)?);
    eprintln!("vmlinux:   {}", assets.vmlinux.display());
    eprintln!("initramfs: {}", assets.initramfs.display());
    Ok(())
}
