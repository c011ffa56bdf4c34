//! Getting the uncompressed, PVH-bootable ELF `vmlinux` out of a Debian
//! `vmlinuz` (an x86 bzImage whose payload is LZ4-compressed).
//!
//! QEMU's microvm boots a PVH ELF directly, which skips the kernel's own
//! decompressor: under TCG that saves seconds per boot.

/// Errors extracting or validating the kernel image.
#[derive(Debug, thiserror::Error)]
pub enum VmlinuxError {
    #[error("the kernel image is not an x86 bzImage (no \"HdrS\" boot header)")]
    NotBzImage,
    #[error("the bzImage boot protocol {version:#06x} is too old to locate its payload")]
    OldBootProtocol { version: u16 },
    #[error("the bzImage payload (offset {offset}, length {length}) lies outside the {file_len}-byte file")]
    PayloadOutOfBounds {
        offset: usize,
        length: usize,
        file_len: usize,
    },
    #[error("the bzImage payload is not LZ4 legacy-frame compressed (magic {found:02x?})")]
    NotLz4 { found: Vec<u8> },
    #[error("LZ4 block at payload offset {offset} is corrupt")]
    Lz4Block {
        offset: usize,
        #[source]
        source: lz4_flex::block::DecompressError,
    },
    #[error("LZ4 block at payload offset {offset} claims {size} bytes but only {left} remain")]
    Lz4Truncated {
        offset: usize,
        size: usize,
        left: usize,
    },
    #[error("decompressed kernel is {actual} bytes but the bzImage records {expected}")]
    SizeMismatch { expected: usize, actual: usize },
    #[error("the decompressed kernel is not a 64-bit little-endian x86-64 ELF executable")]
    NotElf,
    #[error("the kernel ELF is truncated: {what} lies outside the file")]
    ElfTruncated { what: &'static str },
    #[error(
        "the kernel ELF has no PVH entry note (Xen note type 18): QEMU cannot boot it directly"
    )]
    NoPvhNote,
}

const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// Legacy frames always use 8 MiB blocks.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Decompresses the payload of an LZ4 bzImage into the ELF `vmlinux`, and
/// checks the result is PVH-bootable.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let payload = bzimage_payload(bzimage)?;
    let vmlinux = decompress_lz4_legacy(payload)?;
    pvh_entry(&vmlinux)?;
    Ok(vmlinux)
}

/// Locates the compressed payload with the boot header's `payload_offset`
/// and `payload_length` (boot protocol 2.08+), rather than searching for a
/// magic number that might also occur by chance in the setup code.
fn bzimage_payload(image: &[u8]) -> Result<&[u8], VmlinuxError> {
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err(VmlinuxError::NotBzImage);
    }
    let version = u16::from_le_bytes([image[0x206], image[0x207]]);
    if version < 0x0208 {
        return Err(VmlinuxError::OldBootProtocol { version });
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let protected_mode_start = (setup_sects + 1) * 512;
    let payload_offset = read_u32(image, 0x248).ok_or(VmlinuxError::NotBzImage)? as usize;
    let length = read_u32(image, 0x24c).ok_or(VmlinuxError::NotBzImage)? as usize;
    let offset = protected_mode_start + payload_offset;
    image
        .get(offset..offset + length)
        .ok_or(VmlinuxError::PayloadOutOfBounds {
            offset,
            length,
            file_len: image.len(),
        })
}

/// Decodes an LZ4 legacy frame: the magic, then blocks each prefixed by its
/// compressed size. The kernel build appends the uncompressed size (4 bytes)
/// after the last block; when present it is checked.
fn decompress_lz4_legacy(payload: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    if payload.get(..4) != Some(&LZ4_LEGACY_MAGIC) {
        return Err(VmlinuxError::NotLz4 {
            found: payload.iter().take(4).copied().collect(),
        });
    }
    let mut out = Vec::new();
    let mut pos = 4;
    while payload.len() - pos >= 4 {
        let word = read_u32(payload, pos).unwrap_or(0) as usize;
        let left = payload.len() - pos - 4;
        if payload[pos..pos + 4] == LZ4_LEGACY_MAGIC {
            pos += 4;
            continue;
        }
        if left == 0 {
            // The trailing uncompressed size.
            if word != out.len() {
                return Err(VmlinuxError::SizeMismatch {
                    expected: word,
                    actual: out.len(),
                });
            }
            break;
        }
        if word > left {
            return Err(VmlinuxError::Lz4Truncated {
                offset: pos,
                size: word,
                left,
            });
        }
        let block = &payload[pos + 4..pos + 4 + word];
        let start = out.len();
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        let written =
            lz4_flex::block::decompress_into(block, &mut out[start..]).map_err(|source| {
                VmlinuxError::Lz4Block {
                    offset: pos,
                    source,
                }
            })?;
        out.truncate(start + written);
        pos += 4 + word;
    }
    Ok(out)
}

