//! `convert --record`: run an image's workload once, without a VM, and
//! record the files it opens, in first-open order, so the converter can put
//! them before `.prefetch.landmark`.
//!
//! The image is unpacked into a temporary directory. A fresh thread enters
//! new mount and PID namespaces, bind-mounts that directory onto itself
//! (plus the host's /dev), and marks the bind mount with fanotify
//! (`FAN_MARK_MOUNT`, `FAN_OPEN | FAN_ACCESS`), as stargz-snapshotter's
//! optimizer does. The workload runs chrooted into it as PID 1 of the new
//! PID namespace; opens of /dev and /proc are on other mounts and are not
//! recorded. Recording stops at a stdout line matching `until_line`, at the
//! timeout, or when the workload exits; then the workload (and the whole PID
//! namespace) is killed. The unpacked files' page cache is dropped before the run, so
//! the pages cached after it are the bytes read (`residency.rs`).

mod order;
mod ranges;
mod residency;
mod run;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

pub use order::{prioritized_list, OpenOrder};
pub use ranges::{convert_options, RangesError, ReadRanges};
pub use run::{record_rootfs, Workload};

use crate::convert::{unpack_image, ImageConvertError, ImageSource};
use crate::registry::RegistryClient;

/// How to run and when to stop a recording.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    /// Run this instead of the image's entrypoint + cmd.
    pub command: Option<Vec<String>>,
    /// Stop when the workload prints a stdout line matching this.
    pub until_line: Option<regex::Regex>,
    /// Stop after this long.
    pub timeout: Duration,
}

/// Why a recording ended.
#[derive(Debug, Clone)]
pub enum StopReason {
    /// The workload printed this line (matching `until_line`).
    Line(String),
    /// The timeout passed.
    Timeout,
    /// The workload exited by itself.
    Exited(ExitStatus),
}

/// What a recording saw.
#[derive(Debug, Clone)]
pub struct Recording {
    /// Files of the image the workload opened, first open first, relative
    /// to the root.
    pub files: Vec<String>,
    pub stop: StopReason,
    /// The bytes of those files it read (their pages in the page cache afterwards).
    pub reads: ReadRanges,
    /// Files whose page cache could not be dropped before the run (their opens count as
    /// whole reads); `None` when nothing was dropped (no image file list).
    pub stayed_cached: Option<usize>,
    /// Readahead of the disk the image was unpacked on, in KiB: the grain of `reads`.
    pub readahead_kib: Option<u64>,
}

/// Errors of a recording.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("recording a workload needs root (mount and PID namespaces, fanotify)")]
    NotRoot,
    #[error("failed to unpack the image for recording")]
    Image(#[from] ImageConvertError),
    #[error("failed to create the recording directory {path}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the image has no entrypoint or cmd to record; pass --record-cmd")]
    NoCommand,
    #[error("user {user:?} of the image is not in its {file}")]
    User { user: String, file: &'static str },
    #[error("failed to enter new mount and PID namespaces")]
    Unshare { source: nix::Error },
    #[error("failed to mount {source_path} at {target} for the recording")]
    Mount {
        source_path: PathBuf,
        target: PathBuf,
        source: nix::Error,
    },
    #[error("failed to watch the mount at {path} with fanotify")]
    Watch {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to read fanotify events")]
    Events { source: std::io::Error },
    #[error("fanotify's event queue overflowed: the recording would miss files")]
    Overflow,
    #[error("failed to start {program:?} in {root}")]
    Spawn {
        program: String,
        root: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to read the workload's output")]
    Output { source: std::io::Error },
    #[error("failed to start the recording thread")]
    ThreadSpawn { source: std::io::Error },
    #[error("the recording thread panicked")]
    Thread,
}

/// Unpacks `source` into a temporary directory and records `opts`'s
/// workload (by default the image's own entrypoint + cmd) in it.
pub async fn record_image(
    client: &RegistryClient,
    source: &ImageSource,
    opts: &RecordOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Recording, RecordError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(RecordError::NotRoot);
    }
    let dir = tempfile::Builder::new()
        .prefix("spry-record-")
        .tempdir()
        .map_err(|source| RecordError::Dir {
            path: std::env::temp_dir(),
            source,
        })?;
    let root = dir.path().join("rootfs");
    std::fs::create_dir(&root).map_err(|source| RecordError::Dir {
        path: root.clone(),
        source,
    })?;
    let image = unpack_image(client, source, &root, progress).await?;
    let argv = opts.command.clone().unwrap_or_else(|| image.run.argv());
    if argv.is_empty() {
        return Err(RecordError::NoCommand);
    }
    let workload = Workload {
        argv,
        env: image.run.env.clone().unwrap_or_default(),
        cwd: image
            .run
            .working_dir
            .clone()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "/".into()),
        user: image.run.user.clone().unwrap_or_default(),
    };
    progress(&format!("recording {:?}", workload.argv));
    let opts = opts.clone();
    let files = image.files;
    let recording =
        tokio::task::spawn_blocking(move || record_rootfs(&root, &workload, &opts, Some(files)))
            .await
            .map_err(|_| RecordError::Thread)??;
    drop(dir);
    Ok(recording)
}
