//! A containerd that outlives the process that started it (the quickstart's): recorded in
//! its fixed run dir, adopted later by the command that stops it.

use super::{Containerd, ContainerdOptions, Daemon};
use crate::instance_dirs::{InstanceDirs, KeptRecord};
use crate::{paths, system};
use anyhow::{bail, Context, Result};

impl Containerd {
    /// Leaves containerd running after this process exits (fixed dirs only): records it in
    /// its run dir, where [`Containerd::adopt`] finds it to stop it.
    pub fn keep_running(mut self) -> Result<()> {
        if !matches!(self.dirs, InstanceDirs::Fixed { .. }) {
            bail!("only an instance with fixed dirs can be kept running");
        }
        let pid = self.pid().context("containerd is not running")?;
        KeptRecord {
            pid,
            marker: self.marker.clone(),
            bridge: self.bridge.clone(),
        }
        .write(self.dirs.run())?;
        // Dropping a Child neither kills nor waits: containerd is reparented when we exit.
        self.daemon = None;
        self.cleaned = true;
        Ok(())
    }

    /// The instance [`Containerd::keep_running`] left in `opts`' fixed dirs, if any, to
    /// clean up (`cleanup` or drop) like one of ours. Its record goes with the run dir at
    /// the end of that cleanup, so a cleanup that fails part-way can be retried.
    pub fn adopt(opts: ContainerdOptions) -> Result<Option<Self>> {
        let Some((dir, run)) = opts.fixed_dirs.clone() else {
            bail!("adopting needs ContainerdOptions::fixed_dirs");
        };
        let Some(record) = KeptRecord::read(&run)? else {
            return Ok(None);
        };
        let binary = opts.binary.clone().unwrap_or_else(paths::containerd_bin);
        let pid = i32::try_from(record.pid).context("pid out of range")?;
        // A recycled pid is not ours: only a containerd with this instance's marker is.
        let alive = system::processes()?
            .iter()
            .any(|p| p.pid == pid && p.environ_contains(&record.marker));
        Ok(Some(Containerd {
            crictl_bin: paths::crictl_bin(),
            binary,
            dirs: InstanceDirs::fixed(&dir, &run)?,
            marker: record.marker,
            bridge: record.bridge,
            daemon: alive.then_some(Daemon::Adopted(pid)),
            cleaned: false,
            opts,
        }))
    }
}
