//! The gzip'd tar member holding the TOC, as fetched from a blob: bombs, truncation,
//! other entries before the TOC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spry_snapshotter::estargz::{decode_toc_member, LayerIndex};
use spry_snapshotter::fs::Tree;

fuzz_target!(|data: &[u8]| {
    if let Ok((toc, digest)) = decode_toc_member(data, None) {
        if let Ok(index) = LayerIndex::new(toc, 1 << 20, digest) {
            let _ = Tree::build(&index);
        }
    }
});
