//! Uninstall's first step: ending the warm pool. Spare shims (and their VMs) run the
//! binaries uninstall removes and would otherwise outlive it, each holding a VM's memory,
//! until the node reboots.

use std::path::Path;

use super::{InstallError, Report};
use crate::config::Config;
use crate::state_dir::StateDir;

/// Stops every spare shim under the state dir of Spry's config at `spry_config` (the
/// defaults when there is none); with `dry_run`, only says how many it would stop.
pub async fn stop_pool(
    spry_config: &Path,
    dry_run: bool,
    report: &mut Report,
) -> Result<(), InstallError> {
    let config = match Config::load(spry_config) {
        Ok(config) => config,
        // No config of ours left to read: the default state dir is where a pool would be.
        Err(crate::config::ConfigError::Read { .. }) => Config::default(),
        Err(source) => return Err(InstallError::SpryConfig(Box::new(source))),
    };
    let pool = StateDir::new(config.state_dir.clone()).pool();
    let spares = std::fs::read_dir(&pool)
        .map(|entries| entries.flatten().filter(|e| e.path().is_dir()).count())
        .unwrap_or(0);
    if spares == 0 {
        return Ok(());
    }
    report.actions.push(format!(
        "stop {spares} spare shim(s) of the warm pool in {} and their VMs",
        pool.display()
    ));
    if !dry_run {
        crate::pool::drain(&config.state_dir)
            .await
            .map_err(|source| InstallError::Pool(Box::new(source)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn uninstall_ends_the_pool_of_the_configs_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!("state_dir = {:?}\n", state.display().to_string()),
        )
        .unwrap();
        // A spare's dir whose spare has already exited (no lock held): drained at once.
        let spare = StateDir::new(state.clone()).pool().join("0123abcd-1");
        std::fs::create_dir_all(&spare).unwrap();

        let mut report = Report::default();
        stop_pool(&config, true, &mut report).await.unwrap();
        assert!(spare.is_dir(), "a dry run stopped a spare");
        assert_eq!(report.actions.len(), 1, "{:?}", report.actions);

        let mut report = Report::default();
        stop_pool(&config, false, &mut report).await.unwrap();
        assert!(!spare.exists(), "the spare's dir is left");
        assert!(
            report.actions[0].contains("stop 1 spare"),
            "{:?}",
            report.actions
        );

        let mut report = Report::default();
        stop_pool(&config, false, &mut report).await.unwrap();
        assert!(
            report.actions.is_empty(),
            "nothing to stop: {:?}",
            report.actions
        );
    }
}
