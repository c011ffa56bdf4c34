//! `spry-snapshotter`: serve the snapshots API, convert images, warm caches.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use spry_snapshotter::{
    config::{Config, DEFAULT_CONFIG_PATH},
    convert::{convert_image, ImageSource},
    estargz::DEFAULT_CHUNK_SIZE,
    record::{convert_options, record_image, ReadRanges, RecordOptions, StopReason},
    registry::{Reference, RegistryClient},
    service::{RunToEnd, SprySnapshotter},
    warm::{warm_image, WarmScope},
};

#[derive(Parser)]
#[command(version, about = "Spry's lazy-pulling containerd snapshotter")]
struct Cli {
    /// Configuration file (TOML); the defaults when absent at the default path.
    #[arg(long, global = true, env = "SPRY_SNAPSHOTTER_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the containerd snapshots API on the configured socket.
    Serve {
        #[arg(long)]
        root: Option<PathBuf>,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Convert an image to eStargz and push it.
    Convert(ConvertArgs),
    /// Serve one remote layer over FUSE (started by `serve`, not by hand).
    MountLayer {
        /// The job file `serve` wrote.
        job: PathBuf,
    },
    /// Check the configuration and print, as JSON, what an installer needs of it (`root`,
    /// `socket`, `vm_images`; never registry credentials).
    CheckConfig,
    /// Fetch an image's prioritized files (or all) into the chunk cache.
    Warm {
        image: String,
        /// Fetch every file, not only the prioritized ones.
        #[arg(long)]
        all: bool,
    },
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// Source: a registry reference, or `oci:DIR[:TAG]` for an OCI layout.
    source: String,
    /// Target registry reference.
    target: String,
    /// File listing paths to prioritize (prefetch), one per line.
    #[arg(long)]
    prioritized_files: Option<PathBuf>,
    /// File of reads a workload made (`OFFSET LENGTH PATH` per line: the snapshotter's
    /// `accessed-ranges.txt` with `lazy.record_accesses`). Those files follow the prioritized
    /// ones, cut into chunks at the edges of what was read; a mount then prefetches only the
    /// chunks read (and the prioritized files whole).
    #[arg(long, value_name = "FILE")]
    prefetch_ranges: Option<PathBuf>,
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
    chunk_size: u64,
    /// Run the image once (root: namespaces + fanotify, no VM) and prioritize
    /// the files it opens, after any --prioritized-files entries. The image runs on this
    /// host with little isolation: trusted images only.
    #[arg(long)]
    record: bool,
    /// Stop recording when the workload prints a stdout line matching REGEX.
    #[arg(long, value_name = "REGEX", requires = "record")]
    record_until_line: Option<String>,
    /// Stop recording after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60, requires = "record")]
    record_timeout: u64,
    /// Also write the recorded paths here, one per line.
    #[arg(long, value_name = "FILE", requires = "record")]
    record_output: Option<PathBuf>,
    /// Record this command instead of the image's entrypoint + cmd; takes
    /// every argument after it, so it must come last.
    #[arg(long, value_name = "ARG", num_args = 1.., allow_hyphen_values = true, requires = "record")]
    record_cmd: Option<Vec<String>>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPRY_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: the layer daemons and a service log to files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let config = Config::load_or_default(&cli.config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli.command, config))
}

