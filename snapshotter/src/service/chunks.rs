//! Which chunks each remote snapshot's layer uses (`<snapshot>/chunks`, one digest a line,
//! written by whoever mounts the layer), so that removing an image frees the chunks no
//! other layer on the node shares. Files assembled for passthrough (`cache/files.rs`) are
//! listed too, as `file:<key>`.

use std::collections::HashSet;
use std::path::Path;

use crate::cache::{assembled_key, ChunkCache, Piece};
use crate::estargz::LayerIndex;

const CHUNK_LIST: &str = "chunks";
const ASSEMBLED: &str = "file:";

/// Records the chunks of `index` in `snapshot_dir`.
pub fn write_list(snapshot_dir: &Path, index: &LayerIndex) -> std::io::Result<()> {
    let mut digests: Vec<String> = index
        .chunks
        .values()
        .flatten()
        .map(|c| c.digest.clone())
        .collect();
    digests.extend(index.chunks.values().filter(|c| c.len() > 1).map(|chunks| {
        let pieces: Vec<Piece> = chunks
            .iter()
            .map(|c| Piece {
                digest: &c.digest,
                size: c.size,
            })
            .collect();
        format!("{ASSEMBLED}{}", assembled_key(&pieces))
    }));
    digests.sort_unstable();
    digests.dedup();
    let mut text = digests.join("\n");
    text.push('\n');
    crate::private::write_file(&snapshot_dir.join(CHUNK_LIST), text.as_bytes())
}

fn read_list(snapshot_dir: &Path) -> HashSet<String> {
    std::fs::read_to_string(snapshot_dir.join(CHUNK_LIST))
        .map(|text| text.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Removes from `cache` the chunks of the snapshot in `removed` that no snapshot in
/// `others` lists. Returns how many were removed.
pub fn release<'a>(
    cache: &ChunkCache,
    removed: &Path,
    others: impl Iterator<Item = &'a Path>,
) -> usize {
    let mut only_here = read_list(removed);
    for dir in others {
        if only_here.is_empty() {
            break;
        }
        for digest in read_list(dir) {
            only_here.remove(&digest);
        }
    }
    only_here
        .iter()
        .filter(|d| match d.strip_prefix(ASSEMBLED) {
            Some(key) => cache.remove_assembled(key),
            None => cache.remove(d),
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estargz::{sha256_digest, ChunkRef};

    fn index_with(digests: &[&str]) -> LayerIndex {
        let mut index = LayerIndex::default();
        let refs = digests
            .iter()
            .map(|d| ChunkRef {
                compressed_offset: 0,
                compressed_end: 1,
                file_offset: 0,
                size: 1,
                digest: d.to_string(),
                hot: false,
            })
            .collect();
        index.chunks.insert(0, refs);
        index
    }

    #[test]
    fn only_chunks_no_other_layer_uses_are_freed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(&dir.path().join("cache")).unwrap();
        let (a, shared, b) = (
            b"only a".as_slice(),
            b"shared".as_slice(),
            b"only b".as_slice(),
        );
        let [da, ds, db] = [a, shared, b].map(sha256_digest);
        for (d, data) in [(&da, a), (&ds, shared), (&db, b)] {
            cache.insert(d, data).unwrap();
        }
        let (snap_a, snap_b) = (dir.path().join("1"), dir.path().join("2"));
        std::fs::create_dir_all(&snap_a).unwrap();
        std::fs::create_dir_all(&snap_b).unwrap();
        write_list(&snap_a, &index_with(&[&da, &ds])).unwrap();
        write_list(&snap_b, &index_with(&[&ds, &db])).unwrap();
        assert_eq!(release(&cache, &snap_a, [snap_b.as_path()].into_iter()), 1);
        assert!(!cache.contains(&da));
        assert!(cache.contains(&ds) && cache.contains(&db));
    }
}
