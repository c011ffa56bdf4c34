//! An erofs image of a lazily pulled layer, made from its TOC alone.
//!
//! Why: a Spry pod's containers see their rootfs as block devices in the VM, and packing
//! a lazy layer's files with `mkfs.erofs` reads (so fetches) every byte. Here the image's
//! metadata (superblock, inodes, directories, symlinks) is computed from the layer's
//! inode tree, which the TOC gives without fetching anything, and each regular file's
//! data sits in its own run of blocks (erofs's plain flat layout). So a read of the
//! image at any offset is either metadata, served from memory, or a range of one file,
//! served by the layer's verified, chunk-cached reads: the guest reading a file through
//! the image fetches that file's chunks and nothing else.
//!
//! Layout: block 0 holds the superblock (at 1024) and the first inodes; inodes follow
//! in breadth-first order (root first), then directory and symlink blocks, then (from
//! the next 2 MiB boundary) the files' data, each file from a block boundary. Sizes and offsets are fixed by the tree,
//! so the same layer always gives the same image.

mod format;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::time::UNIX_EPOCH;

use fuser::FileType as FuseType;

use crate::estargz::MAX_NAME_LEN;
use crate::fs::{Node, Tree};
use format::{FileType, Inode, Superblock, BLOCK, DIRENT_SIZE, INODE_SIZE, SLOT, SUPER_OFFSET};

const ROOT_INO: u64 = 1;
/// Where file data may start: a multiple of this many bytes.
const DATA_ALIGN: u64 = 2 << 20;
/// Zeros after the last file's data.
const TAIL_PAD: u64 = 1 << 20;

/// Why a layer has no erofs image.
#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error("xattr {name:?} cannot be stored in erofs (only user., trusted., security. and POSIX ACLs; at most 255-byte names and 64 KiB values)")]
    Xattr { name: String },
    #[error("inode {ino}'s xattrs take more than a block")]
    XattrsTooLarge { ino: u64 },
    #[error("the layer's image would need {blocks} blocks; erofs addresses 2^32")]
    TooLarge { blocks: u64 },
    #[error("the tree has no root directory")]
    NoRoot,
    #[error("name {name:?} is longer than erofs's 255 bytes")]
    NameTooLong { name: String },
    #[error("symlink target of inode {ino} is longer than a block")]
    SymlinkTooLong { ino: u64 },
}

/// A regular file's data in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// The image offset of its first byte (block-aligned).
    pub offset: u64,
    pub size: u64,
    /// Its entry in the layer index (what `RemoteLayer::read_file` takes).
    pub entry: usize,
}

/// A layer's erofs image: metadata in memory, file data where the layer keeps it.
#[derive(Debug, Clone)]
pub struct ErofsImage {
    /// The image's first bytes: superblock, inodes, directory and symlink blocks.
    meta: Vec<u8>,
    /// Regular files' data, by offset.
    extents: Vec<Extent>,
    size: u64,
}

