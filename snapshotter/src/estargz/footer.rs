//! The 51-byte eStargz footer: an empty gzip member whose FEXTRA field
//! carries the offset of the TOC member.

use super::EstargzError;

/// Size of the eStargz footer in bytes.
pub const FOOTER_SIZE: u64 = 51;

// gzip header with FEXTRA set (flags 0x04), mtime 0, XFL 0, OS 255 (unknown),
// as Go's compress/gzip writes it.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff];
// XLEN: one subfield of 4 header bytes + 22 payload bytes.
const XLEN: u16 = 26;
const SUBFIELD_LEN: u16 = 22;
const MAGIC: &[u8; 6] = b"STARGZ";
// An empty final stored deflate block, then CRC32 = 0 and ISIZE = 0.
const EMPTY_DEFLATE_AND_TRAILER: [u8; 13] = [0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];

/// Encodes the footer that points at the TOC member starting at `toc_offset`.
pub fn encode(toc_offset: u64) -> [u8; FOOTER_SIZE as usize] {
    let mut out = [0u8; FOOTER_SIZE as usize];
    out[..10].copy_from_slice(&GZIP_HEADER);
    out[10..12].copy_from_slice(&XLEN.to_le_bytes());
    out[12] = b'S';
    out[13] = b'G';
    out[14..16].copy_from_slice(&SUBFIELD_LEN.to_le_bytes());
    let payload = format!("{toc_offset:016x}");
    out[16..32].copy_from_slice(payload.as_bytes());
    out[32..38].copy_from_slice(MAGIC);
    out[38..].copy_from_slice(&EMPTY_DEFLATE_AND_TRAILER);
    out
}

/// Parses a footer and returns the TOC offset it carries.
pub fn decode(footer: &[u8]) -> Result<u64, EstargzError> {
    if footer.len() != FOOTER_SIZE as usize {
        return Err(EstargzError::FooterSize { len: footer.len() });
    }
    if footer[..4] != GZIP_HEADER[..4] {
        return Err(EstargzError::FooterNotGzip);
    }
    let xlen = u16::from_le_bytes([footer[10], footer[11]]);
    let sublen = u16::from_le_bytes([footer[14], footer[15]]);
    if xlen != XLEN
        || &footer[12..14] != b"SG"
        || sublen != SUBFIELD_LEN
        || &footer[32..38] != MAGIC
    {
        return Err(EstargzError::FooterMagic);
    }
    let hex_offset =
        std::str::from_utf8(&footer[16..32]).map_err(|_| EstargzError::FooterOffset)?;
    u64::from_str_radix(hex_offset, 16).map_err(|_| EstargzError::FooterOffset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn roundtrip() {
        let footer = encode(0x1234_5678_9abc);
        assert_eq!(decode(&footer).unwrap(), 0x1234_5678_9abc);
    }

    #[test]
    fn footer_is_a_valid_empty_gzip_member() {
        let footer = encode(42);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&footer[..])
            .read_to_end(&mut out)
            .unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            decode(&[0u8; 51]),
            Err(EstargzError::FooterNotGzip)
        ));
        assert!(matches!(
            decode(&[0u8; 3]),
            Err(EstargzError::FooterSize { len: 3 })
        ));
        let mut footer = encode(7);
        footer[33] = b'X';
        assert!(matches!(decode(&footer), Err(EstargzError::FooterMagic)));
    }
}
