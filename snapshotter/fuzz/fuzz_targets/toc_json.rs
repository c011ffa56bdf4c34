//! A TOC as JSON, through everything that trusts it afterwards: the index (sizes, offsets,
//! names, chunks), the inode tree and the chunk list.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spry_snapshotter::estargz::{LayerIndex, Toc};
use spry_snapshotter::fs::Tree;

fuzz_target!(|data: &[u8]| {
    let Ok(toc) = serde_json::from_slice::<Toc>(data) else {
        return;
    };
    // The TOC offset comes from the footer: any value a blob can declare.
    let toc_offset = data.len() as u64 * 977;
    if let Ok(index) = LayerIndex::new(toc, toc_offset, String::new()) {
        let tree = Tree::build(&index);
        assert!(tree.len() >= 1);
        let _ = index.all_chunks();
        let _ = index.content_size();
    }
});
