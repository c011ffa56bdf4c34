//! Recording real workloads: root and a static busybox (busybox-static) are
//! required; without them these tests fail, they do not skip.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use super::*;
use crate::convert::{convert_tar, LayerConvertOptions};
use crate::estargz::PREFETCH_LANDMARK;

const BUSYBOX: &str = "/bin/busybox";

fn require_root_and_busybox() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "recording tests need root (namespaces, fanotify): run them as root"
    );
    assert!(
        Path::new(BUSYBOX).exists(),
        "recording tests need a static {BUSYBOX} (apt install busybox-static)"
    );
}

/// A small busybox root filesystem with three data files.
fn busybox_rootfs(root: &Path) -> HashSet<String> {
    for dir in ["bin", "data", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "sleep", "echo"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
    for (name, text) in [
        ("a.txt", "aaa\n"),
        ("b.txt", "bbb\n"),
        ("unused.txt", "zzz\n"),
    ] {
        std::fs::write(root.join("data").join(name), text).unwrap();
    }
    [
        "bin/busybox",
        "etc/passwd",
        "data/a.txt",
        "data/b.txt",
        "data/unused.txt",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn workload(script: &str) -> Workload {
    Workload {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: Vec::new(),
        cwd: "/".into(),
        user: String::new(),
    }
}

fn options(until: Option<&str>, timeout_s: u64) -> RecordOptions {
    RecordOptions {
        command: None,
        until_line: until.map(|re| regex::Regex::new(re).unwrap()),
        timeout: Duration::from_secs(timeout_s),
    }
}

fn data_files(files: &[String]) -> Vec<&str> {
    files
        .iter()
        .map(String::as_str)
        .filter(|f| f.starts_with("data/"))
        .collect()
}

/// Names in a converted layer, in blob order.
fn layer_order(blob: &[u8]) -> Vec<String> {
    let mut plain = Vec::new();
    flate2::read::MultiGzDecoder::new(blob)
        .read_to_end(&mut plain)
        .unwrap();
    tar::Archive::new(&plain[..])
        .entries()
        .unwrap()
        .map(|e| crate::estargz::toc::clean_name(&e.unwrap().path().unwrap().to_string_lossy()))
        .collect()
}

fn rootfs_tar(root: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", root).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn records_the_files_a_shell_reads_first_and_in_order() {
    require_root_and_busybox();
    let dir = tempfile::tempdir().unwrap();
    let files = busybox_rootfs(dir.path());
    let started = Instant::now();
    let recording = record_rootfs(
        dir.path(),
        &workload("cat /data/b.txt >/dev/null; cat /data/a.txt >/dev/null; echo READY; sleep 30"),
        &options(Some("^READY$"), 20),
        Some(files),
    )
    .unwrap();
    assert!(
        matches!(&recording.stop, StopReason::Line(l) if l == "READY"),
        "{:?}",
        recording.stop
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "did not stop at the line"
    );
    assert_eq!(recording.files[0], "bin/busybox", "{:?}", recording.files);
    assert_eq!(data_files(&recording.files), ["data/b.txt", "data/a.txt"]);

    // Converted with the recording, the two files lead the layer, right
    // after the shell they ran under, before the landmark.
    let opts = LayerConvertOptions {
        chunk_size: 4096,
        prioritized: prioritized_list(&[], &recording.files),
        hot: Default::default(),
    };
    let (_, blob) = convert_tar(&rootfs_tar(dir.path())[..], Vec::new(), &opts).unwrap();
    let names = layer_order(&blob);
    let landmark = names.iter().position(|n| n == PREFETCH_LANDMARK).unwrap();
    let before: Vec<&str> = names[..landmark]
        .iter()
        .map(String::as_str)
        .filter(|n| !matches!(*n, "bin" | "data"))
        .collect();
    assert_eq!(before, ["bin/busybox", "data/b.txt", "data/a.txt"]);
    assert!(names[landmark..].contains(&"data/unused.txt".to_string()));
}

#[test]
fn timeout_ends_the_recording_and_kills_the_workload() {
    require_root_and_busybox();
    let dir = tempfile::tempdir().unwrap();
    let files = busybox_rootfs(dir.path());
    let started = Instant::now();
    let recording = record_rootfs(
        dir.path(),
        &workload("cat /data/a.txt; sleep 4242 & sleep 4243"),
        &options(None, 1),
        Some(files),
    )
    .unwrap();
    assert!(
        matches!(recording.stop, StopReason::Timeout),
        "{:?}",
        recording.stop
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(data_files(&recording.files), ["data/a.txt"]);
    // The whole PID namespace went down with its init, background job included.
    std::thread::sleep(Duration::from_millis(200));
    for proc in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(proc.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!cmdline.contains("sleep 424"), "left running: {cmdline}");
    }
}

#[test]
fn a_workload_that_exits_ends_the_recording() {
    require_root_and_busybox();
    let dir = tempfile::tempdir().unwrap();
    let files = busybox_rootfs(dir.path());
    let recording = record_rootfs(
        dir.path(),
        &workload("cat /data/unused.txt >/dev/null; echo tmp >/tmp/new"),
        &options(Some("never printed"), 20),
        Some(files),
    )
    .unwrap();
    assert!(
        matches!(recording.stop, StopReason::Exited(s) if s.success()),
        "{:?}",
        recording.stop
    );
    // /tmp/new is the workload's own file, not the image's.
    assert_eq!(
        recording
            .files
            .iter()
            .filter(|f| !f.starts_with("bin/"))
            .collect::<Vec<_>>(),
        ["data/unused.txt"]
    );
}

/// The whole path `convert --record` takes: an OCI layout unpacked, its
/// entrypoint + cmd run, the files recorded, and the bytes read of them.
#[test]
fn records_an_oci_image_with_its_own_command() {
    require_root_and_busybox();
    let src = tempfile::tempdir().unwrap();
    busybox_rootfs(src.path());
    std::os::unix::fs::symlink("busybox", src.path().join("bin/dd")).unwrap();
    // 2 MiB, of which the workload reads one page at 1 MiB.
    let big: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.path().join("data/big"), &big).unwrap();
    let layout = tempfile::tempdir().unwrap();
    write_layout(
        layout.path(),
        &rootfs_tar(src.path()),
        r#"{"Entrypoint":["/bin/sh","-c"],"Cmd":["cat /data/b.txt /data/a.txt; dd if=/data/big of=/dev/null bs=4096 skip=256 count=1 2>/dev/null; echo READY; sleep 30"],"WorkingDir":"/work"}"#,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = crate::registry::RegistryClient::new(Default::default()).unwrap();
    let source = crate::convert::ImageSource::Layout {
        dir: layout.path().to_path_buf(),
        tag: None,
    };
    let recording = rt
        .block_on(record_image(
            &client,
            &source,
            &options(Some("READY"), 20),
            &mut |_| {},
        ))
        .unwrap();
    assert!(
        matches!(recording.stop, StopReason::Line(_)),
        "{:?}",
        recording.stop
    );
    assert_eq!(
        recording.files,
        ["bin/busybox", "data/b.txt", "data/a.txt", "data/big"],
        "{:?}",
        recording.files
    );
    // The page cache was dropped before the run, so what is cached after it was read:
    // the page at 1 MiB (and the host's readahead after it), not the whole file.
    assert_eq!(
        recording.stayed_cached,
        Some(0),
        "$TMPDIR could not drop its page cache"
    );
    assert_eq!(
        recording.reads.paths(),
        ["bin/busybox", "data/b.txt", "data/a.txt", "data/big"]
    );
    let hot = recording.reads.clone().into_hot();
    let crate::estargz::HotRanges::Ranges(big_reads) = &hot["data/big"] else {
        panic!("{:?}", hot["data/big"]);
    };
    let read: u64 = big_reads.iter().map(|(s, e)| e - s).sum();
    assert!(
        big_reads.iter().any(|&(s, e)| s <= 1 << 20 && e > 1 << 20) && read <= 1 << 20,
        "data/big read as {big_reads:?}"
    );
}

/// A one-layer OCI image layout (gzip layer) with `run` as the config's `config`.
fn write_layout(dir: &Path, tar: &[u8], run: &str) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let digest = crate::estargz::sha256_digest(data);
        std::fs::write(blobs.join(digest.trim_start_matches("sha256:")), data).unwrap();
        (digest, data.len())
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(tar).unwrap();
    let (layer, layer_size) = put(&gz.finish().unwrap());
    let diff_id = crate::estargz::sha256_digest(tar);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{run},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
    );
    let (config, config_size) = put(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":{layer_size}}}]}}"#
    );
    let (manifest, manifest_size) = put(manifest.as_bytes());
    std::fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest}","size":{manifest_size}}}]}}"#
        ),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}
