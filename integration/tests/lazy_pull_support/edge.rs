//! Two layers of what a tree listing of plain files misses: xattrs (user.* and a file
//! capability), hard links, a setuid file, a fifo, and in the upper layer whiteouts of a
//! file and of a directory, an opaque directory and a directory whose metadata changes.
//! The lower layer also carries `/edge-list.py`, which lists `/edge` with all of that.

use anyhow::Result;
use tar::{Builder, EntryType, Header};

/// Where the listing script lies in the image (python's `os` reads xattrs; busybox
/// cannot).
pub const EDGE_LIST: &str = "/edge-list.py";

/// Lists every entry under /edge: mode, owner, and for non-directories size, mtime, link
/// count and the first path of its hard-link group, a regular file's sha256, a symlink's
/// target, and every xattr (name and hex value). Directory sizes, link counts and mtimes
/// are the filesystem's own (and runc's mount points change them), so they are left out.
const LIST_SCRIPT: &str = r#"import hashlib, os, stat
first = {}
def show(path):
    st = os.lstat(path)
    fields = [path, oct(st.st_mode), str(st.st_uid), str(st.st_gid)]
    if not stat.S_ISDIR(st.st_mode):
        group = first.setdefault((st.st_dev, st.st_ino), path)
        fields += [str(st.st_size), str(int(st.st_mtime)), "nlink=%d" % st.st_nlink, "group=" + group]
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            fields.append(hashlib.sha256(f.read()).hexdigest())
    if stat.S_ISLNK(st.st_mode):
        fields.append("-> " + os.readlink(path))
    names = sorted(os.listxattr(path, follow_symlinks=False))
    fields += ["%s=%s" % (n, os.getxattr(path, n, follow_symlinks=False).hex()) for n in names]
    print("edge:", " ".join(fields))
show("/edge")
for root, dirs, files in os.walk("/edge"):
    dirs.sort()
    for name in sorted(dirs + files):
        show(os.path.join(root, name))
print("edge: done")
"#;

/// A VFS_CAP_REVISION_2 file capability, effective, permitting CAP_NET_RAW (13).
const NET_RAW_CAPABILITY: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

const MTIME: u64 = 1_700_000_000;

/// One tar entry of a layer.
struct Entry<'a> {
    path: &'a str,
    kind: EntryType,
    mode: u32,
    owner: u64,
    data: &'a [u8],
    link: Option<&'a str>,
    xattrs: &'a [(&'a str, &'a [u8])],
}

impl<'a> Entry<'a> {
    fn new(path: &'a str, kind: EntryType, mode: u32) -> Self {
        Entry {
            path,
            kind,
            mode,
            owner: 0,
            data: &[],
            link: None,
            xattrs: &[],
        }
    }

    fn file(path: &'a str, data: &'a [u8]) -> Self {
        Entry {
            data,
            ..Entry::new(path, EntryType::Regular, 0o644)
        }
    }

    fn dir(path: &'a str, mode: u32) -> Self {
        Entry::new(path, EntryType::Directory, mode)
    }

    fn link_to(self, target: &'a str) -> Self {
        Entry {
            link: Some(target),
            ..self
        }
    }

    fn xattrs(self, xattrs: &'a [(&'a str, &'a [u8])]) -> Self {
        Entry { xattrs, ..self }
    }
}

fn layer(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut tar = Builder::new(Vec::new());
    for e in entries {
        if !e.xattrs.is_empty() {
            let pax: Vec<(String, &[u8])> = e
                .xattrs
                .iter()
                .map(|(name, value)| (format!("SCHILY.xattr.{name}"), *value))
                .collect();
            tar.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))?;
        }
        let mut header = Header::new_ustar();
        header.set_path(e.path)?;
        header.set_entry_type(e.kind);
        header.set_mode(e.mode);
        header.set_uid(e.owner);
        header.set_gid(e.owner);
        header.set_mtime(MTIME);
        header.set_size(e.data.len() as u64);
        if let Some(target) = e.link {
            header.set_link_name(target)?;
        }
        header.set_cksum();
        tar.append(&header, e.data)?;
    }
    Ok(tar.into_inner()?)
}

