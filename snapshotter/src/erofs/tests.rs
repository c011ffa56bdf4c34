//! The image against the kernel: it is loop-mounted (root needed, fails without) and
//! must show the same tree as the layer's FUSE view, which `fs/tests.rs` checks against
//! the source tar. Also the reads' mapping, without mounting.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::cache::ChunkCache;
use crate::layer::RemoteLayer;
use crate::testutil::{build, convert, open_layer, pattern, MemBlob, MountedLayer};
use spry_erofs::BLOCK;

/// The sample layer (`testutil::sample_tar`) to read, its files, and its FUSE mount.
fn sample() -> (Arc<RemoteLayer>, Files, MountedLayer) {
    let (blob, out, _, files) = build(&[]);
    let (layer, fuse) = layer_of(blob, out);
    (layer, files, fuse)
}

type Files = Vec<(String, Vec<u8>)>;

/// `blob` as a layer to read, and mounted through FUSE.
fn layer_of(blob: Vec<u8>, out: crate::estargz::WriterOutput) -> (Arc<RemoteLayer>, MountedLayer) {
    let mem = MemBlob::new(blob);
    let fuse = MountedLayer::new(mem.clone(), &out.toc_digest, "erofs-test");
    let cache = Arc::new(ChunkCache::open(&fuse.dir.path().join("cache2")).unwrap());
    let layer = open_layer(mem, &out.toc_digest, cache);
    (layer, fuse)
}

fn whole_image(image: &ErofsImage, layer: &RemoteLayer) -> Vec<u8> {
    image
        .read_at(0, image.size() as usize, |entry, at, len| {
            layer.read_file(entry, at, len)
        })
        .unwrap()
}

#[test]
fn reads_map_to_the_files_and_zeros_between() {
    let (layer, files, _fuse) = sample();
    let tree = Tree::build(layer.index());
    let image = ErofsImage::build(&tree).unwrap();
    assert_eq!(image.size() % BLOCK, 0);
    let bytes = whole_image(&image, &layer);
    assert_eq!(bytes.len() as u64, image.size());
    assert_eq!(&bytes[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
    // Every non-empty file's bytes are at its extent, whole and alone.
    let mut found = 0;
    for e in image.extents() {
        let data = layer.read_file(e.entry, 0, e.size as usize).unwrap();
        let at = e.offset as usize;
        assert_eq!(&bytes[at..at + data.len()], &data[..]);
        let padded = (e.offset + e.size).next_multiple_of(BLOCK) as usize;
        assert!(bytes[at + data.len()..padded].iter().all(|b| *b == 0));
        found += 1;
    }
    let non_empty = files.iter().filter(|(_, d)| !d.is_empty()).count();
    assert_eq!(found, non_empty);
    // Reads that straddle metadata, files and padding equal the whole image's bytes.
    for (offset, len) in [(0, 10), (4000, 9000), (image.size() - 5000, 9000), (1, 1)] {
        let part = image
            .read_at(offset, len, |entry, at, n| layer.read_file(entry, at, n))
            .unwrap();
        let end = (offset as usize + len).min(bytes.len());
        assert_eq!(part, &bytes[offset as usize..end], "{offset}+{len}");
    }
    // A file whose reads come up short reads as zeros there, not as the next file.
    let short = image
        .read_at(image.extents()[0].offset, 8, |_, _, _| {
            Ok::<_, ()>(vec![1, 2])
        })
        .unwrap();
    assert_eq!(short, [1, 2, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn written_out_the_image_is_the_bytes_it_reads_as() {
    let (layer, _, _fuse) = sample();
    let image = ErofsImage::build(&Tree::build(layer.index())).unwrap();
    let mut out = vec![0u8; image.size() as usize];
    let mut writes = 0;
    // Small pieces: files span several of them.
    image
        .write_with(
            700,
            |entry, at, len| layer.read_file(entry, at, len),
            |offset, bytes| {
                out[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
                writes += 1;
                Ok::<_, crate::layer::LayerError>(())
            },
        )
        .unwrap();
    assert_eq!(out, whole_image(&image, &layer));
    assert!(writes > image.extents().len(), "{writes} writes");
}

#[test]
fn the_same_tree_gives_the_same_image() {
    let (layer, _, _fuse) = sample();
    let a = ErofsImage::build(&Tree::build(layer.index())).unwrap();
    let b = ErofsImage::build(&Tree::build(layer.index())).unwrap();
    assert_eq!(whole_image(&a, &layer), whole_image(&b, &layer));
}

/// The image, loop-mounted read-only; unmounted on drop.
struct Mounted {
    dir: tempfile::TempDir,
}

impl Mounted {
    fn new(bytes: &[u8]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("layer.erofs");
        std::fs::write(&image, bytes).unwrap();
        Self::file(dir, &image)
    }

    /// Mounts the image file `image`, with `dir` as the scratch directory.
    fn file(dir: tempfile::TempDir, image: &Path) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "erofs mount tests need root"
        );
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "erofs", "-o", "ro,loop"])
            .arg(image)
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -t erofs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.mnt())
            .status();
    }
}

/// What a tree walker sees of one path.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    nlink: u64,
    rdev: u64,
    /// Contents (files) or target (symlinks).
    data: Vec<u8>,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// The first path (in walk order) with the same inode: hard links.
    same_as: String,
}

