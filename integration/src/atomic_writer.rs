//! kubelet's atomic writer, in short, for tests and benchmarks that lay volumes out as
//! kubelet does (configMap, secret, projected): the payload in a fresh `..<ts>` dir, a
//! `..data_tmp` symlink to it renamed over `..data`, user-visible names as symlinks into
//! `..data`, the old payload removed.

use std::path::Path;

use anyhow::Result;

/// Writes `files` ((name, content)) as the volume's new version.
pub fn write(dir: &Path, files: &[(&str, &str)]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let payload = dir.join(&stamp);
    std::fs::create_dir(&payload)?;
    for (name, content) in files {
        std::fs::write(payload.join(name), content)?;
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link)?;
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old))?;
    }
    Ok(())
}

/// A watcher for a container: reports every value of key `a` of the volume at /cfg it
/// sees into /out/seen, and "torn" when keys `a` and `b` of one version disagree.
pub const WATCHER: &str = "last=; while true; do \
    if cd /cfg/..data 2>/dev/null && read a < a && read b < b; then \
      if [ \"$a\" != \"$b\" ]; then echo torn >> /out/seen; fi; \
      if [ \"$a\" != \"$last\" ]; then echo \"$a\" >> /out/seen; last=$a; fi; \
    fi; cd /; sleep 0.02; done";

/// Writes version `value` of the watcher's volume (keys `a` and `b`, newline-terminated:
/// the watcher's `read` fails on a last line without one).
pub fn write_version(dir: &Path, value: &str) -> Result<()> {
    let line = format!("{value}\n");
    write(dir, &[("a", &line), ("b", &line)])
}
