//! The inode tree of one layer, built once from the TOC. Whiteouts become
//! what overlayfs expects from a lower layer: `.wh.NAME` turns into a 0/0
//! character device `NAME`, `.wh..wh..opq` into `trusted.overlay.opaque=y`.
//!
//! The TOC is untrusted: `trusted.*` xattrs from it are dropped (overlayfs acts on them;
//! containerd's unpacker refuses them too), hard links to directories are refused, and the
//! build never recurses on a path's depth.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use fuser::{FileAttr, FileType, INodeNo};

use super::lower::{DirMeta, LowerLayers};
use crate::estargz::{
    toc::parse_modtime, EntryType, LayerIndex, TocEntry, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK,
    TOC_TAR_NAME,
};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// The xattr overlayfs reads to find opaque directories.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// The xattr namespace a layer may not set (containerd: "admin attributes from archive").
const ADMIN_XATTR_PREFIX: &str = "trusted.";

/// One inode.
#[derive(Debug, Clone)]
pub struct Node {
    pub attr: FileAttr,
    /// Index of the regular file in the layer index, for reads.
    pub entry: Option<usize>,
    pub symlink: Option<Vec<u8>>,
    /// Entries of a directory, sorted by name: looked up by binary search, and listed from
    /// any offset without walking the entries before it.
    pub children: Vec<(String, u64)>,
    pub parent: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl Node {
    /// The inode of the entry `name` of this directory.
    pub fn child(&self, name: &str) -> Option<u64> {
        let at = self
            .children
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()?;
        Some(self.children[at].1)
    }
}

/// All inodes of a layer; inode numbers are indices + 1.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
    /// Directory entries while building; moved into each node's sorted `children` at the end.
    building: HashMap<u64, BTreeMap<String, u64>>,
    /// Where directories the layer implies get their attributes.
    lowers: LowerLayers,
}

impl Tree {
    /// Builds the tree from a verified index, alone.
    pub fn build(index: &LayerIndex) -> Tree {
        Self::build_over(index, LowerLayers::default())
    }

    /// Builds the tree of a layer that sits over `lowers`.
    pub fn build_over(index: &LayerIndex, lowers: LowerLayers) -> Tree {
        let mut tree = Tree {
            nodes: vec![dir_node(INodeNo::ROOT.0, INodeNo::ROOT.0, None)],
            building: HashMap::new(),
            lowers,
        };
        let mut dropped_xattrs = 0usize;
        let mut by_path: HashMap<String, u64> = HashMap::new();
        by_path.insert(String::new(), INodeNo::ROOT.0);
        let mut hardlinks: Vec<(usize, &TocEntry)> = Vec::new();

        for (idx, e) in index.entries.iter().enumerate() {
            // Landmarks and the TOC are format artifacts, not image content.
            if matches!(
                e.name.as_str(),
                PREFETCH_LANDMARK | NO_PREFETCH_LANDMARK | TOC_TAR_NAME
            ) {
                continue;
            }
            if e.name.is_empty() {
                // The root itself: take its attributes.
                apply_meta(&mut tree.nodes[0].attr, e);
                continue;
            }
            let (parent_path, base) = e.name.rsplit_once('/').unwrap_or(("", e.name.as_str()));
            let parent = tree.ensure_dir(&mut by_path, parent_path);
            if base == OPAQUE_WHITEOUT {
                tree.node_mut(parent)
                    .xattrs
                    .insert(OPAQUE_XATTR.to_string(), b"y".to_vec());
                continue;
            }
            dropped_xattrs += e
                .xattrs
                .keys()
                .filter(|k| k.starts_with(ADMIN_XATTR_PREFIX))
                .count();
            if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
                let ino = tree.push(
                    parent,
                    hidden,
                    whiteout_node(tree.nodes.len() as u64 + 1, parent),
                );
                by_path.insert(join(parent_path, hidden), ino);
                continue;
            }
            if e.kind == EntryType::Hardlink {
                hardlinks.push((idx, e));
                continue;
            }
            if e.kind == EntryType::Dir {
                let ino = tree.ensure_dir(&mut by_path, &e.name);
                let node = tree.node_mut(ino);
                apply_meta(&mut node.attr, e);
                node.xattrs.extend(decode_xattrs(e));
                continue;
            }
            let ino = tree.nodes.len() as u64 + 1;
            let mut node = file_node(ino, parent, e);
            if e.kind == EntryType::Reg {
                node.entry = Some(idx);
            }
            let ino = tree.push(parent, base, node);
            by_path.insert(e.name.clone(), ino);
        }

