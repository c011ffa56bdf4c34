//! Applies image layers to a directory, giving the root filesystem a
//! container of the image would see: whiteouts delete what lower layers
//! added, opaque directories hide their lower contents.

use std::collections::HashSet;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::estargz::{toc::clean_name, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Errors unpacking a layer.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("failed to read the layer tar")]
    Read { source: io::Error },
    #[error("failed to remove {path} for a whiteout")]
    Whiteout { path: PathBuf, source: io::Error },
    #[error("failed to unpack {entry:?} into {root}")]
    Entry {
        entry: String,
        root: PathBuf,
        source: io::Error,
    },
}

/// Unpacks the uncompressed layer tar `layer` (read twice: whiteouts first,
/// then contents) on top of `root`, keeping `files` (regular files, by
/// cleaned path) up to date.
pub fn unpack_layer<R: Read + Seek>(
    layer: &mut R,
    root: &Path,
    files: &mut HashSet<String>,
) -> Result<(), UnpackError> {
    let read = |source| UnpackError::Read { source };
    // Pass 1: whiteouts apply to lower layers only, so run them before this
    // layer's own entries land (an entry may precede its directory's opaque
    // marker in the tar).
    let mut archive = tar::Archive::new(&mut *layer);
    for entry in archive.entries().map_err(read)? {
        let entry = entry.map_err(read)?;
        let name = clean_name(&String::from_utf8_lossy(&entry.path_bytes()));
        let (dir, base) = split(&name);
        if base == OPAQUE {
            clear_dir(root, dir, files)?;
        } else if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            remove(root, &join(dir, hidden), files)?;
        }
    }
    layer.seek(SeekFrom::Start(0)).map_err(read)?;

    // Pass 2: contents.
    let mut archive = tar::Archive::new(&mut *layer);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(read)? {
        let mut entry = entry.map_err(read)?;
        let name = clean_name(&String::from_utf8_lossy(&entry.path_bytes()));
        let kind = entry.header().entry_type();
        if name.is_empty() || split(&name).1.starts_with(WHITEOUT_PREFIX) {
            continue;
        }
        // eStargz's own members (source images may be eStargz already).
        if matches!(
            name.as_str(),
            PREFETCH_LANDMARK | NO_PREFETCH_LANDMARK | TOC_TAR_NAME
        ) {
            continue;
        }
        // Device nodes and FIFOs are not needed to record file opens (the
        // workload gets the host's /dev).
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            continue;
        }
        // tar refuses entries that would land outside `root` (through `..`
        // or a symlink); those fail the unpack rather than escape.
        entry.unpack_in(root).map_err(|source| UnpackError::Entry {
            entry: name.clone(),
            root: root.to_path_buf(),
            source,
        })?;
        if kind.is_file() || kind.is_hard_link() {
            files.insert(name);
        } else {
            files.remove(&name);
        }
    }
    Ok(())
}

fn split(name: &str) -> (&str, &str) {
    name.rsplit_once('/').unwrap_or(("", name))
}

fn join(dir: &str, base: &str) -> String {
    if dir.is_empty() {
        base.to_string()
    } else {
        format!("{dir}/{base}")
    }
}

/// `root/name`, or `None` when a directory on the way is a symlink (a
/// whiteout must never follow one out of `root`).
fn inside(root: &Path, name: &str) -> Option<PathBuf> {
    let mut path = root.to_path_buf();
    let parts: Vec<&str> = name.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        let last = i + 1 == parts.len();
        if !last
            && path
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink())
        {
            return None;
        }
    }
    Some(path)
}

fn remove(root: &Path, name: &str, files: &mut HashSet<String>) -> Result<(), UnpackError> {
    let Some(path) = inside(root, name) else {
        return Ok(());
    };
    let result = match path.symlink_metadata() {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
        Ok(_) => std::fs::remove_file(&path),
    };
    result.map_err(|source| UnpackError::Whiteout { path, source })?;
    let prefix = format!("{name}/");
    files.retain(|f| f != name && !f.starts_with(&prefix));
    Ok(())
}

fn clear_dir(root: &Path, dir: &str, files: &mut HashSet<String>) -> Result<(), UnpackError> {
    let Some(path) = inside(root, dir) else {
        return Ok(());
    };
    if !path.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    let entries = std::fs::read_dir(&path).map_err(|source| UnpackError::Whiteout {
        path: path.clone(),
        source,
    })?;
    for entry in entries.flatten() {
        let child = join(dir, &entry.file_name().to_string_lossy());
        remove(root, &child, files)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, Option<&[u8]>)]) -> io::Cursor<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            match data {
                Some(data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, *data).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, path, io::empty()).unwrap();
                }
            }
        }
        io::Cursor::new(b.into_inner().unwrap())
    }

    #[test]
    fn whiteouts_and_opaque_dirs_hide_lower_layers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut files = HashSet::new();
        let mut lower = layer(&[
            ("etc/", None),
            ("etc/keep", Some(b"k")),
            ("etc/gone", Some(b"g")),
            ("opt/", None),
            ("opt/old", Some(b"o")),
        ]);
        unpack_layer(&mut lower, root, &mut files).unwrap();
        // The opaque marker comes after this layer's own opt/new: it must
        // hide only opt/old.
        let mut upper = layer(&[
            ("etc/.wh.gone", Some(b"")),
            ("opt/new", Some(b"n")),
            ("opt/.wh..wh..opq", Some(b"")),
        ]);
        unpack_layer(&mut upper, root, &mut files).unwrap();
        assert!(root.join("etc/keep").exists());
        assert!(!root.join("etc/gone").exists());
        assert!(!root.join("opt/old").exists());
        assert_eq!(std::fs::read(root.join("opt/new")).unwrap(), b"n");
        assert!(!root.join("opt/.wh..wh..opq").exists());
        let mut listed: Vec<_> = files.into_iter().collect();
        listed.sort();
        assert_eq!(listed, ["etc/keep", "opt/new"]);
    }
}
