//! `containerd-shim-spry-v2`: the containerd shim binary (runtime type io.containerd.spry.v2).
use std::io::Write;

use spry_shim::service::{shim_config, SpryShim, RUNTIME_ID};

fn main() {
    init_logging();
    let runtime = tokio::runtime::Runtime::new().expect("start the async runtime");
    runtime.block_on(containerd_shim::asynchronous::run::<SpryShim>(
        RUNTIME_ID,
        Some(shim_config()),
    ));
}

/// The serving shim logs into the `log` FIFO containerd opened in the bundle (its cwd),
/// which containerd copies into its own log; `start`/`delete` log to stderr. The filter is
/// `SPRY_LOG`, else "info" until the shim has read its config's `log_level`.
fn init_logging() {
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{reload, EnvFilter};

    let action = std::env::args().next_back().unwrap_or_default();
    let filter = EnvFilter::try_from_env("SPRY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    spry_shim::log_filter::install(Box::new(move |new: &str| {
        EnvFilter::try_new(new).is_ok_and(|f| handle.reload(f).is_ok())
    }));
    let fifo = (action != "start" && action != "delete")
        .then(|| std::fs::OpenOptions::new().write(true).open("log").ok())
        .flatten();
    let writer = match fifo {
        Some(file) => BoxMakeWriter::new(std::sync::Mutex::new(LineWriter(file))),
        None => BoxMakeWriter::new(std::io::stderr),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(writer),
        )
        .init();
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
