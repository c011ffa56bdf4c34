//! A TOC as JSON, through everything that trusts it afterwards: the index (sizes, offsets,
//! names, chunks), the inode tree, the chunk list, and the layer's erofs image (which the
//! host kernel mounts once the layer is fetched, and VMs attach).
#![no_main]

use libfuzzer_sys::fuzz_target;
use spry_snapshotter::erofs::ErofsImage;
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
        if let Ok(image) = ErofsImage::build(&tree) {
            // Whole blocks; each file's data block-aligned, inside the image, and apart
            // from every other file's (a read of one file never returns another's bytes).
            assert_eq!(image.size() % 4096, 0);
            let mut end = 0;
            for e in image.extents() {
                assert!(e.offset % 4096 == 0 && e.offset >= end, "{e:?} overlaps");
                end = e.offset + e.size;
                assert!(end <= image.size(), "{e:?} past the image's end");
            }
        }
    }
});
