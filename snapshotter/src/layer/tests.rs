use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::estargz::EntryType;
use crate::testutil::{build, pattern, MemBlob};

fn open(blob: Arc<MemBlob>, toc: &str) -> (RemoteLayer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ChunkCache::open(dir.path()).unwrap());
    let retry = RetryPolicy {
        attempts: 3,
        backoff: Duration::from_millis(1),
        ..RetryPolicy::default()
    };
    (RemoteLayer::open(blob, cache, toc, retry).unwrap(), dir)
}

fn entry_index(layer: &RemoteLayer, name: &str) -> usize {
    layer
        .index()
        .entries
        .iter()
        .position(|e| e.name == name)
        .unwrap()
}

#[test]
fn converted_layer_is_a_plain_gzip_tar_with_the_same_files() {
    let (blob, out, _, files) = build(&["usr/bin/app"]);
    let mut plain = Vec::new();
    flate2::read::MultiGzDecoder::new(&blob[..])
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(crate::estargz::sha256_digest(&plain), out.diff_id);
    assert_eq!(plain.len() as u64, out.uncompressed_size);
    assert_eq!(crate::estargz::sha256_digest(&blob), out.blob_digest);
    let mut archive = tar::Archive::new(&plain[..]);
    let mut seen = Vec::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        seen.push((path, data));
    }
    for (path, data) in &files {
        let found = seen
            .iter()
            .find(|(p, _)| p == path)
            .unwrap_or_else(|| panic!("{path} missing"));
        assert_eq!(&found.1, data, "{path}");
    }
    // Prioritized file comes first (after its parents), then the landmark.
    let names: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        &names[..4],
        &["usr/", "usr/bin/", "usr/bin/app", ".prefetch.landmark"]
    );
}

#[test]
fn reads_every_file_through_verified_chunks() {
    let (blob, out, _, files) = build(&[]);
    let mem = MemBlob::new(blob);
    let (layer, _dir) = open(mem.clone(), &out.toc_digest);
    assert_eq!(layer.index().prefetch, Prefetch::Nothing);
    for (path, data) in &files {
        let idx = entry_index(&layer, path);
        assert_eq!(
            &layer.read_file(idx, 0, data.len() + 10).unwrap(),
            data,
            "{path}"
        );
        // Unaligned reads across chunk boundaries.
        if data.len() > 1500 {
            assert_eq!(
                layer.read_file(idx, 990, 1020).unwrap(),
                data[990..2010].to_vec()
            );
        }
    }
    let big = entry_index(&layer, "usr/bin/big");
    assert_eq!(layer.index().chunks[&big].len(), 10);
    let link = &layer.index().entries[entry_index(&layer, "usr/bin/app2")];
    assert_eq!(
        (link.kind, link.link_name.as_str()),
        (EntryType::Hardlink, "usr/bin/app")
    );
    // Re-reading is served from the cache.
    let before = mem.calls.load(Ordering::SeqCst);
    layer.read_file(big, 0, 10_000).unwrap();
    assert_eq!(mem.calls.load(Ordering::SeqCst), before);
}

#[test]
fn prefetch_fetches_prioritized_files_in_one_request() {
    let (blob, out, _, files) = build(&["usr/bin/app"]);
    let mem = MemBlob::new(blob);
    let (layer, _dir) = open(mem.clone(), &out.toc_digest);
    assert!(matches!(layer.index().prefetch, Prefetch::UpTo { .. }));
    let before = mem.calls.load(Ordering::SeqCst);
    assert!(layer.prefetch().unwrap() > 0);
    assert_eq!(mem.calls.load(Ordering::SeqCst), before + 1);
    let app = entry_index(&layer, "usr/bin/app");
    let data = &files.iter().find(|(p, _)| p == "usr/bin/app").unwrap().1;
    assert_eq!(&layer.read_file(app, 0, 4096).unwrap(), data);
    assert_eq!(
        mem.calls.load(Ordering::SeqCst),
        before + 1,
        "prefetched file needed a fetch"
    );
}

