//! A deterministic writer of "newc" cpio archives, the format the kernel
//! unpacks as an initramfs.
//!
//! Determinism is the point: entries are sorted by path, every timestamp is 0,
//! every owner is root and inode numbers are assigned in order, so the same
//! inputs always give the same bytes (and the same cache key downstream).

use std::collections::BTreeMap;
use std::io::{self, Write};

/// Errors building an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("archive path {path:?} is not a clean relative path")]
    BadPath { path: String },
    #[error("archive path {path:?} was added twice")]
    Duplicate { path: String },
    #[error("parent directory of {path:?} is missing from the archive")]
    MissingParent { path: String },
    #[error("entry {path:?} is too large for a cpio archive ({len} bytes)")]
    TooLarge { path: String, len: usize },
    #[error("failed to write the archive")]
    Write {
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum EntryKind {
    Dir,
    File(Vec<u8>),
    CharDevice { major: u32, minor: u32 },
}

#[derive(Debug, Clone)]
struct Entry {
    mode: u32,
    kind: EntryKind,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;
const NEWC_MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// An in-memory archive: add directories and files, then `write_to`.
#[derive(Debug, Default, Clone)]
pub struct CpioArchive {
    entries: BTreeMap<String, Entry>,
}

impl CpioArchive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (`permissions` like 0o755, or 0o1777 for /tmp).
    pub fn add_dir(&mut self, path: &str, permissions: u32) -> Result<(), CpioError> {
        self.insert(path, S_IFDIR | (permissions & 0o7777), EntryKind::Dir)
    }

    /// Adds a regular file.
    pub fn add_file(
        &mut self,
        path: &str,
        permissions: u32,
        data: Vec<u8>,
    ) -> Result<(), CpioError> {
        if u32::try_from(data.len()).is_err() {
            return Err(CpioError::TooLarge {
                path: path.to_owned(),
                len: data.len(),
            });
        }
        self.insert(
            path,
            S_IFREG | (permissions & 0o7777),
            EntryKind::File(data),
        )
    }

    /// Adds a character device node (the kernel creates it while unpacking).
    pub fn add_char_device(
        &mut self,
        path: &str,
        permissions: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.insert(
            path,
            S_IFCHR | (permissions & 0o7777),
            EntryKind::CharDevice { major, minor },
        )
    }

    /// Adds every missing parent directory of `path` with mode 0755.
    pub fn add_parents(&mut self, path: &str) -> Result<(), CpioError> {
        let mut prefix = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for component in &components[..components.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(component);
            if !self.entries.contains_key(&prefix) {
                self.add_dir(&prefix, 0o755)?;
            }
        }
        Ok(())
    }

    fn insert(&mut self, path: &str, mode: u32, kind: EntryKind) -> Result<(), CpioError> {
        validate_path(path)?;
        if self.entries.contains_key(path) {
            return Err(CpioError::Duplicate {
                path: path.to_owned(),
            });
        }
        self.entries.insert(path.to_owned(), Entry { mode, kind });
        Ok(())
    }

    /// Writes the archive. Every parent directory must have been added, so
    /// that the kernel never has to invent one with surprising permissions.
    pub fn write_to(&self, out: &mut impl Write) -> Result<(), CpioError> {
        for path in self.entries.keys() {
            if let Some((parent, _)) = path.rsplit_once('/') {
                if !matches!(self.entries.get(parent), Some(e) if e.kind == EntryKind::Dir) {
                    return Err(CpioError::MissingParent { path: path.clone() });
                }
            }
        }
        let mut writer = NewcWriter { out, offset: 0 };
        for (index, (path, entry)) in self.entries.iter().enumerate() {
            let (data, nlink, rdev): (&[u8], u32, (u32, u32)) = match &entry.kind {
                EntryKind::Dir => (&[], 2, (0, 0)),
                EntryKind::File(data) => (data, 1, (0, 0)),
                EntryKind::CharDevice { major, minor } => (&[], 1, (*major, *minor)),
            };
            // Inode 0 is avoided: some unpackers treat it as "no inode".
            let ino = u32::try_from(index + 1).unwrap_or(u32::MAX);
            writer.entry(path, ino, entry.mode, nlink, rdev, data)?;
        }
        writer.entry(TRAILER, 0, 0, 1, (0, 0), &[])?;
        Ok(())
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CpioError> {
        let mut out = Vec::new();
        self.write_to(&mut out)?;
        Ok(out)
    }
}

fn validate_path(path: &str) -> Result<(), CpioError> {
    let clean = !path.is_empty()
        && !path.starts_with('/')
        && !path.ends_with('/')
        && !path.contains('\0')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if clean {
        Ok(())
    } else {
        Err(CpioError::BadPath {
            path: path.to_owned(),
        })
    }
}

struct NewcWriter<'a, W: Write> {
    out: &'a mut W,
    offset: usize,
}

impl<W: Write> NewcWriter<'_, W> {
    fn entry(
        &mut self,
        path: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        (rdev_major, rdev_minor): (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        let name_size = path.len() + 1;
        let file_size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            path: path.to_owned(),
            len: data.len(),
        })?;
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
        // devminor, rdevmajor, rdevminor, namesize, check: all 8-digit hex.
        let header = format!(
            "{NEWC_MAGIC}{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{file_size:08x}\
             {:08x}{:08x}{rdev_major:08x}{rdev_minor:08x}{name_size:08x}{:08x}",
            0, 0, 0, 0, 0, 0
        );
        self.put(header.as_bytes())?;
        self.put(path.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), CpioError> {
        self.out
            .write_all(bytes)
            .map_err(|source| CpioError::Write { source })?;
        self.offset += bytes.len();
        Ok(())
    }

    /// newc aligns every header and every file body to 4 bytes.
    fn pad(&mut self) -> Result<(), CpioError> {
        let padding = (4 - self.offset % 4) % 4;
        self.put(&[0u8; 3][..padding])
    }
}

