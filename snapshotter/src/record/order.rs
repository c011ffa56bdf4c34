//! The recorded file list: first-open order, relative to the rootfs, and how
//! it joins an explicit `--prioritized-files` list.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Files a workload opened, in the order it first opened them.
pub struct OpenOrder {
    root: PathBuf,
    image_files: Option<HashSet<String>>,
    seen: HashSet<String>,
    order: Vec<String>,
}

impl OpenOrder {
    /// Paths are taken relative to `root`. With `image_files`, only files
    /// the image itself has are kept (not what the workload created).
    pub fn new(root: &Path, image_files: Option<HashSet<String>>) -> Self {
        OpenOrder {
            root: root.to_path_buf(),
            image_files,
            seen: HashSet::new(),
            order: Vec::new(),
        }
    }

    /// Takes one opened path (absolute, as `/proc/self/fd` shows it). Paths
    /// outside the root, deleted files, repeats and, when known, files that
    /// are not the image's own are dropped.
    pub fn push(&mut self, opened: &Path) {
        let Ok(rel) = opened.strip_prefix(&self.root) else {
            return;
        };
        let Some(rel) = rel.to_str() else {
            return;
        };
        if rel.is_empty() || rel.ends_with(" (deleted)") {
            return;
        }
        if self
            .image_files
            .as_ref()
            .is_some_and(|files| !files.contains(rel))
        {
            return;
        }
        if self.seen.insert(rel.to_string()) {
            self.order.push(rel.to_string());
        }
    }

    /// The recorded paths, first open first.
    pub fn into_paths(self) -> Vec<String> {
        self.order
    }
}

/// The prioritized list for the converter: `explicit` entries first, then
/// the recorded ones, each path once.
pub fn prioritized_list(explicit: &[String], recorded: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    explicit
        .iter()
        .chain(recorded)
        .map(|p| crate::estargz::toc::clean_name(p))
        .filter(|p| !p.is_empty() && seen.insert(p.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::convert::{convert_tar, LayerConvertOptions};
    use crate::estargz::PREFETCH_LANDMARK;

    #[test]
    fn first_opens_in_order_relative_to_the_root() {
        let image: HashSet<String> = ["bin/sh", "etc/b", "etc/a", "usr/lib/x.so"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut order = OpenOrder::new(Path::new("/tmp/rec/rootfs"), Some(image));
        for p in [
            "/tmp/rec/rootfs/bin/sh",
            "/tmp/rec/rootfs/etc/b",
            "/dev/null",                       // another mount's file
            "/tmp/rec/rootfsX/etc/a",          // only a prefix of the root
            "/tmp/rec/rootfs/bin/sh",          // again
            "/tmp/rec/rootfs/tmp/out",         // created by the workload
            "/tmp/rec/rootfs/etc/a (deleted)", // gone since
            "/tmp/rec/rootfs/etc/a",
            "/tmp/rec/rootfs",
            "/tmp/rec/rootfs/usr/lib/x.so",
        ] {
            order.push(Path::new(p));
        }
        assert_eq!(
            order.into_paths(),
            ["bin/sh", "etc/b", "etc/a", "usr/lib/x.so"]
        );
        assert_eq!(
            prioritized_list(
                &["./etc/a".into(), "app/main".into()],
                &["bin/sh".into(), "etc/a".into()]
            ),
            ["etc/a", "app/main", "bin/sh"]
        );
    }

    /// The recorded files, with their directories, come before
    /// `.prefetch.landmark` in the converted layer, in recorded order.
    #[test]
    fn recorded_files_precede_the_landmark() {
        let (tar, _) = crate::testutil::sample_tar();
        let mut order = OpenOrder::new(Path::new("/r"), None);
        for p in ["/r/usr/bin/app", "/r/etc/hostname", "/r/usr/bin/app"] {
            order.push(Path::new(p));
        }
        let prioritized = prioritized_list(&[], &order.into_paths());
        let opts = LayerConvertOptions {
            chunk_size: 1000,
            prioritized,
            hot: Default::default(),
        };
        let (_, blob) = convert_tar(&tar[..], Vec::new(), &opts).unwrap();
        let mut plain = Vec::new();
        flate2::read::MultiGzDecoder::new(&blob[..])
            .read_to_end(&mut plain)
            .unwrap();
        let names: Vec<String> = tar::Archive::new(&plain[..])
            .entries()
            .unwrap()
            .map(|e| crate::estargz::toc::clean_name(&e.unwrap().path().unwrap().to_string_lossy()))
            .collect();
        let landmark = names.iter().position(|n| n == PREFETCH_LANDMARK).unwrap();
        assert_eq!(
            names[..landmark],
            ["usr", "usr/bin", "usr/bin/app", "etc", "etc/hostname"]
        );
        assert!(names[landmark..].contains(&"usr/bin/big".to_string()));
    }
}
