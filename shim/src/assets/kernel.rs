//! The pinned Debian guest kernel: fetching its package, unpacking it,
//! extracting the bootable `vmlinux` and indexing its modules.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

use super::vmlinux::{self, VmlinuxError};

/// The kernel package Spry boots, pinned so that guests are reproducible.
pub const PINNED_KERNEL_PACKAGE: &str = "linux-image-6.1.0-56-cloud-amd64";
pub const PINNED_KERNEL_VERSION: &str = "6.1.192-2";
/// The meta package whose dependency names the current kernel, used when the
/// mirror no longer carries the pinned build (mirrors drop old security builds).
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Errors fetching and preparing the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{tool} is not installed (apt-get install {package})")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        tool: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error(
        "the pinned guest kernel {package}={version} is in apt's package lists but could not \
         be downloaded (network, proxy or mirror trouble?); fix that and rerun, or build with \
         --kernel-deb FILE"
    )]
    PinnedDownload {
        package: &'static str,
        version: &'static str,
        #[source]
        source: Box<KernelError>,
    },
    #[error("apt-cache shows no kernel dependency for {package}")]
    NoKernelDependency { package: &'static str },
    #[error("apt-get download left no .deb in {dir}")]
    NoDebDownloaded { dir: PathBuf },
    #[error("failed to read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("package {path} has no kernel modules directory (expected exactly one lib/modules/<release>)")]
    NoModulesDir { path: PathBuf },
    #[error("failed to extract vmlinux from {path}")]
    Vmlinux {
        path: PathBuf,
        #[source]
        source: VmlinuxError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KernelError + '_ {
    move |source| KernelError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A kernel package on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDeb {
    pub path: PathBuf,
    pub package: String,
    pub version: String,
    pub sha256: String,
}

/// An unpacked kernel, ready to build guests from.
#[derive(Debug, Clone)]
pub struct PreparedKernel {
    /// `uname -r` of the kernel.
    pub release: String,
    /// The uncompressed PVH ELF.
    pub vmlinux: PathBuf,
    /// `lib/modules/<release>` with a fresh `modules.dep`.
    pub modules_dir: PathBuf,
}

/// Returns the pinned kernel package from `cache_dir`, downloading it with
/// `apt-get download` when it is not there. When the mirror no longer has
/// the pinned version (apt's package lists do not know it), falls back to the
/// kernel that [`KERNEL_META_PACKAGE`] depends on now, with a loud warning; a
/// download that fails for any other reason is an error.
pub fn fetch_kernel_deb(cache_dir: &Path) -> Result<KernelDeb, KernelError> {
    match fetch_exact(cache_dir, PINNED_KERNEL_PACKAGE, PINNED_KERNEL_VERSION) {
        Ok(deb) => Ok(deb),
        Err(
            pinned_error @ KernelError::ToolFailed {
                tool: "apt-get download",
                ..
            },
        ) => {
            if apt_knows(PINNED_KERNEL_PACKAGE, PINNED_KERNEL_VERSION)? {
                return Err(KernelError::PinnedDownload {
                    package: PINNED_KERNEL_PACKAGE,
                    version: PINNED_KERNEL_VERSION,
                    source: Box::new(pinned_error),
                });
            }
            let (package, version) = current_kernel_dependency()?;
            tracing::warn!(
                pinned = %format!("{PINNED_KERNEL_PACKAGE}={PINNED_KERNEL_VERSION}"),
                fallback = %format!("{package}={version}"),
                error = %pinned_error,
                "THE PINNED GUEST KERNEL IS GONE FROM THE MIRROR: building with the kernel \
                 {KERNEL_META_PACKAGE} depends on now; guests are no longer reproducible \
                 until the pin is updated"
            );
            fetch_exact(cache_dir, &package, &version)
        }
        Err(other) => Err(other),
    }
}

fn fetch_exact(cache_dir: &Path, package: &str, version: &str) -> Result<KernelDeb, KernelError> {
    let debs = cache_dir.join("debs");
    fs::create_dir_all(&debs).map_err(io_err(&debs))?;
    let cached = debs.join(format!("{package}_{version}_amd64.deb"));
    if !cached.exists() {
        // Download into a private directory, then rename: concurrent builds
        // never see a half-written package.
        let scratch = tempfile::Builder::new()
            .prefix(".download-")
            .tempdir_in(&debs)
            .map_err(io_err(&debs))?;
        run(
            Command::new("apt-get")
                .arg("download")
                .arg(format!("{package}={version}"))
                .current_dir(scratch.path()),
            "apt-get download",
            "apt",
        )?;
        let downloaded = fs::read_dir(scratch.path())
            .map_err(io_err(scratch.path()))?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
            .ok_or_else(|| KernelError::NoDebDownloaded {
                dir: scratch.path().to_owned(),
            })?;
        fs::rename(&downloaded, &cached).map_err(io_err(&cached))?;
    }
    let sha256 = sha256_file(&cached).map_err(io_err(&cached))?;
    Ok(KernelDeb {
        path: cached,
        package: package.to_owned(),
        version: version.to_owned(),
        sha256,
    })
}

/// Describes a kernel package given as a file (offline builds).
pub fn kernel_deb_from_file(path: &Path) -> Result<KernelDeb, KernelError> {
    let fields = run(
        Command::new("dpkg-deb")
            .arg("--field")
            .arg(path)
            .args(["Package", "Version"]),
        "dpkg-deb",
        "dpkg",
    )?;
    let text = String::from_utf8_lossy(&fields.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(|value| value.trim().to_owned())
            .unwrap_or_default()
    };
    let sha256 = sha256_file(path).map_err(io_err(path))?;
    Ok(KernelDeb {
        path: path.to_owned(),
        package: field("Package"),
        version: field("Version"),
        sha256,
    })
}

/// Whether apt's package lists have `package` at `version` (`apt-cache show` fails when not).
fn apt_knows(package: &str, version: &str) -> Result<bool, KernelError> {
    match run(
        Command::new("apt-cache").args(["show", &format!("{package}={version}")]),
        "apt-cache show",
        "apt",
    ) {
        Ok(_) => Ok(true),
        Err(KernelError::ToolFailed { .. }) => Ok(false),
        Err(other) => Err(other),
    }
}

/// Reads `Depends: linux-image-X (= V)` of the meta package.
fn current_kernel_dependency() -> Result<(String, String), KernelError> {
    let output = run(
        Command::new("apt-cache").args(["show", "--no-all-versions", KERNEL_META_PACKAGE]),
        "apt-cache show",
        "apt",
    )?;
    parse_kernel_dependency(&String::from_utf8_lossy(&output.stdout)).ok_or(
        KernelError::NoKernelDependency {
            package: KERNEL_META_PACKAGE,
        },
    )
}

fn parse_kernel_dependency(show: &str) -> Option<(String, String)> {
    let depends = show
        .lines()
        .find_map(|line| line.strip_prefix("Depends:"))?;
    depends.split(',').find_map(|dep| {
        let dep = dep.trim();
        let (name, rest) = dep.split_once(' ')?;
        let version = rest.trim().strip_prefix("(=")?.strip_suffix(')')?.trim();
        name.starts_with("linux-image-")
            .then(|| (name.to_owned(), version.to_owned()))
    })
}

/// Unpacks the package (once per package hash) into `cache_dir`, extracts
/// `vmlinux` and runs `depmod` so that `modules.dep` exists.
pub fn prepare_kernel(deb: &KernelDeb, cache_dir: &Path) -> Result<PreparedKernel, KernelError> {
    let final_dir = cache_dir.join(format!("kernel-{}", &deb.sha256[..16]));
    if !final_dir.join(".complete").exists() {
        fs::create_dir_all(cache_dir).map_err(io_err(cache_dir))?;
        let scratch = tempfile::Builder::new()
            .prefix(".kernel-")
            .tempdir_in(cache_dir)
            .map_err(io_err(cache_dir))?;
        unpack_kernel(deb, scratch.path())?;
        fs::write(scratch.path().join(".complete"), b"").map_err(io_err(scratch.path()))?;
        if final_dir.exists() {
            // An incomplete leftover of an interrupted run.
            fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
        }
        let scratch = scratch.keep();
        if let Err(source) = fs::rename(&scratch, &final_dir) {
            let _ = fs::remove_dir_all(&scratch);
            if !final_dir.join(".complete").exists() {
                return Err(KernelError::Io {
                    path: final_dir,
                    source,
                });
            }
            // Else another build won the race with identical content.
        }
    }
    let root = final_dir.join("root");
    let release = modules_release(&root, &deb.path)?;
    Ok(PreparedKernel {
        vmlinux: final_dir.join("vmlinux"),
        modules_dir: root.join("lib/modules").join(&release),
        release,
    })
}

fn unpack_kernel(deb: &KernelDeb, dir: &Path) -> Result<(), KernelError> {
    let root = dir.join("root");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb.path).arg(&root),
        "dpkg-deb",
        "dpkg",
    )?;
    let release = modules_release(&root, &deb.path)?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    let bzimage = fs::read(&vmlinuz).map_err(io_err(&vmlinuz))?;
    let elf = vmlinux::extract_vmlinux(&bzimage).map_err(|source| KernelError::Vmlinux {
        path: vmlinuz,
        source,
    })?;
    let vmlinux_path = dir.join("vmlinux");
    fs::write(&vmlinux_path, elf).map_err(io_err(&vmlinux_path))?;
    // Debian ships no modules.dep; depmod writes it (and its friends).
    run(
        Command::new(depmod_path())
            .arg("-b")
            .arg(&root)
            .arg(&release),
        "depmod",
        "kmod",
    )?;
    Ok(())
}