impl ErofsImage {
    /// The image of `tree`.
    pub fn build(tree: &Tree) -> Result<Self, ErofsError> {
        let order = walk(tree)?;
        let nids = place_inodes(tree, &order)?;
        let mut layout = Layout::new(nids.end);
        // Directory and symlink blocks first (they are metadata the guest reads at once),
        // then file data.
        let mut data_of: HashMap<u64, (u64, u64)> = HashMap::new();
        for &ino in &order {
            let node = tree.get(ino).ok_or(ErofsError::NoRoot)?;
            let bytes = match node.attr.kind {
                FuseType::Directory => directory(tree, ino, node, &nids.of)?,
                FuseType::Symlink => {
                    let target = node.symlink.clone().unwrap_or_default();
                    if target.len() as u64 >= BLOCK {
                        return Err(ErofsError::SymlinkTooLong { ino });
                    }
                    target
                }
                _ => continue,
            };
            let block = layout.append(&bytes);
            data_of.insert(ino, (block, bytes.len() as u64));
        }
        // File data starts far from the metadata: a kernel reading metadata through the
        // block device's page cache may read whole large folios (up to 2 MiB), which must
        // not reach the first files' data (a fetch nobody asked for).
        layout.skip_to(DATA_ALIGN / BLOCK);
        let mut extents = Vec::new();
        for &ino in &order {
            let node = tree.get(ino).ok_or(ErofsError::NoRoot)?;
            if let (FuseType::RegularFile, Some(entry)) = (node.attr.kind, node.entry) {
                let block = layout.reserve(node.attr.size);
                if node.attr.size > 0 {
                    extents.push(Extent {
                        offset: block * BLOCK,
                        size: node.attr.size,
                        entry,
                    });
                }
                data_of.insert(ino, (block, node.attr.size));
            }
        }
        // And the image ends well after the last file: partition scans and signature
        // probes (the kernel on a new disk, blkid) read a device's last sectors.
        layout.skip_to(1);
        layout.reserve(TAIL_PAD);
        let blocks = layout.blocks();
        let blocks32 = u32::try_from(blocks).map_err(|_| ErofsError::TooLarge { blocks })?;
        for (i, &ino) in order.iter().enumerate() {
            let node = tree.get(ino).ok_or(ErofsError::NoRoot)?;
            let (block, size) = data_of.get(&ino).copied().unwrap_or((0, 0));
            let block = u32::try_from(block).map_err(|_| ErofsError::TooLarge { blocks })?;
            let (xattrs, xattr_count) = xattrs_of(node)?;
            let inode = inode(node, i as u32 + 1, block, size, xattr_count);
            let at = (nids.of[&ino] * SLOT) as usize;
            layout.meta[at..at + INODE_SIZE].copy_from_slice(&inode.encode());
            layout.meta[at + INODE_SIZE..at + INODE_SIZE + xattrs.len()].copy_from_slice(&xattrs);
        }
        let superblock = Superblock {
            root_nid: nids.of[&ROOT_INO] as u16,
            inodes: order.len() as u64,
            blocks: blocks32,
        };
        layout.meta[SUPER_OFFSET..SUPER_OFFSET + format::SUPER_SIZE]
            .copy_from_slice(&superblock.encode());
        Ok(Self {
            meta: layout.meta,
            extents,
            size: blocks * BLOCK,
        })
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Regular files' data, by offset.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Writes the whole image through `write(offset, bytes)`: the metadata, then each
    /// file's data, read through `read_file(entry, offset in the file, len)` in pieces of
    /// at most `piece` bytes. The zeros between are not written: the output must read as
    /// zeros where nothing was written (a new sparse file of [`Self::size`] bytes).
    pub fn write_with<E>(
        &self,
        piece: usize,
        mut read_file: impl FnMut(usize, u64, usize) -> Result<Vec<u8>, E>,
        mut write: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        write(0, &self.meta)?;
        let piece = piece.max(1) as u64;
        for e in &self.extents {
            let mut at = 0;
            while at < e.size {
                let want = (e.size - at).min(piece) as usize;
                let mut bytes = read_file(e.entry, at, want)?;
                // As in `read_at`: a short file reads as zeros, never as the next file.
                bytes.resize(want, 0);
                write(e.offset + at, &bytes)?;
                at += want as u64;
            }
        }
        Ok(())
    }

    /// Reads up to `len` bytes at `offset`: metadata from memory, file data through
    /// `read_file(entry, offset in the file, len)`, zeros between.
    pub fn read_at<E>(
        &self,
        offset: u64,
        len: usize,
        mut read_file: impl FnMut(usize, u64, usize) -> Result<Vec<u8>, E>,
    ) -> Result<Vec<u8>, E> {
        let end = self.size.min(offset.saturating_add(len as u64));
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            if at < self.meta.len() as u64 {
                let stop = end.min(self.meta.len() as u64);
                out.extend_from_slice(&self.meta[at as usize..stop as usize]);
                at = stop;
                continue;
            }
            // The last extent starting at or before `at`.
            let i = self.extents.partition_point(|e| e.offset <= at);
            let extent = i.checked_sub(1).map(|i| &self.extents[i]);
            match extent {
                Some(e) if at < e.offset + e.size => {
                    let stop = end.min(e.offset + e.size);
                    let want = (stop - at) as usize;
                    let mut bytes = read_file(e.entry, at - e.offset, want)?;
                    // A short read of a file the index says is longer: zeros, never
                    // another file's bytes.
                    bytes.resize(want, 0);
                    out.extend_from_slice(&bytes);
                    at = stop;
                }
                _ => {
                    // Padding up to the next extent (or the end).
                    let next = self.extents.get(i).map_or(end, |e| e.offset.min(end));
                    out.resize(out.len() + (next - at) as usize, 0);
                    at = next;
                }
            }
        }
        Ok(out)
    }
}

