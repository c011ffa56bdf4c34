//! `containerd-shim-spry-v2`: the containerd shim binary (runtime type io.containerd.spry.v2).
//! `containerd-shim-spry-v2 spare <dir>` is a spare shim of the warm pool (`spry_shim::pool`).
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use spry_shim::service::{serve_adopted, shim_config, SpryShim, RUNTIME_ID};

fn main() {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some("spare") {
        let dir = PathBuf::from(args.next().unwrap_or_default());
        spare(dir);
        return;
    }
    let action = std::env::args().next_back().unwrap_or_default();
    let sink = init_logging();
    let target: Option<Box<dyn Write + Send>> = match action.as_str() {
        "delete" => None,
        // containerd reads `start`'s stdout and stderr together as its answer: its records
        // go to the log FIFO if containerd already reads it, else nowhere.
        "start" => Some(match open_log_fifo(true) {
            Some(fifo) => Box::new(LineWriter(fifo)),
            None => Box::new(std::io::sink()),
        }),
        _ => open_log_fifo(false).map(|fifo| Box::new(LineWriter(fifo)) as Box<dyn Write + Send>),
    };
    if let Some(target) = target {
        *sink.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }
    let runtime = tokio::runtime::Runtime::new().expect("start the async runtime");
    runtime.block_on(containerd_shim::asynchronous::run::<SpryShim>(
        RUNTIME_ID,
        Some(shim_config()),
    ));
}

/// A spare shim: logs into its pool dir until a pod takes it, then into the pod's `log`
/// FIFO like any serving shim. Restoring and idling run at a low CPU priority (set before
/// any thread or QEMU is started, so all inherit it); the pod gets the normal one back.
fn spare(dir: PathBuf) {
    let _ = spry_shim::sys::set_thread_nice(0, spry_shim::pool::SPARE_NICE);
    let sink = init_logging();
    if let Ok(file) = std::fs::File::create(dir.join("spare.log")) {
        *sink.lock().unwrap_or_else(|p| p.into_inner()) = Box::new(LineWriter(file));
    }
    let runtime = tokio::runtime::Runtime::new().expect("start the async runtime");
    runtime.block_on(async {
        let adopted = match spry_shim::pool::wait_for_pod(&dir).await {
            Ok(adopted) => adopted,
            Err(e) => {
                tracing::info!(error = %spry_shim::error_chain(&e), "spare shim exiting");
                return;
            }
        };
        let log = adopted.request.bundle.join("log");
        if let Ok(fifo) = std::fs::OpenOptions::new().write(true).open(&log) {
            *sink.lock().unwrap_or_else(|p| p.into_inner()) = Box::new(LineWriter(fifo));
        }
        if let Err(e) = serve_adopted(adopted).await {
            tracing::error!(error = ?e, "the spare shim could not serve its pod");
        }
    });
}

/// The `log` FIFO containerd reads in the bundle (the cwd), or None when nobody reads it.
/// Never a blocking open: containerd stops reading when `start` fails (say it was killed),
/// and a serving shim that reached its open only then would wait forever instead of
/// noticing its bundle gone and exiting. `nonblocking`: writes stay non-blocking too.
fn open_log_fifo(nonblocking: bool) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log")
        .ok()?;
    if !nonblocking {
        // A full FIFO then holds a record back rather than dropping it.
        nix::fcntl::fcntl(
            fifo.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .ok()?;
    }
    Some(fifo)
}

type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

/// Logs to stderr until the returned sink is pointed elsewhere: the serving shim logs into
/// the `log` FIFO containerd opened in the bundle (its cwd), which containerd copies into
/// its own log; `delete` logs to stderr. The filter is `SPRY_LOG`, else "info"
/// until the shim has read its config's `log_level`.
fn init_logging() -> Sink {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{reload, EnvFilter};

    let filter = EnvFilter::try_from_env("SPRY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    spry_shim::log_filter::install(Box::new(move |new: &str| {
        EnvFilter::try_new(new).is_ok_and(|f| handle.reload(f).is_ok())
    }));
    let sink: Sink = Arc::new(Mutex::new(Box::new(std::io::stderr())));
    let writer = SinkWriter(Arc::clone(&sink));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || writer.clone()),
        )
        .init();
    sink
}

/// Where log records go now.
#[derive(Clone)]
struct SinkWriter(Sink);

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

/// Writes whole lines, so containerd's log copier never sees a torn record.
struct LineWriter(std::fs::File);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
