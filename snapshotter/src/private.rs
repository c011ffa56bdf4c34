//! Directories and files only root may read. The snapshotter's state holds image content
//! that must not be reachable by other local users (an image's setuid binaries and device
//! nodes, containerd's CVE-2021-41103 class) and registry credentials.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of the snapshotter's directories, as containerd keeps its snapshotters' roots.
pub const DIR_MODE: u32 = 0o700;
/// Mode of files that carry secrets.
pub const FILE_MODE: u32 = 0o600;

/// Creates `path` (and missing parents) and makes it 0700, also when it existed with a
/// wider mode (a state dir left by an older version).
pub fn create_dir(path: &Path) -> std::io::Result<()> {
    fs::create_dir_all(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
}

/// Writes `data` to `path`, created 0600 (an existing file is truncated and narrowed).
pub fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    file.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn existing_wide_dir_and_file_are_narrowed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/b");
        fs::create_dir_all(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        create_dir(&state).unwrap();
        assert_eq!(fs::metadata(&state).unwrap().mode() & 0o7777, DIR_MODE);
        let secret = state.join("job.json");
        fs::write(&secret, b"old").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
        write_file(&secret, b"new").unwrap();
        assert_eq!(fs::metadata(&secret).unwrap().mode() & 0o7777, FILE_MODE);
        assert_eq!(fs::read(&secret).unwrap(), b"new");
    }
}