/// The inodes reachable from the root, breadth first, each once (hard links share one).
fn walk(tree: &Tree) -> Result<Vec<u64>, ErofsError> {
    tree.get(ROOT_INO).ok_or(ErofsError::NoRoot)?;
    let mut order = vec![ROOT_INO];
    let mut seen = std::collections::HashSet::from([ROOT_INO]);
    let mut queue = VecDeque::from([ROOT_INO]);
    while let Some(ino) = queue.pop_front() {
        let Some(node) = tree.get(ino) else { continue };
        for &(_, child) in &node.children {
            if tree.get(child).is_some() && seen.insert(child) {
                order.push(child);
                if tree
                    .get(child)
                    .is_some_and(|c| c.attr.kind == FuseType::Directory)
                {
                    queue.push_back(child);
                }
            }
        }
    }
    Ok(order)
}

/// Where each inode goes: nids, and the end of the inode area.
struct Nids {
    of: HashMap<u64, u64>,
    end: u64,
}

fn place_inodes(tree: &Tree, order: &[u64]) -> Result<Nids, ErofsError> {
    let mut of = HashMap::with_capacity(order.len());
    let mut at = (SUPER_OFFSET + format::SUPER_SIZE) as u64;
    for &ino in order {
        let node = tree.get(ino).ok_or(ErofsError::NoRoot)?;
        let size = (INODE_SIZE + xattrs_of(node)?.0.len()) as u64;
        if size > BLOCK {
            return Err(ErofsError::XattrsTooLarge { ino });
        }
        // An inode and its xattrs stay in one block.
        if at % BLOCK + size > BLOCK {
            at = at.next_multiple_of(BLOCK);
        }
        of.insert(ino, at / SLOT);
        at = (at + size).next_multiple_of(SLOT);
    }
    // The root's nid is 16 bits in the superblock; it is the first inode, so it fits.
    Ok(Nids { of, end: at })
}

/// The image being laid out: metadata bytes, then reserved data blocks.
struct Layout {
    meta: Vec<u8>,
    /// Blocks used so far (metadata and reserved data).
    next_block: u64,
}

impl Layout {
    fn new(inodes_end: u64) -> Self {
        let blocks = inodes_end.div_ceil(BLOCK);
        Self {
            meta: vec![0; (blocks * BLOCK) as usize],
            next_block: blocks,
        }
    }

    /// Appends `bytes` to the metadata from a block boundary; returns the first block.
    fn append(&mut self, bytes: &[u8]) -> u64 {
        let block = self.next_block;
        let blocks = (bytes.len() as u64).div_ceil(BLOCK);
        self.meta.extend_from_slice(bytes);
        self.meta.resize(((block + blocks) * BLOCK) as usize, 0);
        self.next_block += blocks;
        block
    }

    /// Moves the next block to a multiple of `blocks`.
    fn skip_to(&mut self, blocks: u64) {
        self.next_block = self.next_block.next_multiple_of(blocks);
    }