        for (_, e) in hardlinks {
            let Some(&target) = by_path.get(&e.link_name) else {
                tracing::warn!(name = %e.name, target = %e.link_name, "hard link to a missing file; skipped");
                continue;
            };
            // A directory with two parents is a loop for every tree walker.
            if tree.node_mut(target).attr.kind == FileType::Directory {
                tracing::warn!(name = %e.name, target = %e.link_name, "hard link to a directory; skipped");
                continue;
            }
            let (parent_path, base) = e.name.rsplit_once('/').unwrap_or(("", e.name.as_str()));
            let parent = tree.ensure_dir(&mut by_path, parent_path);
            tree.link(parent, base, target);
            tree.node_mut(target).attr.nlink += 1;
        }
        if dropped_xattrs > 0 {
            tracing::warn!(
                count = dropped_xattrs,
                "layer sets trusted.* xattrs; dropped (admin attributes are not taken from images)"
            );
        }
        tree.finish();
        tree
    }

    /// Moves each directory's entries into its sorted list and counts its links.
    fn finish(&mut self) {
        let building = std::mem::take(&mut self.building);
        for (ino, entries) in building {
            self.node_mut(ino).children = entries.into_iter().collect();
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].attr.kind != FileType::Directory {
                continue;
            }
            let subdirs = self.nodes[i]
                .children
                .iter()
                .filter(|(_, c)| self.nodes[(*c - 1) as usize].attr.kind == FileType::Directory)
                .count();
            self.nodes[i].attr.nlink = 2 + subdirs as u32;
        }
    }

    /// The node for an inode number.
    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(ino.checked_sub(1)? as usize)
    }

    /// Child of a directory by name.
    pub fn lookup(&self, parent: u64, name: &str) -> Option<&Node> {
        self.get(self.get(parent)?.child(name)?)
    }

    /// Number of inodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree is only the root.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    fn node_mut(&mut self, ino: u64) -> &mut Node {
        &mut self.nodes[(ino - 1) as usize]
    }

    fn push(&mut self, parent: u64, name: &str, node: Node) -> u64 {
        let ino = self.nodes.len() as u64 + 1;
        self.nodes.push(Node {
            attr: FileAttr {
                ino: INodeNo(ino),
                ..node.attr
            },
            ..node
        });
        self.link(parent, name, ino);
        ino
    }

    fn link(&mut self, parent: u64, name: &str, ino: u64) {
        self.building
            .entry(parent)
            .or_default()
            .insert(name.to_string(), ino);
    }

    fn is_dir(&self, ino: u64) -> bool {
        self.nodes[(ino - 1) as usize].attr.kind == FileType::Directory
    }

    /// The directory at `path`, creating it and its parents when the layer has no
    /// explicit entry for them. A loop, not recursion: a path's depth is the layer's to
    /// choose.
    fn ensure_dir(&mut self, by_path: &mut HashMap<String, u64>, path: &str) -> u64 {
        if let Some(&ino) = by_path.get(path) {
            if self.is_dir(ino) {
                return ino;
            }
        }
        // The deepest existing directory on the path, then create each one below it.
        let mut missing: Vec<&str> = Vec::new();
        let mut parent = INodeNo::ROOT.0;
        let mut cursor = path;
        while !cursor.is_empty() {
            if let Some(&ino) = by_path.get(cursor) {
                if self.is_dir(ino) {
                    parent = ino;
                    break;
                }
            }
            missing.push(cursor);
            cursor = cursor.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
        }
        for dir_path in missing.into_iter().rev() {
            let base = dir_path
                .rsplit_once('/')
                .map(|(_, b)| b)
                .unwrap_or(dir_path);
            let ino = self.nodes.len() as u64 + 1;
            let mut node = dir_node(ino, parent, None);
            if let Some(lower) = self.lowers.dir(dir_path) {
                apply_lower(&mut node, lower);
            }
            parent = self.push(parent, base, node);
            by_path.insert(dir_path.to_string(), parent);
        }
        parent
    }
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// An inode's attributes with only its number, kind and mode set (owner root, epoch times).
pub(super) fn base_attr(ino: u64, kind: FileType, perm: u16) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn dir_node(ino: u64, parent: u64, e: Option<&TocEntry>) -> Node {
    let mut attr = base_attr(ino, FileType::Directory, 0o755);
    // What ext4 and overlayfs report; tools compare it.
    attr.size = 4096;
    attr.blocks = 8;
    if let Some(e) = e {
        apply_meta(&mut attr, e);
    }
    Node {
        attr,
        entry: None,
        symlink: None,
        children: Vec::new(),
        parent,
        xattrs: BTreeMap::new(),
    }
}