fn walk_tree(root: &Path) -> BTreeMap<String, Seen> {
    let mut seen = BTreeMap::new();
    let mut first_of_ino: BTreeMap<u64, String> = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let ft = meta.file_type();
        let kind = match () {
            _ if ft.is_dir() => "dir",
            _ if ft.is_symlink() => "symlink",
            _ if ft.is_char_device() => "char",
            _ if ft.is_block_device() => "block",
            _ if ft.is_fifo() => "fifo",
            _ => "file",
        };
        let data = match kind {
            "file" => std::fs::read(&path).unwrap(),
            "symlink" => std::fs::read_link(&path)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes(),
            _ => Vec::new(),
        };
        let mut xattrs = BTreeMap::new();
        for name in crate::sys::listxattr(&path).unwrap_or_default() {
            let value = crate::sys::getxattr(&path, &name)
                .unwrap_or_else(|e| panic!("getxattr {} {name}: {e}", path.display()));
            xattrs.insert(name, value);
        }
        let same_as = first_of_ino
            .entry(meta.ino())
            .or_insert_with(|| rel.clone())
            .clone();
        if kind == "dir" {
            for entry in std::fs::read_dir(&path).unwrap() {
                let name = entry.unwrap().file_name().into_string().unwrap();
                stack.push(if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                });
            }
        }
        seen.insert(
            rel,
            Seen {
                kind,
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: meta.mtime(),
                nlink: if kind == "dir" { 0 } else { meta.nlink() },
                rdev: meta.rdev(),
                data,
                xattrs,
                same_as,
            },
        );
    }
    seen
}

/// `layer`'s image loop-mounted, and the tree walks of its FUSE mount (`want`) and of
/// the image (`got`), which must be the same.
fn mounted_like_fuse(
    layer: &RemoteLayer,
    fuse: &MountedLayer,
) -> (Mounted, BTreeMap<String, Seen>, BTreeMap<String, Seen>) {
    let image = ErofsImage::build(&Tree::build(layer.index())).unwrap();
    let mounted = Mounted::new(&whole_image(&image, layer));
    let want = walk_tree(&fuse.mnt());
    let got = walk_tree(&mounted.mnt());
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (path, seen) in &want {
        assert_eq!(&got[path], seen, "{path:?}");
    }
    (mounted, want, got)
}

#[test]
fn the_kernel_mounts_the_image_and_sees_the_layers_tree() {
    let (layer, files, fuse) = sample();
    let (mounted, _, _) = mounted_like_fuse(&layer, &fuse);
    // And the sample's interesting parts are really there.
    for (path, data) in &files {
        assert_eq!(&std::fs::read(mounted.mnt().join(path)).unwrap(), data);
    }
    let opaque = crate::sys::getxattr(&mounted.mnt().join("opq"), crate::fs::OPAQUE_XATTR);
    assert_eq!(opaque.ok().as_deref(), Some(&b"y"[..]));
    assert!(std::fs::symlink_metadata(mounted.mnt().join("etc/removed"))
        .unwrap()
        .file_type()
        .is_char_device());
}

