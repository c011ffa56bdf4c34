//! Building (or reusing) a guest: kernel + initramfs + manifest in a
//! directory named after the cache key, with a stable `current` link.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::initramfs::{initramfs_archive, InitramfsError, InitramfsSpec};
use super::kernel::{self, sha256_file, KernelError};
use super::manifest::{cache_key, CacheKeyInputs, Manifest, BUILDER_VERSION};
use super::modules::{ModuleDeps, ModulesError, GUEST_MODULES};

pub const VMLINUX_NAME: &str = "vmlinux";
pub const INITRAMFS_NAME: &str = "initramfs.img";
pub const MANIFEST_NAME: &str = "manifest.json";
/// The link to the latest build inside the output directory.
pub const CURRENT_LINK: &str = "current";

/// Errors building guest assets.
#[derive(Debug, thiserror::Error)]
pub enum AssetsError {
    #[error("agent binary {path} cannot be read")]
    Agent {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to prepare the guest kernel")]
    Kernel {
        #[source]
        source: KernelError,
    },
    #[error("failed to resolve the guest's kernel modules")]
    Modules {
        #[source]
        source: ModulesError,
    },
    #[error("failed to build the initramfs")]
    Initramfs {
        #[source]
        source: InitramfsError,
    },
    #[error("failed to read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("manifest {path} is invalid")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} does not match the sha256 its manifest records")]
    Corrupt { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AssetsError + '_ {
    move |source| AssetsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// The pinned Debian package, fetched with apt into the cache.
    Pinned,
    /// A kernel .deb already on disk.
    Deb(PathBuf),
}

/// What to build and where.
#[derive(Debug, Clone)]
pub struct GuestAssetsConfig {
    /// Holds `cache/`, one directory per build and the `current` link.
    pub output_dir: PathBuf,
    /// The static agent binary that becomes `/init`.
    pub agent: PathBuf,
    pub kernel: KernelSource,
    /// Module names to include (their dependencies are added).
    pub modules: Vec<String>,
}

impl GuestAssetsConfig {
    /// The pinned kernel and the standard module set.
    pub fn new(output_dir: impl Into<PathBuf>, agent: impl Into<PathBuf>) -> Self {
        Self {
            output_dir: output_dir.into(),
            agent: agent.into(),
            kernel: KernelSource::Pinned,
            modules: GUEST_MODULES.iter().map(|m| (*m).to_owned()).collect(),
        }
    }
}

/// A built guest.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    pub dir: PathBuf,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub manifest: Manifest,
    /// True when an identical earlier build was reused.
    pub reused: bool,
}

/// `<repo>/build/guest`, where scripts and tests look for the guest.
pub fn default_output_dir(repo_root: &Path) -> PathBuf {
    repo_root.join("build").join("guest")
}

/// Builds the guest, or reuses an intact build with the same cache key, and
/// points `<output_dir>/current` at it.
pub fn build_guest_assets(config: &GuestAssetsConfig) -> Result<GuestAssets, AssetsError> {
    let agent_sha256 = sha256_file(&config.agent).map_err(|source| AssetsError::Agent {
        path: config.agent.clone(),
        source,
    })?;
    let cache_dir = config.output_dir.join("cache");
    let deb = match &config.kernel {
        KernelSource::Pinned => kernel::fetch_kernel_deb(&cache_dir),
        KernelSource::Deb(path) => kernel::kernel_deb_from_file(path),
    }
    .map_err(|source| AssetsError::Kernel { source })?;
    let key = cache_key(&CacheKeyInputs {
        kernel_deb_sha256: &deb.sha256,
        agent_sha256: &agent_sha256,
        modules: &config.modules,
        builder_version: BUILDER_VERSION,
    });
    let dir_name = &key[..16];
    let dir = config.output_dir.join(dir_name);

    let reused = match load_dir(&dir) {
        Ok(assets) if assets.manifest.cache_key == key => {
            tracing::info!(dir = %dir.display(), "guest assets are up to date");
            true
        }
        _ => {
            build_into(config, &deb, &agent_sha256, &key, &dir)?;
            false
        }
    };
    point_current_at(&config.output_dir, dir_name)?;
    let mut assets = load_dir(&dir)?;
    assets.reused = reused;
    Ok(assets)
}

/// The build `<output_dir>/current` points at, checked against its manifest.
pub fn load_current(output_dir: &Path) -> Result<GuestAssets, AssetsError> {
    load_dir(&output_dir.join(CURRENT_LINK))
}

fn build_into(
    config: &GuestAssetsConfig,
    deb: &kernel::KernelDeb,
    agent_sha256: &str,
    key: &str,
    dir: &Path,
) -> Result<(), AssetsError> {
    let cache_dir = config.output_dir.join("cache");
    let prepared =
        kernel::prepare_kernel(deb, &cache_dir).map_err(|source| AssetsError::Kernel { source })?;
    let dep_path = prepared.modules_dir.join("modules.dep");
    let dep_text = fs::read_to_string(&dep_path).map_err(io_err(&dep_path))?;
    let names: Vec<&str> = config.modules.iter().map(String::as_str).collect();
    let modules = ModuleDeps::parse(&dep_text)
        .and_then(|deps| deps.resolve_load_order(&names))
        .map_err(|source| AssetsError::Modules { source })?;

    let scratch = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&config.output_dir)
        .map_err(io_err(&config.output_dir))?;
    let vmlinux = scratch.path().join(VMLINUX_NAME);
    fs::copy(&prepared.vmlinux, &vmlinux).map_err(io_err(&prepared.vmlinux))?;
    let spec = InitramfsSpec {
        init: &config.agent,
        release: &prepared.release,
        modules_dir: &prepared.modules_dir,
        modules: &modules,
    };
    let initramfs = scratch.path().join(INITRAMFS_NAME);
    let image = initramfs_archive(&spec)
        .and_then(|archive| Ok(archive.to_bytes()?))
        .map_err(|source| AssetsError::Initramfs { source })?;
    fs::write(&initramfs, image).map_err(io_err(&initramfs))?;