fn modules_release(root: &Path, deb: &Path) -> Result<String, KernelError> {
    let modules = root.join("lib/modules");
    let entries: Vec<String> = fs::read_dir(&modules)
        .map_err(|_| KernelError::NoModulesDir {
            path: deb.to_owned(),
        })?
        .filter_map(Result::ok)
        .filter(|entry| entry.path().is_dir())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    match entries.as_slice() {
        [release] => Ok(release.clone()),
        _ => Err(KernelError::NoModulesDir {
            path: deb.to_owned(),
        }),
    }
}

/// depmod lives in sbin, which is not on every user's PATH.
fn depmod_path() -> PathBuf {
    ["/usr/sbin/depmod", "/sbin/depmod"]
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("depmod"))
}

fn run(
    command: &mut Command,
    tool: &'static str,
    package: &'static str,
) -> Result<Output, KernelError> {
    let output = command
        .output()
        .map_err(|source| KernelError::ToolMissing {
            tool,
            package,
            source,
        })?;
    if !output.status.success() {
        return Err(KernelError::ToolFailed {
            tool,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(&mut fs::File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_meta_package_dependency() {
        let show = "Package: linux-image-cloud-amd64\nVersion: 6.1.200-1\n\
                    Depends: linux-image-6.1.0-60-cloud-amd64 (= 6.1.200-1)\nDescription: x\n";
        assert_eq!(
            parse_kernel_dependency(show),
            Some((
                "linux-image-6.1.0-60-cloud-amd64".to_owned(),
                "6.1.200-1".to_owned()
            ))
        );
        assert_eq!(parse_kernel_dependency("Package: x\n"), None);
        assert_eq!(parse_kernel_dependency("Depends: libc6 (>= 2)\n"), None);
    }
}