fn whiteout_node(ino: u64, parent: u64) -> Node {
    Node {
        attr: base_attr(ino, FileType::CharDevice, 0),
        entry: None,
        symlink: None,
        children: Vec::new(),
        parent,
        xattrs: BTreeMap::new(),
    }
}

fn file_node(ino: u64, parent: u64, e: &TocEntry) -> Node {
    let kind = match e.kind {
        EntryType::Symlink => FileType::Symlink,
        EntryType::Char => FileType::CharDevice,
        EntryType::Block => FileType::BlockDevice,
        EntryType::Fifo => FileType::NamedPipe,
        _ => FileType::RegularFile,
    };
    let mut attr = base_attr(ino, kind, 0o644);
    apply_meta(&mut attr, e);
    if kind == FileType::RegularFile {
        attr.size = e.size.max(0) as u64;
        attr.blocks = attr.size.div_ceil(512);
    }
    let mut symlink = None;
    if kind == FileType::Symlink {
        attr.size = e.link_name.len() as u64;
        symlink = Some(e.link_name.as_bytes().to_vec());
    }
    if matches!(kind, FileType::CharDevice | FileType::BlockDevice) {
        let (major, minor) = (e.dev_major as u32, e.dev_minor as u32);
        // Linux's new_encode_dev.
        attr.rdev = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
    }
    Node {
        attr,
        entry: None,
        symlink,
        children: Vec::new(),
        parent,
        xattrs: decode_xattrs(e),
    }
}

fn apply_meta(attr: &mut FileAttr, e: &TocEntry) {
    attr.perm = (e.mode & 0o7777) as u16;
    attr.uid = e.uid as u32;
    attr.gid = e.gid as u32;
    if let Some(secs) = parse_modtime(&e.modtime) {
        let t = if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH
        };
        attr.mtime = t;
        attr.atime = t;
        attr.ctime = t;
    } else {
        attr.mtime = SystemTime::UNIX_EPOCH;
    }
}

/// A lower layer's directory attributes on a directory this layer only implies. Its
/// `trusted.*` xattrs (an opaque marker) stay below: this layer did not say so.
fn apply_lower(node: &mut Node, lower: DirMeta) {
    node.attr.perm = lower.perm;
    node.attr.uid = lower.uid;
    node.attr.gid = lower.gid;
    node.attr.mtime = lower.mtime;
    node.attr.atime = lower.mtime;
    node.attr.ctime = lower.mtime;
    node.xattrs = lower
        .xattrs
        .into_iter()
        .filter(|(k, _)| !k.starts_with(ADMIN_XATTR_PREFIX))
        .collect();
}

fn decode_xattrs(e: &TocEntry) -> BTreeMap<String, Vec<u8>> {
    e.xattrs
        .iter()
        .filter(|(k, _)| !k.starts_with(ADMIN_XATTR_PREFIX))
        .filter_map(|(k, v)| {
            base64::engine::general_purpose::STANDARD
                .decode(v)
                .ok()
                .map(|bytes| (k.clone(), bytes))
        })
        .collect()
}