    /// Reserves blocks for `size` bytes of file data; returns the first block.
    fn reserve(&mut self, size: u64) -> u64 {
        let block = self.next_block;
        self.next_block += size.div_ceil(BLOCK);
        block
    }

    fn blocks(&self) -> u64 {
        self.next_block
    }
}

/// A directory's blocks: its entries with "." and "..", sorted by name, packed into
/// blocks; the last block only as long as its entries.
fn directory(
    tree: &Tree,
    ino: u64,
    node: &Node,
    nids: &HashMap<u64, u64>,
) -> Result<Vec<u8>, ErofsError> {
    let parent = if ino == ROOT_INO { ino } else { node.parent };
    let mut entries: Vec<(&[u8], u64, FileType)> = vec![
        (b".", nids[&ino], FileType::Directory),
        (
            b"..",
            nids.get(&parent).copied().unwrap_or(nids[&ino]),
            FileType::Directory,
        ),
    ];
    for (name, child) in &node.children {
        let (Some(nid), Some(child)) = (nids.get(child), tree.get(*child)) else {
            continue;
        };
        // The index refuses longer names already; a longer one would not fit a block.
        if name.len() > MAX_NAME_LEN {
            return Err(ErofsError::NameTooLong { name: name.clone() });
        }
        entries.push((name.as_bytes(), *nid, file_type(child.attr.kind)));
    }
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let mut bytes = Vec::new();
    let mut start = 0;
    while start < entries.len() {
        let mut used = 0;
        let mut end = start;
        while end < entries.len() && used + DIRENT_SIZE + entries[end].0.len() <= BLOCK as usize {
            used += DIRENT_SIZE + entries[end].0.len();
            end += 1;
        }
        if !bytes.is_empty() {
            bytes.resize(bytes.len().next_multiple_of(BLOCK as usize), 0);
        }
        bytes.extend_from_slice(&format::dir_block(&entries[start..end]));
        start = end;
    }
    Ok(bytes)
}

fn file_type(kind: FuseType) -> FileType {
    match kind {
        FuseType::Directory => FileType::Directory,
        FuseType::Symlink => FileType::Symlink,
        FuseType::CharDevice => FileType::CharDevice,
        FuseType::BlockDevice => FileType::BlockDevice,
        FuseType::NamedPipe => FileType::Fifo,
        FuseType::Socket => FileType::Socket,
        FuseType::RegularFile => FileType::Regular,
    }
}

fn type_bits(kind: FuseType) -> u16 {
    let bits = match kind {
        FuseType::Directory => libc::S_IFDIR,
        FuseType::Symlink => libc::S_IFLNK,
        FuseType::CharDevice => libc::S_IFCHR,
        FuseType::BlockDevice => libc::S_IFBLK,
        FuseType::NamedPipe => libc::S_IFIFO,
        FuseType::Socket => libc::S_IFSOCK,
        FuseType::RegularFile => libc::S_IFREG,
    };
    bits as u16
}

fn xattrs_of(node: &Node) -> Result<(Vec<u8>, u16), ErofsError> {
    format::xattr_area(node.xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
        .map_err(|format::UnsupportedXattr(name)| ErofsError::Xattr { name })
}

fn inode(node: &Node, ino: u32, block: u32, size: u64, xattr_count: u16) -> Inode {
    let attr = &node.attr;
    let mtime = attr.mtime.duration_since(UNIX_EPOCH).unwrap_or_default();
    let device = matches!(attr.kind, FuseType::CharDevice | FuseType::BlockDevice);
    Inode {
        mode: type_bits(attr.kind) | (attr.perm & 0o7777),
        size,
        block_or_rdev: if device { attr.rdev } else { block },
        ino,
        uid: attr.uid,
        gid: attr.gid,
        mtime: mtime.as_secs(),
        mtime_nsec: mtime.subsec_nanos(),
        nlink: attr.nlink,
        xattr_count,
    }
}
