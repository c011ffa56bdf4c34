//! One chunk's gzip member with its declared size and digest: never more than the declared
//! size is inflated, and nothing unverified comes back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spry_snapshotter::estargz::{decode_chunk, sha256_digest};

fuzz_target!(|data: &[u8]| {
    let Some((size, member)) = data.split_first_chunk::<4>() else {
        return;
    };
    let size = u64::from(u32::from_le_bytes(*size));
    // Two digests: one the member may match (its own inflated prefix), one it cannot.
    for digest in [sha256_digest(member), sha256_digest(b"")] {
        if let Ok(out) = decode_chunk(member, 0, size, &digest) {
            assert_eq!(out.len() as u64, size);
            assert_eq!(sha256_digest(&out), digest);
        }
    }
});
