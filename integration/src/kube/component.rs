//! One control-plane or node process of the test cluster, its output in a log file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{require, system};

/// The apiserver may sit on SIGTERM for over a minute; nobody needs its graceful exit here.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub struct Component {
    pub name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Component {
    /// Starts `binary args...`, stdout and stderr to `<log_dir>/<name>.log`.
    pub fn start(
        name: &'static str,
        binary: &Path,
        args: &[String],
        log_dir: &Path,
    ) -> Result<Self> {
        let binary = require::require_tool(binary)
            .with_context(|| format!("{name}: run scripts/build-k8s.sh as root"))?;
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(&binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().context("duplicating a log handle")?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self { name, child, log })
    }

    /// Fails, with the log's tail, if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("checking a child")? {
            anyhow::bail!(
                "{} exited ({status}); log tail:\n{}",
                self.name,
                self.log_tail(20)
            );
        }
        Ok(())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn stop(&mut self) -> Result<()> {
        system::terminate_child(&mut self.child, STOP_GRACE)
            .with_context(|| format!("stopping {}", self.name))
    }
}
