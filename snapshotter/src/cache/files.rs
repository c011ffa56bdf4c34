//! Whole files for FUSE passthrough: once every chunk of a file is cached, the kernel can
//! read the file from one backing file with no round trip to the daemon. A file of one
//! chunk is backed by the chunk itself; a file of several is assembled once into
//! `files/<key>` (the key is the digest of its chunk list, so layers sharing a file share
//! the copy). Either way every chunk is hashed again when the file is first handed out:
//! the kernel serves passthrough reads without asking the daemon, so this is the last
//! point where a chunk corrupted on disk can be caught. A corrupt chunk is removed (the
//! next read through the daemon fetches it again) and the file is not handed out.

use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::{CacheError, ChunkCache};

/// Subdirectory of assembled multi-chunk files.
pub(super) const FILES_DIR: &str = "files";

/// One chunk of a file, in file order.
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    /// `sha256:` digest of the chunk's uncompressed bytes.
    pub digest: &'a str,
    /// Its uncompressed size.
    pub size: u64,
}

/// A cached file ready to back passthrough opens.
#[derive(Debug)]
pub struct BackingFile {
    /// Opened read-only, contents verified.
    pub file: fs::File,
    /// Where it lives, to open it again without verifying (the caller remembers it did).
    pub path: PathBuf,
}

/// What [`ChunkCache::verified_file`] found.
#[derive(Debug)]
pub enum Verified {
    /// The file is whole and every chunk matched its digest.
    Ready(BackingFile),
    /// A chunk is not cached (yet, or any more).
    Missing,
    /// The chunk with this digest did not match it; it was removed from the cache.
    Corrupt { digest: String },
}

const HASH_BUF: usize = 1 << 20;

// Threads and layer daemons may assemble the same file at once: each in a file of its own.
static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

impl ChunkCache {
    /// Where the file made of `pieces` is (or would be) kept.
    pub fn backing_path(&self, pieces: &[Piece]) -> Result<PathBuf, CacheError> {
        match pieces {
            [one] => self.path_of(one.digest),
            _ => Ok(self.dir.join(FILES_DIR).join(assembled_key(pieces))),
        }
    }

