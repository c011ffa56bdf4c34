//! Preconditions of end-to-end tests. A test that lacks root or a tool FAILS with a message that says how
//! to fix it; it never returns early as if it had passed.

use anyhow::{bail, Context, Result};
use std::env;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Fails unless running as root (the tests mount, create netns and run containerd).
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "this end-to-end test needs root (it runs containerd, mounts and creates network namespaces); \
             run it as root, e.g. `sudo -E cargo test -p spry-integration`"
        );
    }
    Ok(())
}

/// Resolves `tool` (a path, or a bare name looked up in PATH) to an executable file, or fails naming the
/// tool and how to install it.
pub fn require_tool(tool: &Path) -> Result<PathBuf> {
    let found = if tool.components().count() > 1 {
        is_executable(tool).then(|| tool.to_path_buf())
    } else {
        env::var_os("PATH").and_then(|path| {
            env::split_paths(&path)
                .map(|dir| dir.join(tool))
                .find(|candidate| is_executable(candidate))
        })
    };
    found.with_context(|| {
        format!(
            "required tool {} is missing or not executable; run `scripts/install-deps.sh` as root \
             (or point the matching SPRY_* env var at it, see spry_integration::paths)",
            tool.display()
        )
    })
}

/// Fails unless every image `name:tag` is in the registry storage prepared by `scripts/build-test-images.sh`.
pub fn require_test_images(registry_data: &Path, names: &[&str]) -> Result<()> {
    let repos = registry_data.join("docker/registry/v2/repositories");
    for name_tag in names {
        let (name, tag) = name_tag.split_once(':').unwrap_or((name_tag, "latest"));
        let tag_dir = repos.join(name).join("_manifests/tags").join(tag);
        if !tag_dir.is_dir() {
            bail!(
                "test image {name}:{tag} is not in the registry storage {}; run `scripts/build-test-images.sh` as root",
                registry_data.display()
            );
        }
    }
    Ok(())
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tools_in_path_and_by_absolute_path() {
        assert_eq!(
            require_tool(Path::new("sh")).unwrap().file_name().unwrap(),
            "sh"
        );
        assert!(require_tool(Path::new("/bin/sh")).is_ok());
    }

    #[test]
    fn missing_tool_names_it_and_the_fix() {
        let err = require_tool(Path::new("spry-no-such-tool"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("spry-no-such-tool"), "{err}");
        assert!(err.contains("install-deps.sh"), "{err}");
    }

    #[test]
    fn missing_image_points_at_the_build_script() {
        let dir = tempfile::tempdir().unwrap();
        let err = require_test_images(dir.path(), &["busybox:1"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("busybox:1") && err.contains("build-test-images.sh"),
            "{err}"
        );
        std::fs::create_dir_all(
            dir.path()
                .join("docker/registry/v2/repositories/busybox/_manifests/tags/1"),
        )
        .unwrap();
        require_test_images(dir.path(), &["busybox:1"]).unwrap();
    }
}