/// A layer with what the sample lacks: a directory over several blocks, names that sort
/// before ".", xattrs, devices, a fifo, owners, setuid, a long symlink.
fn rich_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(2000);
        h.set_mtime(1_600_000_000);
        h.set_size(0);
        h
    };
    let mut h = header(tar::EntryType::Directory, 0o750);
    b.append_data(&mut h, "many/", std::io::empty()).unwrap();
    for i in 0..400 {
        let name = format!("many/{i:04}-{}", "n".repeat(i % 60));
        let data = pattern(i * 37 % 5000, i as u8);
        let mut h = header(tar::EntryType::Regular, 0o640);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    for name in ["many/-dash", "many/#hash", "many/+plus"] {
        let mut h = header(tar::EntryType::Regular, 0o4755);
        h.set_size(3);
        b.append_data(&mut h, name, &b"abc"[..]).unwrap();
    }
    let mut h = header(tar::EntryType::Regular, 0o755);
    b.append_pax_extensions([
        ("SCHILY.xattr.user.note", &b"hello"[..]),
        // v2, effective, cap_net_bind_service permitted (the kernel checks the format).
        (
            "SCHILY.xattr.security.capability",
            &[1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
        ),
    ])
    .unwrap();
    h.set_size(4);
    b.append_data(&mut h, "tagged", &b"data"[..]).unwrap();
    let mut h = header(tar::EntryType::Char, 0o666);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "null", std::io::empty()).unwrap();
    let mut h = header(tar::EntryType::Block, 0o660);
    h.set_device_major(8).unwrap();
    h.set_device_minor(300).unwrap();
    b.append_data(&mut h, "disk", std::io::empty()).unwrap();
    let mut h = header(tar::EntryType::Fifo, 0o600);
    b.append_data(&mut h, "pipe", std::io::empty()).unwrap();
    let mut h = header(tar::EntryType::Symlink, 0o777);
    b.append_link(&mut h, "far", "many/".repeat(40)).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn big_directories_xattrs_devices_and_owners_survive() {
    let (blob, out) = convert(&rich_tar(), &[]);
    let (layer, fuse) = layer_of(blob, out);
    let (mounted, want, got) = mounted_like_fuse(&layer, &fuse);
    assert!(want.len() > 400, "the layer lost entries: {}", want.len());
    let tagged = &got["tagged"];
    assert_eq!(tagged.xattrs["user.note"], b"hello");
    assert!(tagged.xattrs.contains_key("security.capability"));
    assert_eq!(got["disk"].rdev, nix::sys::stat::makedev(8, 300));
    assert_eq!(got["many/-dash"].mode & 0o7777, 0o4755);
    // Lookups (not only listings) find names in every directory block.
    for i in [0, 1, 137, 200, 399] {
        let name = format!("many/{i:04}-{}", "n".repeat(i % 60));
        assert!(mounted.mnt().join(&name).exists(), "{name}");
    }
    assert!(mounted.mnt().join("many/#hash").exists());
}

#[test]
fn served_through_fuse_the_image_fetches_only_what_is_read() {
    let (blob, out, _, files) = build(&[]);
    let blob_size = blob.len() as u64;
    let mem = MemBlob::new(blob);
    let scratch = tempfile::tempdir().unwrap();
    let cache = Arc::new(ChunkCache::open(&scratch.path().join("cache")).unwrap());
    let layer = open_layer(mem, &out.toc_digest, cache);
    let toc = layer
        .stats()
        .bytes_fetched
        .load(std::sync::atomic::Ordering::Relaxed);
    let image = ErofsImage::build(&Tree::build(layer.index())).unwrap();
    let served = scratch.path().join("image");
    std::fs::create_dir(&served).unwrap();
    let (opens, reads) = (scratch.path().join("opens"), scratch.path().join("reads"));
    let recorder = crate::fs::AccessRecorder::create(&opens, &reads).unwrap();
    let options = crate::fs::ServeOptions {
        readahead: 16 << 10,
        recorder: Some(Arc::new(recorder)),
        ..Default::default()
    };
    let fuse =
        crate::fs::ImageMount::mount(layer.clone(), image.clone(), &served, "t", &options).unwrap();
    let meta = std::fs::metadata(fuse.image_path()).unwrap();
    assert_eq!(meta.len(), image.size());
    // The mount's readahead is what it was given: the guest reads the image's disk with it.
    let dev = std::os::unix::fs::MetadataExt::dev(&meta);
    let bdi = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    assert_eq!(std::fs::read_to_string(&bdi).unwrap().trim(), "16", "{bdi}");
    let mounted = Mounted::file(tempfile::tempdir().unwrap(), &fuse.image_path());
    // Mounting and listing the tree read metadata only: nothing is fetched past the TOC
    // (which opening the layer fetched).
    let fetched = || {
        layer
            .stats()
            .bytes_fetched
            .load(std::sync::atomic::Ordering::Relaxed)
            - toc
    };
    let listed = walk_dir_names(&mounted.mnt());
    assert!(listed.contains(&"usr/bin/big".to_string()), "{listed:?}");
    assert_eq!(fetched(), 0, "listing fetched file data");
    // One small file: its chunks, not the layer.
    let hostname = &files.iter().find(|(p, _)| p == "etc/hostname").unwrap().1;
    assert_eq!(
        &std::fs::read(mounted.mnt().join("etc/hostname")).unwrap(),
        hostname
    );
    assert!(
        fetched() > 0 && fetched() < blob_size / 2,
        "fetched {} of {blob_size}",
        fetched()
    );
    // The VM's read is recorded as the file's: opened, and its bytes from offset 0.
    assert_eq!(std::fs::read_to_string(&opens).unwrap(), "etc/hostname\n");
    assert_eq!(
        std::fs::read_to_string(&reads).unwrap(),
        format!("0 {} etc/hostname\n", hostname.len())
    );
    for (path, data) in &files {
        assert_eq!(
            &std::fs::read(mounted.mnt().join(path)).unwrap(),
            data,
            "{path}"
        );
    }
    drop(mounted);
    fuse.unmount().unwrap();
}

fn walk_dir_names(root: &Path) -> Vec<String> {
    let mut names = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            names.push(path.strip_prefix(root).unwrap().display().to_string());
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            }
        }
    }
    names
}

#[test]
fn a_layer_with_an_xattr_erofs_cannot_hold_gets_no_image() {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(1);
    b.append_pax_extensions([("SCHILY.xattr.system.odd", &b"v"[..])])
        .unwrap();
    b.append_data(&mut h, "f", &b"x"[..]).unwrap();
    let (blob, out) = convert(&b.into_inner().unwrap(), &[]);
    let (layer, _fuse) = layer_of(blob, out);
    let err = ErofsImage::build(&Tree::build(layer.index())).unwrap_err();
    assert!(
        matches!(&err, ErofsError::Xattr { name } if name == "system.odd"),
        "{err}"
    );
}
