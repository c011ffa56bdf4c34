//! The inode tree of one layer, built once from the TOC. Whiteouts become
//! what overlayfs expects from a lower layer: `.wh.NAME` turns into a 0/0
//! character device `NAME`, `.wh..wh..opq` into `trusted.overlay.opaque=y`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use fuser::{FileAttr, FileType, INodeNo};

use crate::estargz::{
    toc::parse_modtime, EntryType, LayerIndex, TocEntry, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK,
    TOC_TAR_NAME,
};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// The xattr overlayfs reads to find opaque directories.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// One inode.
#[derive(Debug, Clone)]
pub struct Node {
    pub attr: FileAttr,
    /// Index of the regular file in the layer index, for reads.
    pub entry: Option<usize>,
    pub symlink: Option<Vec<u8>>,
    pub children: BTreeMap<String, u64>,
    pub parent: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// All inodes of a layer; inode numbers are indices + 1.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// Builds the tree from a verified index.
    pub fn build(index: &LayerIndex) -> Tree {
        let mut tree = Tree {
            nodes: vec![dir_node(INodeNo::ROOT.0, INodeNo::ROOT.0, None)],
        };
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
            let (parent_path, base) = e.name.rsplit_once('/').unwrap_or(("", e.name.as_str()));
            let parent = tree.ensure_dir(&mut by_path, parent_path);
            tree.node_mut(parent)
                .children
                .insert(base.to_string(), target);
            tree.node_mut(target).attr.nlink += 1;
        }
        let dir_links: Vec<(u64, u32)> = tree
            .nodes
            .iter()
            .map(|n| {
                let subdirs = n
                    .children
                    .values()
                    .filter(|c| tree.nodes[(**c - 1) as usize].attr.kind == FileType::Directory)
                    .count();
                (n.attr.ino.0, 2 + subdirs as u32)
            })
            .collect();
        for (ino, links) in dir_links {
            let node = tree.node_mut(ino);
            if node.attr.kind == FileType::Directory {
                node.attr.nlink = links;
            }
        }
        tree
    }

    /// The node for an inode number.
    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(ino.checked_sub(1)? as usize)
    }

    /// Child of a directory by name.
    pub fn lookup(&self, parent: u64, name: &str) -> Option<&Node> {
        let child = *self.get(parent)?.children.get(name)?;
        self.get(child)
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
        self.node_mut(parent).children.insert(name.to_string(), ino);
        ino
    }

    /// The directory at `path`, creating it and its parents when the layer
    /// has no explicit entry for them.
    fn ensure_dir(&mut self, by_path: &mut HashMap<String, u64>, path: &str) -> u64 {
        if let Some(&ino) = by_path.get(path) {
            if self.nodes[(ino - 1) as usize].attr.kind == FileType::Directory {
                return ino;
            }
        }
        let (parent_path, base) = path.rsplit_once('/').unwrap_or(("", path));
        let parent = self.ensure_dir(by_path, parent_path);
        let ino = self.nodes.len() as u64 + 1;
        let ino = self.push(parent, base, dir_node(ino, parent, None));
        by_path.insert(path.to_string(), ino);
        ino
    }
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

fn base_attr(ino: u64, kind: FileType, perm: u16) -> FileAttr {
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
        children: BTreeMap::new(),
        parent,
        xattrs: BTreeMap::new(),
    }
}

fn whiteout_node(ino: u64, parent: u64) -> Node {
    Node {
        attr: base_attr(ino, FileType::CharDevice, 0),
        entry: None,
        symlink: None,
        children: BTreeMap::new(),
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
        children: BTreeMap::new(),
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

fn decode_xattrs(e: &TocEntry) -> BTreeMap<String, Vec<u8>> {
    e.xattrs
        .iter()
        .filter_map(|(k, v)| {
            base64::engine::general_purpose::STANDARD
                .decode(v)
                .ok()
                .map(|bytes| (k.clone(), bytes))
        })
        .collect()
}
