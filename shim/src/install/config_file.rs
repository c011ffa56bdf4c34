//! Changing containerd's config file the way an admin would by hand: written through to
//! a symlink's target (the link stays), with the file's own mode (it may hold registry
//! credentials), and its pre-Spry contents backed up once (a later change never
//! overwrites the first backup).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{write_atomically, InstallError, InstallOptions, Report};

/// A new config file's mode.
const NEW_FILE_MODE: u32 = 0o644;

/// Where `path`'s bytes live: its target when it is a symlink (resolved), else itself.
pub fn target(path: &Path) -> Result<PathBuf, InstallError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            std::fs::canonicalize(path).map_err(|source| InstallError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
        _ => Ok(path.to_path_buf()),
    }
}

/// `path`'s permission bits, or a new file's.
fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).map_or(NEW_FILE_MODE, |m| m.permissions().mode() & 0o7777)
}

/// Writes containerd's config `patched` over `current` when they differ; whether it did.
pub fn apply(
    opts: &InstallOptions,
    current: &str,
    patched: &str,
    report: &mut Report,
) -> Result<bool, InstallError> {
    if patched == current {
        return Ok(false);
    }
    replace(
        &opts.containerd_config,
        current,
        patched,
        opts.dry_run,
        report,
    )?;
    Ok(true)
}

/// Replaces the config at `path` (through a symlink) with `text`, keeping its mode; backs
/// up `current` first unless a backup exists.
pub fn replace(
    path: &Path,
    current: &str,
    text: &str,
    dry_run: bool,
    report: &mut Report,
) -> Result<(), InstallError> {
    let target = target(path)?;
    let mode = mode_of(&target);
    if !current.is_empty() {
        let backup = PathBuf::from(format!("{}.spry-backup", path.display()));
        if backup.exists() {
            report.actions.push(format!(
                "keep the first backup {} (the config before Spry)",
                backup.display()
            ));
        } else {
            report.actions.push(format!(
                "back up {} -> {}",
                path.display(),
                backup.display()
            ));
            if !dry_run {
                write_atomically(&backup, current.as_bytes(), mode)?;
            }
        }
    }
    report.actions.push(format!("write {}", target.display()));
    if dry_run {
        return Ok(());
    }
    write_atomically(&target, text.as_bytes(), mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_symlinked_private_config_stays_a_private_symlink_and_the_first_backup_stays() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.toml");
        std::fs::write(&real, "original").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("config.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let mut report = Report::default();
        replace(&link, "original", "first change", false, &mut report).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "first change");
        assert_eq!(mode(&real), 0o600);
        let backup = dir.path().join("config.toml.spry-backup");
        assert_eq!(std::fs::read_to_string(&backup).unwrap(), "original");
        assert_eq!(mode(&backup), 0o600);
        replace(&link, "first change", "second change", false, &mut report).unwrap();
        assert_eq!(std::fs::read_to_string(&backup).unwrap(), "original");
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "second change");
    }

    #[test]
    fn a_new_config_is_0644_and_needs_no_backup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/containerd/config.toml");
        let mut report = Report::default();
        replace(&path, "", "version = 3\n", false, &mut report).unwrap();
        assert_eq!(mode(&path), 0o644);
        assert!(!dir
            .path()
            .join("etc/containerd/config.toml.spry-backup")
            .exists());
    }
}