async fn run(command: Command, mut config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve { root, socket } => {
            config.root = root.unwrap_or(config.root);
            config.socket = socket.unwrap_or(config.socket);
            serve(config).await
        }
        Command::Convert(args) => convert(args, &config).await,
        Command::CheckConfig => {
            let summary = serde_json::json!({
                "root": config.root,
                "socket": config.socket,
                "vm_images": config.lazy.vm_images,
            });
            println!("{summary}");
            Ok(())
        }
        Command::MountLayer { job } => Ok(spry_snapshotter::service::run_layer_daemon(&job).await?),
        Command::Warm { image, all } => {
            let client = Arc::new(RegistryClient::new(config.registry.clone())?);
            let cache = Arc::new(config.lazy.open_cache(&config.root.join("cache"))?);
            let scope = if all {
                WarmScope::All
            } else {
                WarmScope::Prioritized
            };
            let image = Reference::parse(&image)?;
            let report = warm_image(
                client,
                cache,
                &image,
                scope,
                Arc::new(|line| eprintln!("{line}")),
            )
            .await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

async fn convert(args: ConvertArgs, config: &Config) -> anyhow::Result<()> {
    let client = RegistryClient::new(config.registry.clone())?;
    let source = match args.source.strip_prefix("oci:") {
        Some(rest) => {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') => (d, Some(t.to_string())),
                _ => (rest, None),
            };
            ImageSource::Layout {
                dir: PathBuf::from(dir),
                tag,
            }
        }
        None => ImageSource::Registry(Reference::parse(&args.source)?),
    };
    let target = Reference::parse(&args.target)?;
    let prioritized: Vec<String> = match &args.prioritized_files {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect(),
        None => Vec::new(),
    };
    let mut ranges = match &args.prefetch_ranges {
        Some(path) => Some(
            ReadRanges::parse(
                &std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| format!("--prefetch-ranges {}", path.display()))?,
        ),
        None => None,
    };
    let progress = &mut |line: &str| eprintln!("{line}");
    if args.record {
        let until_line = match &args.record_until_line {
            Some(re) => Some(
                regex::Regex::new(re)
                    .with_context(|| format!("--record-until-line {re:?} is not a regex"))?,
            ),
            None => None,
        };
        let opts = RecordOptions {
            command: args.record_cmd.clone(),
            until_line,
            timeout: Duration::from_secs(args.record_timeout),
        };
        let recording = record_image(&client, &source, &opts, progress).await?;
        let why = match &recording.stop {
            StopReason::Line(line) => format!("it printed {line:?}"),
            StopReason::Timeout => format!("{} s passed", args.record_timeout),
            StopReason::Exited(status) => format!("it exited ({status})"),
        };
        eprintln!(
            "recorded {} files opened, {} of them read ({} bytes); stopped because {why}",
            recording.files.len(),
            recording.reads.paths().len(),
            recording.reads.bytes()
        );
        if let Some(stayed) = recording.stayed_cached.filter(|&n| n > 0) {
            eprintln!(
                "{stayed} files stayed in the page cache when it was dropped before the run ($TMPDIR on tmpfs?): their opens count as reads of the whole file"
            );
        }
        if let Some(kib) = recording.readahead_kib.filter(|&kib| kib > 512) {
            eprintln!(
                "the disk holding $TMPDIR reads {kib} KiB ahead, so the reads were recorded that coarsely (files may count as read whole); for finer prefetch, set TMPDIR to a disk with less readahead or record through the snapshotter (lazy.record_accesses, then --prefetch-ranges)"
            );
        }
        if let Some(path) = &args.record_output {
            let mut text = recording.files.join("\n");
            text.push('\n');
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        ranges
            .get_or_insert_with(ReadRanges::default)
            .extend(recording.reads);
    }
    let opts = convert_options(args.chunk_size, &prioritized, ranges);
    let converted = convert_image(&client, &source, &target, &opts, progress).await?;
    println!("{}", serde_json::to_string_pretty(&converted)?);
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let snapshotter = SprySnapshotter::open(&config).await?;
    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&config.socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e)
                .with_context(|| format!("removing stale socket {}", config.socket.display()))
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&config.socket)
        .with_context(|| format!("binding {}", config.socket.display()))?;
    tracing::info!(socket = %config.socket.display(), root = %config.root.display(), "serving snapshots API");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    let result = tonic::transport::Server::builder()
        .add_service(containerd_snapshots::server(Arc::new(RunToEnd::new(
            snapshotter.clone(),
        ))))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(&config.socket);
    let snap = snapshotter.clone();
    tokio::task::spawn_blocking(move || snap.shutdown()).await?;
    result.context("gRPC server failed")
}