    /// The file made of `pieces`, every chunk hashed against its digest now; assembled
    /// from the cached chunks first if it has several and is not assembled yet.
    pub fn verified_file(&self, pieces: &[Piece]) -> Result<Verified, CacheError> {
        let path = self.backing_path(pieces)?;
        match fs::File::open(&path) {
            Ok(file) => match self.check(&file, &path, pieces)? {
                None => {
                    Self::touch(&file);
                    return Ok(Verified::Ready(BackingFile { file, path }));
                }
                Some(bad) if pieces.len() == 1 => return Ok(self.corrupt(bad)),
                // A damaged assembly: drop it and assemble again from the chunks (which
                // are checked on the way).
                Some(_) => {
                    tracing::warn!(path = %path.display(), "assembled file does not match its chunks; assembling it again");
                    self.remove_path(&path);
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if pieces.len() == 1 {
                    return Ok(Verified::Missing);
                }
            }
            Err(source) => return Err(CacheError::Read { path, source }),
        }
        // A file still being fetched is opened often: no partial copy each time.
        if !pieces.iter().all(|p| self.contains(p.digest)) {
            return Ok(Verified::Missing);
        }
        self.assemble(pieces, path)
    }

    /// The digest of the first piece whose bytes in `file` do not hash to it.
    fn check(
        &self,
        file: &fs::File,
        path: &std::path::Path,
        pieces: &[Piece],
    ) -> Result<Option<String>, CacheError> {
        let read_err = |source| CacheError::Read {
            path: path.to_path_buf(),
            source,
        };
        let total: u64 = pieces.iter().map(|p| p.size).sum();
        if file.metadata().map_err(read_err)?.len() != total {
            return Ok(Some(pieces[0].digest.to_string()));
        }
        let mut reader = io::BufReader::with_capacity(HASH_BUF, file);
        for piece in pieces {
            let digest =
                hash_exactly(&mut reader, piece.size, &mut io::sink()).map_err(read_err)?;
            if digest != piece.digest {
                return Ok(Some(piece.digest.to_string()));
            }
        }
        Ok(None)
    }

    fn assemble(&self, pieces: &[Piece], path: PathBuf) -> Result<Verified, CacheError> {
        let dir = self.dir.join(FILES_DIR);
        fs::create_dir_all(&dir).map_err(|source| CacheError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        let tmp = path.with_extension(format!(
            "tmp{}.{}",
            std::process::id(),
            NEXT_TMP.fetch_add(1, Ordering::Relaxed)
        ));
        let result = self.assemble_into(pieces, &tmp);
        let outcome = match result {
            Ok(None) => fs::rename(&tmp, &path)
                .and_then(|_| fs::File::open(&path))
                .map(|file| {
                    self.account(pieces.iter().map(|p| p.size).sum());
                    Verified::Ready(BackingFile { file, path })
                })
                .map_err(|source| self.write_error(&tmp, source)),
            Ok(Some(missing_or_bad)) => Ok(missing_or_bad),
            Err(source) => Err(self.write_error(&tmp, source)),
        };
        let _ = fs::remove_file(&tmp);
        outcome
    }

    /// Copies the chunks into `tmp`, hashing each; `Some` says why it stopped early.
    fn assemble_into(
        &self,
        pieces: &[Piece],
        tmp: &std::path::Path,
    ) -> io::Result<Option<Verified>> {
        let mut out = io::BufWriter::with_capacity(HASH_BUF, fs::File::create(tmp)?);
        for piece in pieces {
            let Ok(chunk_path) = self.path_of(piece.digest) else {
                return Ok(Some(Verified::Corrupt {
                    digest: piece.digest.to_string(),
                }));
            };
            let chunk = match fs::File::open(&chunk_path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Ok(Some(Verified::Missing))
                }
                Err(e) => return Err(e),
            };
            let mut reader = io::BufReader::with_capacity(HASH_BUF, &chunk);
            let digest = match hash_exactly(&mut reader, piece.size, &mut out) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => String::new(),
                Err(e) => return Err(e),
            };
            let longer = reader.read(&mut [0u8; 1])? != 0;
            if digest != piece.digest || longer {
                return Ok(Some(self.corrupt(piece.digest.to_string())));
            }
            Self::touch(&chunk);
        }
        out.into_inner().map_err(|e| e.into_error())?;
        Ok(None)
    }

    fn corrupt(&self, digest: String) -> Verified {
        tracing::warn!(%digest, "cached chunk does not match its digest; removed, it will be fetched again");
        self.remove(&digest);
        Verified::Corrupt { digest }
    }

    fn write_error(&self, tmp: &std::path::Path, source: io::Error) -> CacheError {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            CacheError::DiskFull {
                path: self.dir.clone(),
            }
        } else {
            CacheError::Write {
                path: tmp.to_path_buf(),
                source,
            }
        }
    }
}

/// The name of the assembled file of `pieces`: the digest of its chunk list.
pub fn assembled_key(pieces: &[Piece]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"spry-file-v1\n");
    for p in pieces {
        hasher.update(format!("{} {}\n", p.digest, p.size).as_bytes());
    }
    hex(&hasher.finalize())
}

/// Hashes exactly `len` bytes of `reader`, copying them to `out`; `sha256:<hex>`.
fn hash_exactly(reader: &mut impl Read, len: u64, out: &mut impl Write) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_BUF.min(len as usize).max(1)];
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(left as usize);
        reader.read_exact(&mut buf[..want])?;
        hasher.update(&buf[..want]);
        out.write_all(&buf[..want])?;
        left -= want as u64;
    }
    Ok(format!("sha256:{}", hex(&hasher.finalize())))
}

