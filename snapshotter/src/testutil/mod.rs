//! Test helpers: sample layers and an in-memory blob with fault injection.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::convert::{convert_tar, LayerConvertOptions};
use crate::layer::{BlobFetcher, FetchError};

/// An in-memory blob that can be told to fail or to corrupt bytes.
pub struct MemBlob {
    pub data: Vec<u8>,
    pub down: AtomicBool,
    pub calls: AtomicUsize,
}

impl MemBlob {
    pub fn new(data: Vec<u8>) -> Arc<Self> {
        Arc::new(MemBlob {
            data,
            down: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        })
    }
}

impl BlobFetcher for MemBlob {
    fn size(&self) -> Result<u64, FetchError> {
        Ok(self.data.len() as u64)
    }
    fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>, FetchError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(FetchError::Io {
                source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "registry down"),
            });
        }
        Ok(self.data[offset as usize..(offset + len) as usize].to_vec())
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// A layer tar with the kinds of entries images have.
pub fn sample_tar() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut b = tar::Builder::new(Vec::new());
    let mut files = Vec::new();
    let dir = |b: &mut tar::Builder<Vec<u8>>, p: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, p, std::io::empty()).unwrap();
    };
    dir(&mut b, "usr/");
    dir(&mut b, "usr/bin/");
    dir(&mut b, "etc/");
    let mut add = |b: &mut tar::Builder<Vec<u8>>, p: &str, data: Vec<u8>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, p, &data[..]).unwrap();
        files.push((p.to_string(), data));
    };
    add(&mut b, "etc/hostname", b"spry\n".to_vec());
    add(&mut b, "usr/bin/big", pattern(10_000, 3));
    add(&mut b, "usr/bin/app", pattern(2_500, 9));
    add(&mut b, "etc/empty", Vec::new());
    let long = format!("usr/{}/file", "d".repeat(120));
    add(&mut b, &long, pattern(700, 1));
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "usr/bin/sh", "app").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "usr/bin/app2", "usr/bin/app")
        .unwrap();
    // Whiteouts, as a layer that deletes things carries them.
    dir(&mut b, "opq/");
    for p in ["etc/.wh.removed", "opq/.wh..wh..opq"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        b.append_data(&mut h, p, std::io::empty()).unwrap();
    }
    (b.into_inner().unwrap(), files)
}

/// A converted sample layer: blob, writer output, source tar, regular files.
pub type Built = (
    Vec<u8>,
    crate::estargz::WriterOutput,
    Vec<u8>,
    Vec<(String, Vec<u8>)>,
);

pub fn build(prioritized: &[&str]) -> Built {
    let (tar, files) = sample_tar();
    let (blob, out) = convert(&tar, prioritized);
    (blob, out, tar, files)
}

/// `tar` converted to eStargz (1000-byte chunks): the blob and the writer's output.
pub fn convert(tar: &[u8], prioritized: &[&str]) -> (Vec<u8>, crate::estargz::WriterOutput) {
    let opts = LayerConvertOptions {
        chunk_size: 1000,
        prioritized: prioritized.iter().map(|s| s.to_string()).collect(),
        hot: Default::default(),
    };
    let (out, blob) = convert_tar(tar, Vec::new(), &opts).unwrap();
    (blob, out)
}

/// `blob` opened as a layer over `cache`, one attempt per range.
pub fn open_layer(
    blob: Arc<dyn crate::layer::BlobFetcher>,
    toc_digest: &str,
    cache: Arc<crate::cache::ChunkCache>,
) -> Arc<crate::layer::RemoteLayer> {
    use crate::layer::{RemoteLayer, RetryPolicy};
    let retry = RetryPolicy {
        attempts: 1,
        backoff: std::time::Duration::from_millis(1),
        ..RetryPolicy::default()
    };
    Arc::new(RemoteLayer::open(blob, cache, toc_digest, retry).unwrap())
}

/// `blob` opened as a layer (cache in `dir/cache`, one attempt per range) and mounted at
/// `dir/mnt`.
pub fn mount_blob(
    blob: Arc<dyn crate::layer::BlobFetcher>,
    toc_digest: &str,
    dir: &std::path::Path,
    name: &str,
) -> crate::fs::LayerMount {
    let cache = Arc::new(crate::cache::ChunkCache::open(&dir.join("cache")).unwrap());
    let layer = open_layer(blob, toc_digest, cache);
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    crate::fs::LayerMount::mount(layer, &mnt, name, None).unwrap()
}

/// A layer mounted in a temporary directory (`mnt/`, `cache/`), unmounted when dropped.
pub struct MountedLayer {
    mount: Option<crate::fs::LayerMount>,
    pub dir: tempfile::TempDir,
}

impl MountedLayer {
    pub fn new(blob: Arc<dyn crate::layer::BlobFetcher>, toc_digest: &str, name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mount = mount_blob(blob, toc_digest, dir.path(), name);
        MountedLayer {
            mount: Some(mount),
            dir,
        }
    }

    pub fn mnt(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            m.unmount().unwrap();
        }
    }
}

/// A read-only overlay of `layer` over `base` at `merged` (created), with extra mount
/// `options`, as containerd mounts a container's lower layers.
pub fn overlay_ro(
    merged: &std::path::Path,
    layer: &std::path::Path,
    base: &std::path::Path,
    options: &str,
) {
    std::fs::create_dir(merged).unwrap();
    let mut opts = format!("lowerdir={}:{}", layer.display(), base.display());
    if !options.is_empty() {
        opts.push(',');
        opts.push_str(options);
    }
    nix::mount::mount(
        Some("overlay"),
        merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(opts.as_str()),
    )
    .unwrap();
}

pub mod registry;
pub mod tls;
