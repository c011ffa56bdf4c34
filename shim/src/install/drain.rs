//! Uninstall's first steps: ending the warm pool, whose spare shims (and their VMs) run
//! the binaries uninstall removes and would otherwise outlive it, each holding a VM's
//! memory, until the node reboots; and deleting the layer images kept for containers to
//! come (memory too, in a tmpfs state dir).

use std::path::Path;

use super::{InstallError, Report};
use crate::config::Config;
use crate::rootfs::LayerCache;
use crate::state_dir::StateDir;

/// Stops every spare shim under the state dir of Spry's config at `spry_config` (the
/// defaults when there is none); with `dry_run`, only says how many it would stop.
pub async fn stop_pool(
    spry_config: &Path,
    dry_run: bool,
    report: &mut Report,
) -> Result<(), InstallError> {
    let config = installed_config(spry_config)?;
    let pool = StateDir::new(config.state_dir.clone()).pool();
    let spares = count_entries(&pool, |path| path.is_dir());
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

/// Deletes the layer images no container holds from the state dir of Spry's config at
/// `spry_config`; with `dry_run`, only says how many there are.
pub fn drop_unused_layer_images(
    spry_config: &Path,
    dry_run: bool,
    report: &mut Report,
) -> Result<(), InstallError> {
    let dir = StateDir::new(installed_config(spry_config)?.state_dir).layer_images();
    let images = count_entries(&dir, |path| path.extension().is_some_and(|x| x == "erofs"));
    if images == 0 {
        return Ok(());
    }
    report.actions.push(format!(
        "delete the layer images no container uses in {} ({images} there)",
        dir.display()
    ));
    if !dry_run {
        LayerCache::new(dir, 0).trim();
    }
    Ok(())
}

/// How many entries of `dir` (none when it cannot be read) are `wanted`.
fn count_entries(dir: &Path, wanted: impl Fn(&Path) -> bool) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().filter(|e| wanted(&e.path())).count())
        .unwrap_or(0)
}

/// The config uninstall works from: Spry's, else the defaults when there is none left.
fn installed_config(spry_config: &Path) -> Result<Config, InstallError> {
    match Config::load(spry_config) {
        Ok(config) => Ok(config),
        // No config of ours left to read: the default state dir is where Spry ran.
        Err(crate::config::ConfigError::Read { .. }) => Ok(Config::default()),
        Err(source) => Err(InstallError::SpryConfig(Box::new(source))),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A Spry config naming a state dir of its own: (their temporary dir, the config's
    /// path, the state dir).
    fn config_with_state_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!("state_dir = {:?}\n", state.display().to_string()),
        )
        .unwrap();
        (dir, config, state)
    }

    #[tokio::test]
    async fn uninstall_ends_the_pool_of_the_configs_state_dir() {
        let (_dir, config, state) = config_with_state_dir();
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

    #[test]
    fn uninstall_deletes_the_kept_layer_images() {
        let (_dir, config, state) = config_with_state_dir();
        let images = StateDir::new(state).layer_images();
        std::fs::create_dir_all(&images).unwrap();
        // Kept, nobody holds it (its list of layers names none: stale anyway).
        let kept = images.join("abc.erofs");
        std::fs::write(&kept, b"image").unwrap();

        let mut report = Report::default();
        drop_unused_layer_images(&config, true, &mut report).unwrap();
        assert!(kept.exists(), "a dry run deleted an image");
        assert!(
            report.actions[0].contains("1 there"),
            "{:?}",
            report.actions
        );

        let mut report = Report::default();
        drop_unused_layer_images(&config, false, &mut report).unwrap();
        assert!(!images.exists(), "the images and their dir are gone");
        let mut report = Report::default();
        drop_unused_layer_images(&config, false, &mut report).unwrap();
        assert!(report.actions.is_empty(), "{:?}", report.actions);
    }
}
