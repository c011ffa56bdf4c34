//! Where the harness finds tools and keeps its files. Every location can be overridden by an env var:
//!
//! | env var              | default                                   | what                                  |
//! |----------------------|-------------------------------------------|---------------------------------------|
//! | `SPRY_DEPS_DIR`      | `/opt/spry/deps`                          | prefix of the Go-built tools (`bin/`) |
//! | `SPRY_CONTAINERD`    | `$SPRY_DEPS_DIR/bin/containerd`           | containerd 2.x binary                 |
//! | `SPRY_CRICTL`        | `$SPRY_DEPS_DIR/bin/crictl`               | crictl binary                         |
//! | `SPRY_REGISTRY_BIN`  | `docker-registry` (PATH)                  | Debian's distribution registry        |
//! | `SPRY_REGISTRY_DATA` | `<repo>/build/registry-data`              | registry storage with the test images |
//! | `SPRY_CNI_BIN_DIR`   | `/usr/lib/cni`                            | CNI plugins                           |
//! | `SPRY_IT_DIR`        | `/var/lib/spry-it`                        | per-test containerd roots (on disk)   |
//! | `SPRY_IT_RUN_DIR`    | `/run/spry-it`                            | per-test sockets and state (short)    |
//! | `SPRY_IT_LOG_DIR`    | `<repo>/target/spry-it-logs`              | containerd logs kept after teardown   |

use std::env;
use std::path::PathBuf;

fn env_path(var: &str) -> Option<PathBuf> {
    env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The repository root (the workspace this crate lives in).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration crate lives inside the workspace")
        .to_path_buf()
}

/// The directory `scripts/install-deps.sh` installs the Go-built tools into.
pub fn deps_bin_dir() -> PathBuf {
    env_path("SPRY_DEPS_DIR")
        .unwrap_or_else(|| PathBuf::from("/opt/spry/deps"))
        .join("bin")
}

pub fn containerd_bin() -> PathBuf {
    env_path("SPRY_CONTAINERD").unwrap_or_else(|| deps_bin_dir().join("containerd"))
}

pub fn crictl_bin() -> PathBuf {
    env_path("SPRY_CRICTL").unwrap_or_else(|| deps_bin_dir().join("crictl"))
}

/// A bare name is looked up in PATH by [`crate::require_tool`].
pub fn registry_bin() -> PathBuf {
    env_path("SPRY_REGISTRY_BIN").unwrap_or_else(|| PathBuf::from("docker-registry"))
}

/// Registry storage prepared by `scripts/build-test-images.sh`.
pub fn registry_data() -> PathBuf {
    env_path("SPRY_REGISTRY_DATA").unwrap_or_else(|| repo_root().join("build/registry-data"))
}

pub fn cni_bin_dir() -> PathBuf {
    env_path("SPRY_CNI_BIN_DIR").unwrap_or_else(|| PathBuf::from("/usr/lib/cni"))
}

/// Per-test containerd roots: on disk, because image layers (the python image is ~250 MB) don't belong in tmpfs.
pub fn harness_dir() -> PathBuf {
    env_path("SPRY_IT_DIR").unwrap_or_else(|| PathBuf::from("/var/lib/spry-it"))
}

/// Per-test sockets and state: short paths, because unix socket paths are limited to 108 bytes.
pub fn harness_run_dir() -> PathBuf {
    env_path("SPRY_IT_RUN_DIR").unwrap_or_else(|| PathBuf::from("/run/spry-it"))
}

/// Where each instance's containerd log is copied at teardown (CI keeps it as an artifact).
pub fn log_archive_dir() -> PathBuf {
    env_path("SPRY_IT_LOG_DIR").unwrap_or_else(|| repo_root().join("target/spry-it-logs"))
}
