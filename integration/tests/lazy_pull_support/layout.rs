//! Test images made from the built ones: busybox plus a layer with one large file (for
//! workloads that read a little of a big file), or any test image plus given layers.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use spry_integration::paths;

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Writes `data` as a blob of `layout`; returns its descriptor fields (digest, size).
fn put_blob(layout: &Path, data: &[u8]) -> Result<(String, usize)> {
    let digest = sha256(data);
    let path = layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
    std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    Ok((digest, data.len()))
}

fn read_blob(layout: &Path, digest: &str) -> Result<Value> {
    let path = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    Ok(serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?)
}

/// Pseudo-random bytes: they do not compress, so compressed offsets follow file offsets.
pub fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A copy of the busybox test image's OCI layout at `dst` (tag `1`) with one more layer
/// holding `file` (a path in the image) with `data`.
pub fn busybox_with_file(dst: &Path, file: &str, data: &[u8]) -> Result<()> {
    let work = tempfile::tempdir()?;
    let target = work.path().join("root").join(file);
    std::fs::create_dir_all(target.parent().context("file has no parent")?)?;
    std::fs::write(&target, data)?;
    let tar = work.path().join("layer.tar");
    let status = Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(work.path().join("root"))
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()?;
    ensure!(status.success(), "tar of the extra layer failed");
    image_with_layers("busybox", dst, &[std::fs::read(&tar)?])
}

/// A copy of the test image `name`'s OCI layout (`build/images/<name>`) at `dst` (tag `1`)
/// with `layers` (uncompressed tars, lowest first) on top of its own.
pub fn image_with_layers(name: &str, dst: &Path, layers: &[Vec<u8>]) -> Result<()> {
    let src = paths::repo_root().join("build/images").join(name);
    ensure!(
        src.join("index.json").exists(),
        "{} is missing: run scripts/build-test-images.sh",
        src.display()
    );
    let status = Command::new("cp").arg("-a").arg(&src).arg(dst).status()?;
    ensure!(
        status.success(),
        "cp -a {} {}",
        src.display(),
        dst.display()
    );
    let index_path = dst.join("index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index without a manifest")?
        .to_string();
    let mut manifest = read_blob(dst, &manifest_digest)?;
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .context("manifest without a config")?
        .to_string();
    let mut config = read_blob(dst, &config_digest)?;
    let work = tempfile::tempdir()?;
    for tar_bytes in layers {
        let tar = work.path().join("layer.tar");
        std::fs::write(&tar, tar_bytes)?;
        let out = Command::new("gzip").args(["-1", "-c"]).arg(&tar).output()?;
        ensure!(out.status.success(), "gzip of an extra layer failed");
        let (layer, layer_size) = put_blob(dst, &out.stdout)?;
        config["rootfs"]["diff_ids"]
            .as_array_mut()
            .context("config without diff_ids")?
            .push(json!(sha256(tar_bytes)));
        manifest["layers"]
            .as_array_mut()
            .context("manifest without layers")?
            .push(json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer,
                "size": layer_size,
            }));
    }
    let (config, config_size) = put_blob(dst, &serde_json::to_vec(&config)?)?;
    manifest["config"]["digest"] = json!(config);
    manifest["config"]["size"] = json!(config_size);
    let (manifest, manifest_size) = put_blob(dst, &serde_json::to_vec(&manifest)?)?;
    index["manifests"][0]["digest"] = json!(manifest);
    index["manifests"][0]["size"] = json!(manifest_size);
    std::fs::write(&index_path, serde_json::to_vec(&index)?)?;
    Ok(())
}
