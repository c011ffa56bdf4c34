//! erofs's on-disk structures, as the Linux kernel reads them (`fs/erofs/erofs_fs.h`),
//! for the subset this writer uses: 4 KiB blocks, extended (64-byte) inodes, the plain
//! flat data layout, inline xattrs, no compression, no extra devices.

/// The superblock's place in the image.
pub const SUPER_OFFSET: usize = 1024;
pub const SUPER_SIZE: usize = 128;
const MAGIC: u32 = 0xE0F5_E1E2;
pub const BLOCK_BITS: u8 = 12;
pub const BLOCK: u64 = 1 << BLOCK_BITS;
/// Inode numbers (nids) count 32-byte slots from the metadata area's start.
pub const SLOT: u64 = 32;
pub const INODE_SIZE: usize = 64;
pub const DIRENT_SIZE: usize = 12;
const XATTR_HEADER_SIZE: usize = 12;
const XATTR_ENTRY_HEADER: usize = 4;

/// `i_format`: extended inode (bit 0), data layout FLAT_PLAIN (bits 1-3 = 0): the data
/// is `size` bytes in consecutive blocks from the inode's block address.
const FORMAT_EXTENDED_FLAT_PLAIN: u16 = 1;

/// Directory entry file types (`EROFS_FT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FileType {
    Regular = 1,
    Directory = 2,
    CharDevice = 3,
    BlockDevice = 4,
    Fifo = 5,
    Socket = 6,
    Symlink = 7,
}

/// The superblock's fields this writer sets.
#[derive(Debug, Clone)]
pub struct Superblock {
    pub root_nid: u16,
    pub inodes: u64,
    pub blocks: u32,
}

impl Superblock {
    pub fn encode(&self) -> [u8; SUPER_SIZE] {
        let mut b = [0u8; SUPER_SIZE];
        put32(&mut b, 0, MAGIC);
        // checksum (4), feature_compat (8): none.
        b[12] = BLOCK_BITS;
        put16(&mut b, 14, self.root_nid);
        put64(&mut b, 16, self.inodes);
        put32(&mut b, 36, self.blocks);
        // meta_blkaddr (40) and xattr_blkaddr (44) are 0: inodes follow the superblock in
        // block 0, and there are no shared xattrs.
        b
    }
}

/// One extended inode; its inline xattrs follow it.
#[derive(Debug, Clone)]
pub struct Inode {
    /// Type and permission bits.
    pub mode: u16,
    pub size: u64,
    /// The first data block, or a device's number as the kernel's `new_encode_dev`
    /// packs it (`i_u`).
    pub block_or_rdev: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub mtime_nsec: u32,
    pub nlink: u32,
    pub xattr_count: u16,
}

impl Inode {
    pub fn encode(&self) -> [u8; INODE_SIZE] {
        let mut b = [0u8; INODE_SIZE];
        put16(&mut b, 0, FORMAT_EXTENDED_FLAT_PLAIN);
        put16(&mut b, 2, self.xattr_count);
        put16(&mut b, 4, self.mode);
        put64(&mut b, 8, self.size);
        put32(&mut b, 16, self.block_or_rdev);
        put32(&mut b, 20, self.ino);
        put32(&mut b, 24, self.uid);
        put32(&mut b, 28, self.gid);
        put64(&mut b, 32, self.mtime);
        put32(&mut b, 40, self.mtime_nsec);
        put32(&mut b, 44, self.nlink);
        b
    }
}

/// An xattr name erofs cannot store (it knows a fixed set of prefixes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedXattr(pub String);

