//! A lazily pulled layer's erofs image, made from its TOC alone (`spry-erofs` over the
//! layer's inode tree).
//!
//! Why: a Spry pod's containers see their rootfs as block devices in the VM, and packing
//! a lazy layer's files with `mkfs.erofs` reads (so fetches) every byte. Here the image's
//! metadata is computed from the tree the TOC gives, without fetching anything, and each
//! regular file's data sits in its own run of blocks, read through the layer's verified,
//! chunk-cached reads: the guest reading a file through the image fetches that file's
//! chunks and nothing else. An extent's `entry` is the file's index in the layer index
//! (what `RemoteLayer::read_file` takes).

#[cfg(test)]
mod tests;

use fuser::FileType as FuseType;
use spry_erofs::{Attr, Kind};
pub use spry_erofs::{ErofsError, ErofsImage};

use crate::fs::{Node, Tree};

/// The tree's root inode (inode numbers are indices + 1).
const ROOT_INO: u64 = 1;

impl spry_erofs::Tree for Tree {
    type Node = Node;

    fn root(&self) -> u64 {
        ROOT_INO
    }

    fn get(&self, ino: u64) -> Option<&Node> {
        Tree::get(self, ino)
    }
}

impl spry_erofs::Node for Node {
    fn attr(&self) -> Attr {
        let a = &self.attr;
        Attr {
            kind: kind(a.kind),
            perm: a.perm,
            uid: a.uid,
            gid: a.gid,
            mtime: a.mtime,
            nlink: a.nlink,
            rdev: a.rdev,
            size: a.size,
        }
    }

    fn parent(&self) -> u64 {
        self.parent
    }

    fn children(&self) -> impl Iterator<Item = (&[u8], u64)> + '_ {
        self.children.iter().map(|(n, ino)| (n.as_bytes(), *ino))
    }

    fn symlink(&self) -> Option<&[u8]> {
        self.symlink.as_deref()
    }

    fn xattrs(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        self.xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    fn entry(&self) -> Option<usize> {
        self.entry
    }
}

fn kind(kind: FuseType) -> Kind {
    match kind {
        FuseType::Directory => Kind::Directory,
        FuseType::Symlink => Kind::Symlink,
        FuseType::CharDevice => Kind::CharDevice,
        FuseType::BlockDevice => Kind::BlockDevice,
        FuseType::NamedPipe => Kind::Fifo,
        FuseType::Socket => Kind::Socket,
        FuseType::RegularFile => Kind::Regular,
    }
}