/// The contents of regular file `path` in newc archive `archive` (the format
/// [`CpioArchive`] writes), if it holds one; a malformed archive holds nothing.
pub fn find_file<'a>(archive: &'a [u8], path: &str) -> Option<&'a [u8]> {
    const HEADER: usize = 110;
    let field = |at: usize, index: usize| -> Option<usize> {
        let start = at + 6 + index * 8;
        let hex = std::str::from_utf8(archive.get(start..start + 8)?).ok()?;
        usize::from_str_radix(hex, 16).ok()
    };
    let align = |n: usize| n.checked_add(3).map(|n| n & !3);
    let mut at = 0;
    loop {
        if archive.get(at..at + 6)? != NEWC_MAGIC.as_bytes() {
            return None;
        }
        let (mode, size, name_size) = (field(at, 1)?, field(at, 6)?, field(at, 11)?);
        let name_start = at + HEADER;
        let name = archive.get(name_start..name_start.checked_add(name_size)?.checked_sub(1)?)?;
        let data_start = align(name_start + name_size)?;
        let data = archive.get(data_start..data_start.checked_add(size)?)?;
        if name == TRAILER.as_bytes() {
            return None;
        }
        if name == path.as_bytes() && mode as u32 & 0o170000 == S_IFREG {
            return Some(data);
        }
        at = align(data_start + size)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpioArchive {
        let mut archive = CpioArchive::new();
        archive.add_dir("dev", 0o755).unwrap();
        archive
            .add_file("init", 0o755, b"#!hello".to_vec())
            .unwrap();
        archive.add_parents("lib/modules/x.ko").unwrap();
        archive
            .add_file("lib/modules/x.ko", 0o644, vec![1, 2, 3])
            .unwrap();
        archive
    }

    #[test]
    fn layout_is_newc_and_aligned() {
        let bytes = sample().to_bytes().unwrap();
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(bytes.len() % 4, 0);
        // Entries come out sorted: dev, init, lib, lib/modules, lib/modules/x.ko.
        let first_name = &bytes[110..113];
        assert_eq!(first_name, b"dev");
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn same_inputs_give_same_bytes_in_any_insertion_order() {
        let mut reversed = CpioArchive::new();
        reversed.add_dir("lib", 0o755).unwrap();
        reversed.add_dir("lib/modules", 0o755).unwrap();
        reversed
            .add_file("lib/modules/x.ko", 0o644, vec![1, 2, 3])
            .unwrap();
        reversed
            .add_file("init", 0o755, b"#!hello".to_vec())
            .unwrap();
        reversed.add_dir("dev", 0o755).unwrap();
        assert_eq!(sample().to_bytes().unwrap(), reversed.to_bytes().unwrap());
    }

    #[test]
    fn header_fields_are_zeroed_owner_and_time() {
        let bytes = sample().to_bytes().unwrap();
        let field = |i: usize| {
            std::str::from_utf8(&bytes[6 + i * 8..14 + i * 8])
                .unwrap()
                .to_owned()
        };
        assert_eq!(field(0), "00000001"); // ino
        assert_eq!(field(1), format!("{:08x}", S_IFDIR | 0o755));
        assert_eq!(field(2), "00000000"); // uid
        assert_eq!(field(3), "00000000"); // gid
        assert_eq!(field(5), "00000000"); // mtime
    }

    #[test]
    fn rejects_bad_paths_duplicates_and_orphans() {
        let mut archive = CpioArchive::new();
        for bad in ["", "/abs", "a/../b", "a//b", "dir/"] {
            assert!(
                matches!(archive.add_dir(bad, 0o755), Err(CpioError::BadPath { .. })),
                "{bad}"
            );
        }
        archive.add_dir("a", 0o755).unwrap();
        assert!(matches!(
            archive.add_dir("a", 0o755),
            Err(CpioError::Duplicate { .. })
        ));
        archive.add_file("b/c", 0o644, vec![]).unwrap();
        assert!(matches!(
            archive.to_bytes(),
            Err(CpioError::MissingParent { .. })
        ));
    }

    #[test]
    fn roundtrips_through_the_cpio_tool() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.cpio");
        std::fs::write(&image, sample().to_bytes().unwrap()).unwrap();
        let listing = std::process::Command::new("cpio")
            .args(["-it", "--quiet", "-F"])
            .arg(&image)
            .output()
            .expect("the cpio tool is required for this test (apt-get install cpio)");
        assert!(listing.status.success(), "{listing:?}");
        let names = String::from_utf8(listing.stdout).unwrap();
        assert_eq!(
            names.lines().collect::<Vec<_>>(),
            ["dev", "init", "lib", "lib/modules", "lib/modules/x.ko"]
        );
    }

    #[test]
    fn a_written_file_is_found_again_and_garbage_finds_nothing() {
        let mut archive = CpioArchive::new();
        archive.add_parents("bin/tool").unwrap();
        archive
            .add_file("bin/tool", 0o755, b"hello".to_vec())
            .unwrap();
        archive.add_file("init", 0o755, vec![7; 1001]).unwrap();
        let bytes = archive.to_bytes().unwrap();
        assert_eq!(find_file(&bytes, "bin/tool"), Some(b"hello".as_slice()));
        assert_eq!(find_file(&bytes, "init"), Some(vec![7; 1001].as_slice()));
        assert_eq!(find_file(&bytes, "bin"), None, "a directory is no file");
        assert_eq!(find_file(&bytes, "missing"), None);
        assert_eq!(find_file(&bytes[..200], "init"), None, "cut short");
        assert_eq!(find_file(b"garbage", "init"), None);
    }
}