#[test]
fn fetch_all_caches_everything() {
    let (blob, out, _, files) = build(&[]);
    let mem = MemBlob::new(blob);
    let (layer, _dir) = open(mem.clone(), &out.toc_digest);
    let mut last = (0, 0);
    layer.fetch_all(&mut |d, t| last = (d, t)).unwrap();
    assert_eq!(last.0, last.1);
    assert!(layer.fully_cached());
    mem.down.store(true, Ordering::SeqCst);
    for (path, data) in &files {
        assert_eq!(
            &layer
                .read_file(entry_index(&layer, path), 0, data.len())
                .unwrap(),
            data
        );
    }
}

#[test]
fn wrong_toc_digest_is_rejected() {
    let (blob, _, _, _) = build(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ChunkCache::open(dir.path()).unwrap());
    let wrong = crate::estargz::sha256_digest(b"not the toc");
    let err = RemoteLayer::open(MemBlob::new(blob), cache, &wrong, RetryPolicy::default())
        .err()
        .unwrap();
    assert!(matches!(
        err,
        LayerError::Format {
            source: EstargzError::TocDigestMismatch { .. }
        }
    ));
}

#[test]
fn corrupted_chunk_is_never_served() {
    let (mut blob, out, _, _) = build(&[]);
    let mem = MemBlob::new(blob.clone());
    let (layer, _dir) = open(mem, &out.toc_digest);
    let big = entry_index(&layer, "usr/bin/big");
    let chunk = layer.index().chunks[&big][3].clone();
    // Replace the chunk's member with a valid gzip member of other bytes.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, &vec![0u8; chunk.size as usize]).unwrap();
    let fake = enc.finish().unwrap();
    let span = (chunk.compressed_end - chunk.compressed_offset) as usize;
    assert!(fake.len() <= span);
    blob[chunk.compressed_offset as usize..chunk.compressed_offset as usize + fake.len()]
        .copy_from_slice(&fake);
    let (layer, _dir2) = open(MemBlob::new(blob), &out.toc_digest);
    let err = layer.read_file(big, 3000, 100).unwrap_err();
    assert!(matches!(err, LayerError::Verify { .. }), "{err:?}");
    assert!(!layer.cache.contains(&chunk.digest));
    // Other chunks still read fine.
    assert_eq!(
        layer.read_file(big, 0, 100).unwrap(),
        pattern(10_000, 3)[..100].to_vec()
    );
}

#[test]
fn unreachable_registry_fails_after_bounded_retries_then_recovers() {
    let (blob, out, _, files) = build(&[]);
    let mem = MemBlob::new(blob);
    let (layer, _dir) = open(mem.clone(), &out.toc_digest);
    mem.down.store(true, Ordering::SeqCst);
    let before = mem.calls.load(Ordering::SeqCst);
    let app = entry_index(&layer, "usr/bin/app");
    let err = layer.read_file(app, 0, 100).unwrap_err();
    assert!(
        matches!(err, LayerError::Fetch { attempts: 3, .. }),
        "{err:?}"
    );
    assert_eq!(mem.calls.load(Ordering::SeqCst), before + 3);
    mem.down.store(false, Ordering::SeqCst);
    let data = &files.iter().find(|(p, _)| p == "usr/bin/app").unwrap().1;
    assert_eq!(&layer.read_file(app, 0, 5000).unwrap(), data);
}

#[test]
fn the_streamed_diff_id_is_the_uncompressed_tars_digest() {
    let (blob, out, _, _) = build(&["usr/bin/app"]);
    let mem = MemBlob::new(blob);
    let (layer, _dir) = open(mem, &out.toc_digest);
    let digests = layer.digests().unwrap();
    assert_eq!(digests.diff_id, out.diff_id);
    // The same pass hashed every byte of the blob, footer included.
    assert_eq!(digests.blob, out.blob_digest);
    assert_eq!(super::chain_id("", &out.diff_id), out.diff_id);
    // containerd's identity.ChainID for a layer on a parent chain.
    let parent = format!("sha256:{}", "1".repeat(64));
    let expected = crate::estargz::sha256_digest(format!("{parent} {}", out.diff_id).as_bytes());
    assert_eq!(super::chain_id(&parent, &out.diff_id), expected);
}