/// `sha256:<hex>` of everything in `file`.
pub(super) fn hash_file(file: &fs::File) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut reader = io::BufReader::with_capacity(HASH_BUF, file);
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        hasher.update(buf);
        let n = buf.len();
        reader.consume(n);
    }
    Ok(format!("sha256:{}", hex(&hasher.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estargz::sha256_digest;

    fn chunks(n: u8) -> Vec<(String, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let data = vec![i; 1000 + i as usize];
                (sha256_digest(&data), data)
            })
            .collect()
    }

    /// A cache in a temporary directory holding `n` chunks.
    fn cache_with(n: u8) -> (tempfile::TempDir, ChunkCache, Vec<(String, Vec<u8>)>) {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path()).unwrap();
        let c = chunks(n);
        for (d, data) in &c {
            cache.insert(d, data).unwrap();
        }
        (dir, cache, c)
    }

    fn pieces(chunks: &[(String, Vec<u8>)]) -> Vec<Piece<'_>> {
        chunks
            .iter()
            .map(|(d, data)| Piece {
                digest: d,
                size: data.len() as u64,
            })
            .collect()
    }

    fn ready(v: Verified) -> BackingFile {
        match v {
            Verified::Ready(f) => f,
            other => panic!("not ready: {other:?}"),
        }
    }

    #[test]
    fn a_multi_chunk_file_is_assembled_once_and_counted() {
        let (_dir, cache, c) = cache_with(3);
        let chunk_bytes = cache.size();
        let file = ready(cache.verified_file(&pieces(&c)).unwrap());
        let want: Vec<u8> = c.iter().flat_map(|(_, d)| d.clone()).collect();
        assert_eq!(std::fs::read(&file.path).unwrap(), want);
        assert_eq!(file.path, cache.backing_path(&pieces(&c)).unwrap());
        assert_eq!(cache.size(), chunk_bytes + want.len() as u64);
        // Again: the assembly is reused (and verified), not rebuilt.
        let inode = std::fs::metadata(&file.path).unwrap();
        let again = ready(cache.verified_file(&pieces(&c)).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&again.path).unwrap().ino(), inode.ino());
        // The image is removed: the assembly goes with it.
        assert!(cache.remove_assembled(&assembled_key(&pieces(&c))));
        assert!(!file.path.exists());
        assert!(!cache.remove_assembled("../sha256"));
    }

    #[test]
    fn a_one_chunk_file_is_its_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path()).unwrap();
        let c = chunks(1);
        assert!(matches!(
            cache.verified_file(&pieces(&c)).unwrap(),
            Verified::Missing
        ));
        cache.insert(&c[0].0, &c[0].1).unwrap();
        let file = ready(cache.verified_file(&pieces(&c)).unwrap());
        assert_eq!(file.path, cache.path_of(&c[0].0).unwrap());
        assert!(!dir.path().join(FILES_DIR).exists());
    }

    #[test]
    fn missing_or_corrupt_chunks_give_no_file_and_corrupt_ones_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path()).unwrap();
        let c = chunks(3);
        cache.insert(&c[0].0, &c[0].1).unwrap();
        cache.insert(&c[2].0, &c[2].1).unwrap();
        assert!(matches!(
            cache.verified_file(&pieces(&c)).unwrap(),
            Verified::Missing
        ));
        cache.insert(&c[1].0, &c[1].1).unwrap();
        // Same length, other bytes; then one byte longer than declared.
        let path = cache.path_of(&c[1].0).unwrap();
        std::fs::write(&path, vec![9u8; c[1].1.len()]).unwrap();
        assert!(matches!(
            cache.verified_file(&pieces(&c)).unwrap(),
            Verified::Corrupt { digest } if digest == c[1].0
        ));
        assert!(!path.exists(), "the corrupt chunk stayed");
        let mut longer = c[1].1.clone();
        longer.push(0);
        std::fs::write(&path, longer).unwrap();
        assert!(matches!(
            cache.verified_file(&pieces(&c)).unwrap(),
            Verified::Corrupt { .. }
        ));
        // No half-built assembly is left behind.
        assert_eq!(
            std::fs::read_dir(dir.path().join(FILES_DIR))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn a_damaged_assembly_is_rebuilt_from_sound_chunks() {
        let (_dir, cache, c) = cache_with(2);
        let file = ready(cache.verified_file(&pieces(&c)).unwrap());
        let mut bytes = std::fs::read(&file.path).unwrap();
        bytes[1500] ^= 1;
        std::fs::write(&file.path, &bytes).unwrap();
        let again = ready(cache.verified_file(&pieces(&c)).unwrap());
        let want: Vec<u8> = c.iter().flat_map(|(_, d)| d.clone()).collect();
        assert_eq!(std::fs::read(&again.path).unwrap(), want);
    }

    #[test]
    fn assembled_files_are_evicted_like_chunks() {
        let (_dir, cache, c) = cache_with(2);
        let file = ready(cache.verified_file(&pieces(&c)).unwrap());
        cache.evict_to(0);
        assert!(!file.path.exists());
        assert_eq!(cache.size(), 0);
    }
}