/// The two layers, lower first (uncompressed tars).
pub fn edge_layers() -> Result<Vec<Vec<u8>>> {
    use EntryType::{Fifo, Link, Symlink};
    let note: &[(&str, &[u8])] = &[("user.spry.note", b"kept")];
    let lower_dir: &[(&str, &[u8])] = &[("user.spry.dir", b"lower")];
    let capability: &[(&str, &[u8])] = &[("security.capability", &NET_RAW_CAPABILITY)];
    let big: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let lower = layer(&[
        Entry::file(EDGE_LIST.trim_start_matches('/'), LIST_SCRIPT.as_bytes()),
        Entry::dir("edge", 0o755),
        Entry::file("edge/keep.txt", b"kept v1\n").xattrs(note),
        Entry::file("edge/gone.txt", b"whited out above\n"),
        Entry::dir("edge/dir", 0o755).xattrs(lower_dir),
        Entry::file("edge/dir/old1", b"hidden by the opaque dir above\n"),
        Entry::file("edge/dir/old2", b"hidden too\n"),
        Entry::dir("edge/olddir", 0o700),
        Entry::file("edge/olddir/inner.txt", b"a whited-out directory's file\n"),
        Entry {
            owner: 1000,
            mode: 0o640,
            ..Entry::file("edge/hard-a", b"three names, one inode\n")
        },
        // A link's header repeats its target's metadata, as tar writers do (containerd's
        // unpack applies a link header's owner to the shared inode).
        Entry {
            owner: 1000,
            ..Entry::new("edge/hard-b", Link, 0o640).link_to("edge/hard-a")
        },
        Entry::dir("edge/sub", 0o755),
        Entry {
            owner: 1000,
            ..Entry::new("edge/sub/hard-c", Link, 0o640).link_to("edge/hard-a")
        },
        Entry {
            mode: 0o755,
            ..Entry::file("edge/cap-bin", b"#!/bin/sh\necho capable\n")
        }
        .xattrs(capability),
        Entry {
            mode: 0o4755,
            ..Entry::file("edge/setuid", b"#!/bin/sh\n")
        },
        Entry::new("edge/fifo", Fifo, 0o600),
        Entry::new("edge/link", Symlink, 0o777).link_to("keep.txt"),
        Entry::file("edge/big.bin", &big),
    ])?;
    let upper_note: &[(&str, &[u8])] = &[("user.spry.note", b"v2")];
    let upper_dir: &[(&str, &[u8])] = &[("user.spry.dir", b"upper")];
    let upper = layer(&[
        // The directory's own metadata changes in this layer.
        Entry::dir("edge", 0o750),
        Entry::file("edge/.wh.gone.txt", b""),
        Entry::file("edge/.wh.olddir", b""),
        // A whiteout of nothing below hides nothing and shows nothing.
        Entry::file("edge/.wh.never-there", b""),
        Entry::file("edge/keep.txt", b"kept v2, replaced above\n").xattrs(upper_note),
        Entry::dir("edge/dir", 0o711).xattrs(upper_dir),
        Entry::file("edge/dir/.wh..wh..opq", b""),
        Entry::file("edge/dir/new1", b"the opaque dir's only file\n"),
        Entry::file("edge/new-a", b"linked in the upper layer\n"),
        Entry::new("edge/new-b", Link, 0o644).link_to("edge/new-a"),
    ])?;
    Ok(vec![lower, upper])
}

/// What a correct listing of the edge layers must show, so that two listings agreeing
/// cannot hide a layer that lost its xattrs, links or whiteouts on the way.
pub fn check_edge_listing(listing: &str) -> Result<()> {
    let lines: Vec<&str> = listing
        .lines()
        .filter(|l| l.starts_with("edge: "))
        .collect();
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    let line_of = |path: &str| {
        lines
            .iter()
            .find(|l| l.split(' ').nth(1) == Some(path))
            .copied()
            .unwrap_or("")
    };
    let wanted = [
        (
            line_of("/edge").contains("0o40750"),
            "/edge is 0750 (upper layer)",
        ),
        (
            line_of("/edge/keep.txt").contains(&format!("user.spry.note={}", hex::encode(b"v2"))),
            "keep.txt has the upper layer's xattr",
        ),
        (!has("/edge/gone.txt"), "gone.txt is whited out"),
        (!has("/edge/olddir"), "olddir is whited out"),
        (!has("never-there") && !has(".wh."), "no whiteout shows"),
        (
            !has("/edge/dir/old1") && has("/edge/dir/new1"),
            "dir is opaque",
        ),
        (
            line_of("/edge/dir").contains(&format!("user.spry.dir={}", hex::encode(b"upper")))
                && !line_of("/edge/dir").contains("overlay"),
            "dir has the upper xattr only",
        ),
        (
            line_of("/edge/sub/hard-c").contains("nlink=3 group=/edge/hard-a")
                && line_of("/edge/hard-b").contains("nlink=3 group=/edge/hard-a")
                && line_of("/edge/hard-a").contains(" 1000 1000 "),
            "hard-a, hard-b, sub/hard-c are one inode, owned by 1000",
        ),
        (
            line_of("/edge/new-b").contains("nlink=2 group=/edge/new-a"),
            "new-a, new-b are one inode",
        ),
        (
            line_of("/edge/cap-bin").contains(&format!(
                "security.capability={}",
                hex::encode(NET_RAW_CAPABILITY)
            )),
            "cap-bin has its file capability",
        ),
        (
            line_of("/edge/setuid").contains("0o104755"),
            "setuid is setuid",
        ),
        (line_of("/edge/fifo").contains("0o10600"), "fifo is a fifo"),
        (
            line_of("/edge/link").contains("-> keep.txt"),
            "link is a symlink",
        ),
        (has("edge: done"), "the listing ran to its end"),
    ];
    let failed: Vec<&str> = wanted
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, what)| *what)
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "the edge listing is wrong: not {failed:?}:\n{}",
        lines.join("\n")
    );
    Ok(())
}
