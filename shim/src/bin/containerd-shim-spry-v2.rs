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
/// which containerd copies into its own log; `start`/`delete` log to stderr.
fn init_logging() {
    let action = std::env::args().next_back().unwrap_or_default();
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("SPRY_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let fifo = (action != "start" && action != "delete")
        .then(|| std::fs::OpenOptions::new().write(true).open("log").ok())
        .flatten();
    match fifo {
        Some(file) => builder
            .with_writer(std::sync::Mutex::new(LineWriter(file)))
            .init(),
        None => builder.with_writer(std::io::stderr).init(),
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
