//! The 51-byte footer a registry serves at the end of a layer blob.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spry_snapshotter::estargz::footer;

fuzz_target!(|data: &[u8]| {
    if let Ok(offset) = footer::decode(data) {
        // What decodes must encode back to the same offset.
        assert_eq!(footer::decode(&footer::encode(offset)).ok(), Some(offset));
    }
});