    let mut files = BTreeMap::new();
    for path in [&vmlinux, &initramfs] {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        files.insert(name, sha256_file(path).map_err(io_err(path))?);
    }
    let manifest = Manifest {
        builder_version: BUILDER_VERSION,
        cache_key: key.to_owned(),
        kernel_release: prepared.release.clone(),
        kernel_package: deb.package.clone(),
        kernel_version: deb.version.clone(),
        kernel_deb_sha256: deb.sha256.clone(),
        agent_sha256: agent_sha256.to_owned(),
        modules,
        files,
    };
    let manifest_path = scratch.path().join(MANIFEST_NAME);
    let mut json =
        serde_json::to_string_pretty(&manifest).map_err(|source| AssetsError::Manifest {
            path: manifest_path.clone(),
            source,
        })?;
    json.push('\n');
    fs::write(&manifest_path, json).map_err(io_err(&manifest_path))?;

    if dir.exists() {
        // A damaged or partial build under the same key: replace it.
        fs::remove_dir_all(dir).map_err(io_err(dir))?;
    }
    let scratch_path = scratch.keep();
    fs::rename(&scratch_path, dir).map_err(|source| {
        let _ = fs::remove_dir_all(&scratch_path);
        AssetsError::Io {
            path: dir.to_owned(),
            source,
        }
    })?;
    tracing::info!(dir = %dir.display(), release = %manifest.kernel_release, "built guest assets");
    Ok(())
}

/// Swaps the `current` link atomically (rename over the old link).
fn point_current_at(output_dir: &Path, dir_name: &str) -> Result<(), AssetsError> {
    let link = output_dir.join(CURRENT_LINK);
    let temporary = output_dir.join(format!(".{CURRENT_LINK}.{}", std::process::id()));
    let _ = fs::remove_file(&temporary);
    std::os::unix::fs::symlink(dir_name, &temporary).map_err(io_err(&temporary))?;
    fs::rename(&temporary, &link).map_err(io_err(&link))
}

fn load_dir(dir: &Path) -> Result<GuestAssets, AssetsError> {
    let manifest_path = dir.join(MANIFEST_NAME);
    let text = fs::read_to_string(&manifest_path).map_err(io_err(&manifest_path))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|source| AssetsError::Manifest {
            path: manifest_path,
            source,
        })?;
    for (name, expected) in &manifest.files {
        let path = dir.join(name);
        if &sha256_file(&path).map_err(io_err(&path))? != expected {
            return Err(AssetsError::Corrupt { path });
        }
    }
    Ok(GuestAssets {
        vmlinux: dir.join(VMLINUX_NAME),
        initramfs: dir.join(INITRAMFS_NAME),
        dir: dir.to_owned(),
        manifest,
        reused: true,
    })
}
