//! An erofs image of a file tree: metadata computed in memory, each regular file's
//! data in its own run of blocks.
//!
//! Two users: Spry's snapshotter makes the image of a lazily pulled layer from its TOC
//! alone (a read of the image at any offset is either metadata, served from memory, or
//! a range of one file, fetched on demand), and the shim packs a layer chain's merged
//! directory (copying each file's data to its extent). Both describe their tree through
//! [`Tree`] and [`Node`]; the image is the same function of the tree either way.
//!
//! Layout: block 0 holds the superblock (at 1024) and the first inodes; inodes follow
//! in breadth-first order (root first), then directory and symlink blocks, then (from
//! the next 2 MiB boundary) the files' data, each file from a block boundary. Sizes and
//! offsets are fixed by the tree, so the same tree always gives the same image.

pub mod format;
mod owned;

use std::collections::{HashMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

pub use format::BLOCK;
use format::{FileType, Inode, Superblock, DIRENT_SIZE, INODE_SIZE, SLOT, SUPER_OFFSET};
pub use owned::{OwnedNode, OwnedTree};

/// erofs's longest name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// What kind of file an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Regular,
    Directory,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

/// An inode's attributes as the image stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub kind: Kind,
    /// Permission bits (with setuid, setgid, sticky).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub nlink: u32,
    /// A device's number as the kernel's `new_encode_dev` packs it.
    pub rdev: u32,
    /// A regular file's size (other kinds' sizes follow from their contents).
    pub size: u64,
}

/// A file tree to pack: inodes by number, the root at [`Tree::root`].
pub trait Tree {
    type Node: Node;
    fn root(&self) -> u64;
    fn get(&self, ino: u64) -> Option<&Self::Node>;
}

/// One inode of a [`Tree`].
pub trait Node {
    fn attr(&self) -> Attr;
    /// The directory it is in (the root's is itself).
    fn parent(&self) -> u64;
    /// A directory's entries: name and inode.
    fn children(&self) -> impl Iterator<Item = (&[u8], u64)> + '_;
    /// A symlink's target.
    fn symlink(&self) -> Option<&[u8]>;
    /// Extended attributes by full name (`user.x`).
    fn xattrs(&self) -> impl Iterator<Item = (&str, &[u8])> + '_;
    /// A regular file's handle for its data, which [`Extent::entry`] gives back.
    fn entry(&self) -> Option<usize>;
}
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
    /// The file's [`Node::entry`].
    pub entry: usize,
}

/// A tree's erofs image: metadata in memory, file data where the tree keeps it.
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
    pub fn build<T: Tree>(tree: &T) -> Result<Self, ErofsError> {
        let order = walk(tree)?;
        let nids = place_inodes(tree, &order)?;
        let mut layout = Layout::new(nids.end);
        // Directory and symlink blocks first (they are metadata the guest reads at once),
        // then file data.
        let mut data_of: HashMap<u64, (u64, u64)> = HashMap::new();
        for &ino in &order {
            let node = tree.get(ino).ok_or(ErofsError::NoRoot)?;
            let bytes = match node.attr().kind {
                Kind::Directory => directory(tree, ino, node, &nids.of)?,
                Kind::Symlink => {
                    let target = node.symlink().unwrap_or_default().to_vec();
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
            let attr = node.attr();
            if let (Kind::Regular, Some(entry)) = (attr.kind, node.entry()) {
                let block = layout.reserve(attr.size);
                if attr.size > 0 {
                    extents.push(Extent {
                        offset: block * BLOCK,
                        size: attr.size,
                        entry,
                    });
                }
                data_of.insert(ino, (block, attr.size));
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
            root_nid: nids.of[&tree.root()] as u16,
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

    /// The image's first bytes (superblock, inodes, directory and symlink blocks); the
    /// rest is the extents' data and zeros.
    pub fn metadata(&self) -> &[u8] {
        &self.meta
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
fn walk<T: Tree>(tree: &T) -> Result<Vec<u64>, ErofsError> {
    let root = tree.root();
    tree.get(root).ok_or(ErofsError::NoRoot)?;
    let mut order = vec![root];
    let mut seen = std::collections::HashSet::from([root]);
    let mut queue = VecDeque::from([root]);
    while let Some(ino) = queue.pop_front() {
        let Some(node) = tree.get(ino) else { continue };
        for (_, child) in node.children() {
            if tree.get(child).is_some() && seen.insert(child) {
                order.push(child);
                if tree
                    .get(child)
                    .is_some_and(|c| c.attr().kind == Kind::Directory)
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

fn place_inodes<T: Tree>(tree: &T, order: &[u64]) -> Result<Nids, ErofsError> {
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
fn directory<T: Tree>(
    tree: &T,
    ino: u64,
    node: &T::Node,
    nids: &HashMap<u64, u64>,
) -> Result<Vec<u8>, ErofsError> {
    let parent = if ino == tree.root() {
        ino
    } else {
        node.parent()
    };
    let mut entries: Vec<(&[u8], u64, FileType)> = vec![
        (b".", nids[&ino], FileType::Directory),
        (
            b"..",
            nids.get(&parent).copied().unwrap_or(nids[&ino]),
            FileType::Directory,
        ),
    ];
    for (name, child) in node.children() {
        let (Some(nid), Some(child)) = (nids.get(&child), tree.get(child)) else {
            continue;
        };
        // A longer name would not fit erofs's directory blocks.
        if name.len() > MAX_NAME_LEN {
            return Err(ErofsError::NameTooLong {
                name: String::from_utf8_lossy(name).into_owned(),
            });
        }
        entries.push((name, *nid, file_type(child.attr().kind)));
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

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Directory => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Fifo => FileType::Fifo,
        Kind::Socket => FileType::Socket,
        Kind::Regular => FileType::Regular,
    }
}

fn type_bits(kind: Kind) -> u16 {
    let bits = match kind {
        Kind::Directory => libc::S_IFDIR,
        Kind::Symlink => libc::S_IFLNK,
        Kind::CharDevice => libc::S_IFCHR,
        Kind::BlockDevice => libc::S_IFBLK,
        Kind::Fifo => libc::S_IFIFO,
        Kind::Socket => libc::S_IFSOCK,
        Kind::Regular => libc::S_IFREG,
    };
    bits as u16
}

fn xattrs_of(node: &impl Node) -> Result<(Vec<u8>, u16), ErofsError> {
    format::xattr_area(node.xattrs())
        .map_err(|format::UnsupportedXattr(name)| ErofsError::Xattr { name })
}

fn inode(node: &impl Node, ino: u32, block: u32, size: u64, xattr_count: u16) -> Inode {
    let attr = node.attr();
    let mtime = attr.mtime.duration_since(UNIX_EPOCH).unwrap_or_default();
    let device = matches!(attr.kind, Kind::CharDevice | Kind::BlockDevice);
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