/// Returns the PVH 32-bit entry point recorded in the ELF notes.
pub fn pvh_entry(elf: &[u8]) -> Result<u32, VmlinuxError> {
    const ET_EXEC: u16 = 2;
    const EM_X86_64: u16 = 62;
    const PT_NOTE: u32 = 4;
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1])
        || read_u16(elf, 0x10) != Some(ET_EXEC)
        || read_u16(elf, 0x12) != Some(EM_X86_64)
    {
        return Err(VmlinuxError::NotElf);
    }
    let truncated = |what| VmlinuxError::ElfTruncated { what };
    let phoff = read_u64(elf, 0x20).ok_or(truncated("the program header offset"))? as usize;
    let phentsize = usize::from(read_u16(elf, 0x36).ok_or(truncated("the program header size"))?);
    let phnum = usize::from(read_u16(elf, 0x38).ok_or(truncated("the program header count"))?);
    for index in 0..phnum {
        let ph = phoff + index * phentsize;
        if read_u32(elf, ph).ok_or(truncated("a program header"))? != PT_NOTE {
            continue;
        }
        let offset = read_u64(elf, ph + 0x08).ok_or(truncated("a program header"))? as usize;
        let size = read_u64(elf, ph + 0x20).ok_or(truncated("a program header"))? as usize;
        let notes = elf
            .get(offset..offset + size)
            .ok_or(truncated("a note segment"))?;
        if let Some(entry) = find_pvh_note(notes) {
            return Ok(entry);
        }
    }
    Err(VmlinuxError::NoPvhNote)
}

fn find_pvh_note(mut notes: &[u8]) -> Option<u32> {
    let align4 = |n: usize| (n + 3) & !3;
    while notes.len() >= 12 {
        let namesz = read_u32(notes, 0)? as usize;
        let descsz = read_u32(notes, 4)? as usize;
        let kind = read_u32(notes, 8)?;
        let name = notes.get(12..12 + namesz)?;
        let desc_start = 12 + align4(namesz);
        let desc = notes.get(desc_start..desc_start + descsz)?;
        if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
            return read_u32(desc, 0);
        }
        notes = notes.get(desc_start + align4(descsz)..)?;
    }
    None
}

fn read_u16(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy_frame(chunks: &[&[u8]], trailer: Option<u32>) -> Vec<u8> {
        let mut frame = LZ4_LEGACY_MAGIC.to_vec();
        for chunk in chunks {
            let block = lz4_flex::block::compress(chunk);
            frame.extend_from_slice(&(block.len() as u32).to_le_bytes());
            frame.extend_from_slice(&block);
        }
        if let Some(size) = trailer {
            frame.extend_from_slice(&size.to_le_bytes());
        }
        frame
    }

    #[test]
    fn decodes_legacy_frames_and_checks_the_trailer() {
        let a = vec![7u8; 1000];
        let b = b"hello kernel".repeat(50);
        let total = (a.len() + b.len()) as u32;
        let out = decompress_lz4_legacy(&legacy_frame(&[&a, &b], Some(total))).unwrap();
        assert_eq!(out, [a.clone(), b.clone()].concat());
        let wrong = decompress_lz4_legacy(&legacy_frame(&[&a, &b], Some(total + 1)));
        assert!(matches!(wrong, Err(VmlinuxError::SizeMismatch { .. })));
        assert!(matches!(
            decompress_lz4_legacy(b"\x04\x22\x4d\x18xxxx"),
            Err(VmlinuxError::NotLz4 { .. })
        ));
    }

    #[test]
    fn truncated_blocks_are_errors() {
        let mut frame = legacy_frame(&[&[1u8; 4000]], None);
        frame.truncate(frame.len() - 3);
        frame.extend_from_slice(&[0; 7]);
        assert!(decompress_lz4_legacy(&frame).is_err());
    }

    #[test]
    fn finds_the_pvh_note_in_a_minimal_elf() {
        // ELF header (64 bytes) + one PT_NOTE program header (56 bytes) + note.
        let mut elf = vec![0u8; 64 + 56];
        elf[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        elf[0x10..0x12].copy_from_slice(&2u16.to_le_bytes());
        elf[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&0x0100_0a20u32.to_le_bytes());
        elf[64..68].copy_from_slice(&4u32.to_le_bytes());
        elf[64 + 0x08..64 + 0x10].copy_from_slice(&120u64.to_le_bytes());
        elf[64 + 0x20..64 + 0x28].copy_from_slice(&(note.len() as u64).to_le_bytes());
        elf.extend_from_slice(&note);
        assert_eq!(pvh_entry(&elf).unwrap(), 0x0100_0a20);

        elf[120 + 8] = 5; // another note type: no PVH entry any more
        assert!(matches!(pvh_entry(&elf), Err(VmlinuxError::NoPvhNote)));
        assert!(matches!(
            pvh_entry(b"not an elf at all"),
            Err(VmlinuxError::NotElf)
        ));
    }

    #[test]
    fn rejects_non_bzimages() {
        assert!(matches!(
            extract_vmlinux(&[0u8; 4096]),
            Err(VmlinuxError::NotBzImage)
        ));
    }
}