/// The inline xattr area of an inode for `xattrs` (full names): its bytes and the
/// inode's `i_xattr_icount`. Empty when there are none.
pub fn xattr_area<'a>(
    xattrs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<(Vec<u8>, u16), UnsupportedXattr> {
    let mut area = vec![0u8; XATTR_HEADER_SIZE];
    let mut any = false;
    for (name, value) in xattrs {
        let (index, suffix) = name_index(name).ok_or_else(|| UnsupportedXattr(name.into()))?;
        let (Ok(name_len), Ok(value_len)) =
            (u8::try_from(suffix.len()), u16::try_from(value.len()))
        else {
            return Err(UnsupportedXattr(name.into()));
        };
        area.push(name_len);
        area.push(index);
        area.extend_from_slice(&value_len.to_le_bytes());
        area.extend_from_slice(suffix.as_bytes());
        area.extend_from_slice(value);
        let entry = XATTR_ENTRY_HEADER + suffix.len() + value.len();
        area.resize(area.len() + (entry.next_multiple_of(4) - entry), 0);
        any = true;
    }
    if !any {
        return Ok((Vec::new(), 0));
    }
    let count = (area.len() - XATTR_HEADER_SIZE) / 4 + 1;
    let count = u16::try_from(count).map_err(|_| UnsupportedXattr("(too many xattrs)".into()))?;
    Ok((area, count))
}

/// erofs's xattr name prefixes (`EROFS_XATTR_INDEX_*`) and the rest of `name`.
fn name_index(name: &str) -> Option<(u8, &str)> {
    match name {
        "system.posix_acl_access" => return Some((2, "")),
        "system.posix_acl_default" => return Some((3, "")),
        _ => {}
    }
    [("user.", 1), ("trusted.", 4), ("security.", 6)]
        .iter()
        .find_map(|(prefix, index)| Some((*index, name.strip_prefix(prefix)?)))
}

/// One directory block: `entries` (name, nid, type), sorted, that fit in it.
pub fn dir_block(entries: &[(&[u8], u64, FileType)]) -> Vec<u8> {
    let mut block = Vec::with_capacity(BLOCK as usize);
    let mut name_off = entries.len() * DIRENT_SIZE;
    for (name, nid, kind) in entries {
        block.extend_from_slice(&nid.to_le_bytes());
        block.extend_from_slice(&(name_off as u16).to_le_bytes());
        block.push(*kind as u8);
        block.push(0);
        name_off += name.len();
    }
    for (name, _, _) in entries {
        block.extend_from_slice(name);
    }
    block
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattrs_are_stored_by_prefix_index_and_padded() {
        let (area, count) =
            xattr_area([("user.a", &b"xyz"[..]), ("system.posix_acl_access", b"")]).unwrap();
        // Header, then "a"=xyz under user. (4 + 1 + 3 = 8), then the ACL (4, empty name).
        assert_eq!(area.len(), 12 + 8 + 4);
        assert_eq!(count as usize, (area.len() - 12) / 4 + 1);
        assert_eq!(&area[12..20], &[1, 1, 3, 0, b'a', b'x', b'y', b'z']);
        assert_eq!(&area[20..24], &[0, 2, 0, 0]);
        assert_eq!(xattr_area(std::iter::empty()).unwrap(), (Vec::new(), 0));
    }

    #[test]
    fn names_erofs_cannot_hold_are_refused() {
        for name in ["system.foo", "lustre.x", "user", "other.x"] {
            assert_eq!(
                xattr_area([(name, &b"v"[..])]),
                Err(UnsupportedXattr(name.into())),
                "{name}"
            );
        }
        let long = format!("user.{}", "n".repeat(256));
        assert!(xattr_area([(long.as_str(), &b"v"[..])]).is_err());
        let big = vec![0u8; 70_000];
        assert!(xattr_area([("user.big", big.as_slice())]).is_err());
    }

    #[test]
    fn a_directory_block_lists_dirents_then_names() {
        let block = dir_block(&[
            (b".", 36, FileType::Directory),
            (b"ab", 40, FileType::Regular),
        ]);
        assert_eq!(block.len(), 2 * DIRENT_SIZE + 3);
        assert_eq!(u64::from_le_bytes(block[0..8].try_into().unwrap()), 36);
        assert_eq!(u16::from_le_bytes([block[8], block[9]]), 24);
        assert_eq!(block[10], FileType::Directory as u8);
        assert_eq!(u16::from_le_bytes([block[20], block[21]]), 25);
        assert_eq!(&block[24..], b".ab");
    }
}