#[test]
fn a_chunk_torn_before_this_process_is_fetched_again_not_served() {
    let (blob, out, _, files) = build(&[]);
    let mem = MemBlob::new(blob);
    let (first, dir) = open(mem.clone(), &out.toc_digest);
    first.fetch_all(&mut |_, _| {}).unwrap();
    let big = entry_index(&first, "usr/bin/big");
    let digest = first.index().chunks[&big][3].digest.clone();
    drop(first);
    // A crash tore it (chunks are not fsynced): right length, wrong bytes.
    let path = dir.path().join("sha256").join(&digest[7..]);
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    std::fs::write(&path, vec![0u8; len]).unwrap();
    // The next process (a new cache over the same directory) reads through it.
    let cache = Arc::new(ChunkCache::open(dir.path()).unwrap());
    let layer =
        RemoteLayer::open(mem.clone(), cache, &out.toc_digest, RetryPolicy::default()).unwrap();
    let calls = mem.calls.load(Ordering::SeqCst);
    let want = &files.iter().find(|(p, _)| p == "usr/bin/big").unwrap().1;
    assert_eq!(&layer.read_file(big, 0, want.len()).unwrap(), want);
    assert!(
        mem.calls.load(Ordering::SeqCst) > calls,
        "the torn chunk was not fetched again"
    );
}

/// Incompressible bytes: compressed offsets then track file offsets.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn a_layer_with_marked_chunks_prefetches_only_the_bytes_read_when_recorded() {
    let mib = 1 << 20;
    let data = noise(3 * mib);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "lib/big.so", &data[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let ranges = crate::record::ReadRanges::parse(&format!(
        "{} 100 lib/big.so\n{} 10 lib/big.so\n",
        mib,
        5 * mib / 2
    ))
    .unwrap();
    let opts = crate::record::convert_options(4 * mib as u64, &[], Some(ranges));
    let (out, blob) = crate::convert::convert_tar(&tar[..], Vec::new(), &opts).unwrap();
    let mem = MemBlob::new(blob);
    let (layer, _dir) = open(mem.clone(), &out.toc_digest);
    assert_eq!(layer.index().prefetch, Prefetch::Marked);
    let hot: u64 = layer.index().hot_chunks().iter().map(|c| c.size).sum();
    assert_eq!(hot, 2 * 4096, "one page around each read");

    let before = mem.calls.load(Ordering::SeqCst);
    let fetched = layer.prefetch().unwrap();
    assert_eq!(
        mem.calls.load(Ordering::SeqCst),
        before + 2,
        "two reads far apart: two requests"
    );
    assert!(
        fetched < 16 << 10,
        "prefetched {fetched} bytes for two pages"
    );
    // What was read at recording is now served without the registry.
    let big = entry_index(&layer, "lib/big.so");
    let calls = mem.calls.load(Ordering::SeqCst);
    assert_eq!(
        layer.read_file(big, mib as u64, 100).unwrap(),
        data[mib..mib + 100]
    );
    let late = 5 * mib / 2;
    assert_eq!(
        layer.read_file(big, late as u64, 10).unwrap(),
        data[late..late + 10]
    );
    assert_eq!(mem.calls.load(Ordering::SeqCst), calls);
    // A read the recording did not see fetches one small cold chunk, not the whole file.
    let stats_before = layer.stats().bytes_fetched.load(Ordering::Relaxed);
    assert_eq!(layer.read_file(big, 10, 10).unwrap(), data[10..20]);
    let cold = layer.stats().bytes_fetched.load(Ordering::Relaxed) - stats_before;
    assert!(
        cold <= (512 << 10) + 1024,
        "a cold read fetched {cold} bytes"
    );
    // The whole file still reads back intact, chunk edges and all.
    assert_eq!(layer.read_file(big, 0, data.len()).unwrap(), data);
    // A second prefetch finds everything cached.
    let calls = mem.calls.load(Ordering::SeqCst);
    assert_eq!(layer.prefetch().unwrap(), 0);
    assert_eq!(mem.calls.load(Ordering::SeqCst), calls);
}
