//! A [`Tree`] held as plain values, for a user that builds its tree just to pack it (the
//! shim's directory walk) rather than having one already (the snapshotter's TOC tree).

use crate::{Attr, Node, Tree};

/// Inodes by number: inode `n` is `nodes[n - 1]`, the root is inode 1.
#[derive(Debug, Default, Clone)]
pub struct OwnedTree {
    pub nodes: Vec<OwnedNode>,
}

/// One inode of an [`OwnedTree`]; the fields are what [`Node`]'s methods return.
#[derive(Debug, Clone)]
pub struct OwnedNode {
    pub attr: Attr,
    pub parent: u64,
    pub children: Vec<(Vec<u8>, u64)>,
    pub symlink: Option<Vec<u8>>,
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub entry: Option<usize>,
}

impl OwnedTree {
    /// The root's inode number.
    pub const ROOT: u64 = 1;

    /// Adds `node`; returns its inode number.
    pub fn push(&mut self, node: OwnedNode) -> u64 {
        self.nodes.push(node);
        self.nodes.len() as u64
    }

    /// The inode `ino`, to change it while building.
    pub fn get_mut(&mut self, ino: u64) -> Option<&mut OwnedNode> {
        self.nodes
            .get_mut(usize::try_from(ino).ok()?.checked_sub(1)?)
    }
}

impl Tree for OwnedTree {
    type Node = OwnedNode;

    fn root(&self) -> u64 {
        Self::ROOT
    }

    fn get(&self, ino: u64) -> Option<&OwnedNode> {
        self.nodes.get(usize::try_from(ino).ok()?.checked_sub(1)?)
    }
}

impl Node for OwnedNode {
    fn attr(&self) -> Attr {
        self.attr
    }

    fn parent(&self) -> u64 {
        self.parent
    }

    fn children(&self) -> impl Iterator<Item = (&[u8], u64)> + '_ {
        self.children.iter().map(|(n, ino)| (n.as_slice(), *ino))
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
