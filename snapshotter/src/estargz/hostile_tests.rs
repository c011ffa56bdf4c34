//! A hostile TOC, as an attacker would write one: every declared size, name and offset is
//! checked before anything is allocated, fetched or walked.

use std::io::Write;

use super::*;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn reg(name: &str, size: i64, offset: i64) -> TocEntry {
    let mut e = TocEntry::new(name, EntryType::Reg);
    e.size = size;
    e.offset = offset;
    e.chunk_digest = sha256_digest(b"x");
    e
}

fn index_of(entries: Vec<TocEntry>, toc_offset: u64) -> Result<LayerIndex, EstargzError> {
    LayerIndex::new(
        Toc {
            version: 1,
            entries,
        },
        toc_offset,
        String::new(),
    )
}

fn reason(err: EstargzError) -> &'static str {
    match err {
        EstargzError::InvalidEntry { reason, .. } => reason,
        EstargzError::TocTooLarge { what, .. } => what,
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn huge_declared_chunk_is_refused_before_any_allocation() {
    // One 1 TiB file in a single chunk (chunkSize 0 = to the end of the file).
    let err = index_of(vec![reg("big", 1 << 40, 0)], 100).unwrap_err();
    assert_eq!(reason(err), "chunk is larger than MAX_CHUNK_SIZE");
    // decode_chunk refuses it too, whatever the caller passes.
    let err = decode_chunk(&gzip(b"x"), 0, 1 << 40, &sha256_digest(b"x")).unwrap_err();
    assert!(
        matches!(err, EstargzError::ChunkDecompress { .. }),
        "{err:?}"
    );
}

#[test]
fn chunk_bounds_overflowing_i64_are_an_error_not_a_panic() {
    let mut file = reg("f", i64::MAX, 0);
    file.chunk_size = 10;
    let mut tail = TocEntry::new("f", EntryType::Chunk);
    tail.offset = 50;
    tail.chunk_offset = i64::MAX - 5;
    tail.chunk_size = 10;
    tail.chunk_digest = sha256_digest(b"y");
    let err = index_of(vec![file, tail], 100).unwrap_err();
    assert_eq!(reason(err), "chunk extends past the end of the file");
}

#[test]
fn chunk_whose_compressed_range_is_huge_is_refused() {
    // A small chunk whose gzip member "ends" 10 GB later, at the TOC: fetching it would
    // read 10 GB into memory.
    let err = index_of(vec![reg("f", 100, 0)], 10 << 30).unwrap_err();
    assert_eq!(
        reason(err),
        "chunk's compressed range is larger than MAX_CHUNK_RANGE"
    );
}

#[test]
fn too_many_entries_are_refused() {
    let entries = vec![TocEntry::new("d", EntryType::Dir); MAX_TOC_ENTRIES + 1];
    assert_eq!(reason(index_of(entries, 100).unwrap_err()), "entry count");
}

#[test]
fn names_beyond_path_max_or_name_max_are_refused() {
    let deep = "a/".repeat(MAX_PATH_LEN);
    let err = index_of(vec![TocEntry::new(deep, EntryType::Dir)], 100).unwrap_err();
    assert_eq!(reason(err), "path longer than PATH_MAX");
    let long = "n".repeat(MAX_NAME_LEN + 1);
    let err = index_of(vec![TocEntry::new(long, EntryType::Dir)], 100).unwrap_err();
    assert_eq!(reason(err), "name longer than NAME_MAX");
    let mut link = TocEntry::new("l", EntryType::Hardlink);
    link.link_name = "x/".repeat(MAX_PATH_LEN);
    let err = index_of(vec![link], 100).unwrap_err();
    assert_eq!(reason(err), "path longer than PATH_MAX");
    let err = index_of(vec![TocEntry::new("a\0b", EntryType::Dir)], 100).unwrap_err();
    assert_eq!(reason(err), "path contains a NUL byte");
}

#[test]
fn deepest_allowed_path_builds_without_recursion() {
    // 2,048 levels (PATH_MAX allows no more), built on a thread with a 64 KiB stack: the
    // tree builder must not recurse per level.
    let deep = "a/".repeat(MAX_PATH_LEN / 2 - 1) + "f";
    let index = index_of(vec![TocEntry::new(deep, EntryType::Symlink)], 100).unwrap();
    let levels = std::thread::Builder::new()
        .stack_size(64 << 10)
        .spawn(move || crate::fs::Tree::build(&index).len())
        .unwrap()
        .join()
        .expect("tree build overflowed a small stack");
    assert_eq!(levels, 1 + MAX_PATH_LEN / 2);
}

fn toc_member(json_len: usize, before: Option<(&str, u64)>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    if let Some((name, size)) = before {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        b.append_data(&mut h, name, std::io::repeat(0).take(size))
            .unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_size(json_len as u64);
    b.append_data(
        &mut h,
        TOC_TAR_NAME,
        std::io::repeat(b' ').take(json_len as u64),
    )
    .unwrap();
    gzip(&b.into_inner().unwrap())
}

use std::io::Read as _;

#[test]
fn toc_bomb_is_refused_without_decompressing_it() {
    // 80 MiB of JSON whitespace gzips to well under 1 MiB.
    let member = toc_member(80 << 20, None);
    assert!(member.len() < (1 << 20));
    let err = decode_toc_member(&member, None).unwrap_err();
    assert_eq!(reason(err), "JSON");
}

#[test]
fn huge_entry_before_the_toc_stops_at_the_decompression_limit() {
    // 80 MiB of zeros ahead of the TOC: decompression stops at the limit, and the member
    // is refused (not read through).
    let member = toc_member(16, Some(("filler", 80 << 20)));
    let started = std::time::Instant::now();
    let err = decode_toc_member(&member, None).unwrap_err();
    assert!(
        matches!(
            err,
            EstargzError::TocDecompress { .. } | EstargzError::TocMissing
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn gzip_bomb_chunk_decompresses_no_more_than_its_declared_size() {
    // 64 MiB of zeros declared as a 4 KiB chunk: at most 4 KiB is inflated, then the
    // digest (of the declared bytes) decides.
    let bomb = {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            enc.write_all(&zeros).unwrap();
        }
        enc.finish().unwrap()
    };
    let expected = sha256_digest(&[0u8; 4096]);
    assert_eq!(decode_chunk(&bomb, 0, 4096, &expected).unwrap().len(), 4096);
    let err = decode_chunk(&bomb, 0, 4096, &sha256_digest(b"other")).unwrap_err();
    assert!(matches!(err, EstargzError::ChunkDigestMismatch { .. }));
}

#[test]
fn admin_xattrs_and_directory_hardlinks_never_reach_the_tree() {
    let b64 = |v: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(v)
    };
    let mut etc = TocEntry::new("etc", EntryType::Dir);
    etc.xattrs
        .insert("trusted.overlay.opaque".into(), b64(b"y"));
    etc.xattrs.insert("user.note".into(), b64(b"kept"));
    let mut dst = TocEntry::new("dst", EntryType::Dir);
    dst.xattrs
        .insert("trusted.overlay.redirect".into(), b64(b"/src"));
    let mut ping = TocEntry::new("ping", EntryType::Symlink);
    ping.link_name = "x".into();
    ping.xattrs
        .insert("security.capability".into(), b64(b"\x01\x00\x00\x02"));
    let mut loop_link = TocEntry::new("loop", EntryType::Hardlink);
    loop_link.link_name = "etc".into();
    let index = index_of(vec![etc, dst, ping, loop_link], 100).unwrap();
    let tree = crate::fs::Tree::build(&index);
    let root = fuser::INodeNo::ROOT.0;
    let etc = tree.lookup(root, "etc").unwrap();
    assert!(!etc.xattrs.contains_key("trusted.overlay.opaque"));
    assert_eq!(
        etc.xattrs.get("user.note").map(Vec::as_slice),
        Some(&b"kept"[..])
    );
    assert!(tree.lookup(root, "dst").unwrap().xattrs.is_empty());
    assert!(tree
        .lookup(root, "ping")
        .unwrap()
        .xattrs
        .contains_key("security.capability"));
    assert!(
        tree.lookup(root, "loop").is_none(),
        "hard link to a directory"
    );
    // The layer's own opaque whiteout still sets the attribute overlayfs reads.
    let index = index_of(vec![TocEntry::new("opq/.wh..wh..opq", EntryType::Reg)], 100).unwrap();
    let tree = crate::fs::Tree::build(&index);
    assert!(tree
        .lookup(root, "opq")
        .unwrap()
        .xattrs
        .contains_key(crate::fs::OPAQUE_XATTR));
}
