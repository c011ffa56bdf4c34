//! The guest initramfs: the agent as `/init`, the kernel modules it loads
//! and nothing else (no shell, no busybox).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::cpio::{CpioArchive, CpioError};

/// Where the load-ordered module list lives, relative to the archive root.
/// One path per line, relative to `/lib/modules/<release>/`, dependencies first.
pub const MODULE_LIST_NAME: &str = "spry-modules.list";

/// Errors assembling the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel release {release:?} cannot be used as a directory name")]
    BadRelease { release: String },
    #[error("failed to lay out the archive")]
    Archive {
        #[source]
        source: CpioError,
    },
}

impl From<CpioError> for InitramfsError {
    fn from(source: CpioError) -> Self {
        Self::Archive { source }
    }
}

/// What goes into the initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsSpec<'a> {
    /// The binary that becomes `/init`.
    pub init: &'a Path,
    /// `uname -r` of the kernel the modules belong to.
    pub release: &'a str,
    /// The kernel's `lib/modules/<release>` directory.
    pub modules_dir: &'a Path,
    /// Module paths relative to `modules_dir`, in load order.
    pub modules: &'a [String],
}

/// Lays out the archive. Callers may add entries before writing it (tests
/// add a shell; production images never do).
pub fn initramfs_archive(spec: &InitramfsSpec<'_>) -> Result<CpioArchive, InitramfsError> {
    if spec.release.is_empty() || spec.release.contains('/') || spec.release.starts_with('.') {
        return Err(InitramfsError::BadRelease {
            release: spec.release.to_owned(),
        });
    }
    let mut archive = CpioArchive::new();
    for dir in ["dev", "proc", "sys", "run", "etc", "lib", "lib/modules"] {
        archive.add_dir(dir, 0o755)?;
    }
    archive.add_dir("tmp", 0o1777)?;
    // The kernel opens /dev/console for init's stdio before devtmpfs exists.
    archive.add_char_device("dev/console", 0o600, 5, 1)?;
    archive.add_file("init", 0o755, read(spec.init)?)?;

    let release_dir = format!("lib/modules/{}", spec.release);
    archive.add_dir(&release_dir, 0o755)?;
    for module in spec.modules {
        let path = format!("{release_dir}/{module}");
        archive.add_parents(&path)?;
        archive.add_file(&path, 0o644, read(&spec.modules_dir.join(module))?)?;
    }
    let mut list = spec.modules.join("\n");
    list.push('\n');
    archive.add_file(
        &format!("lib/modules/{MODULE_LIST_NAME}"),
        0o644,
        list.into_bytes(),
    )?;
    Ok(archive)
}

fn read(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    fs::read(path).map_err(|source| InitramfsError::Read {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lays_out_init_modules_and_the_list() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("agent"), b"\x7fELF-agent").unwrap();
        let modules = dir.path().join("mods");
        fs::create_dir_all(modules.join("kernel/fs")).unwrap();
        fs::write(modules.join("kernel/fs/a.ko"), b"a").unwrap();
        fs::write(modules.join("kernel/fs/b.ko"), b"b").unwrap();
        let list = vec!["kernel/fs/b.ko".to_owned(), "kernel/fs/a.ko".to_owned()];
        let agent = dir.path().join("agent");
        let spec = InitramfsSpec {
            init: &agent,
            release: "6.1.0-test",
            modules_dir: &modules,
            modules: &list,
        };
        let bytes = initramfs_archive(&spec).unwrap().to_bytes().unwrap();
        let image = dir.path().join("initramfs.img");
        fs::write(&image, &bytes).unwrap();

        let listing = std::process::Command::new("cpio")
            .args(["-itv", "--quiet", "-F"])
            .arg(&image)
            .output()
            .expect("the cpio tool is required for this test (apt-get install cpio)");
        let text = String::from_utf8(listing.stdout).unwrap();
        assert!(
            text.contains("lib/modules/6.1.0-test/kernel/fs/a.ko"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("crw------") && l.ends_with("dev/console")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with(" init")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("drwxrwxrwt") && l.ends_with(" tmp")),
            "{text}"
        );
        assert!(!text.contains("bin/"), "no shell in the guest: {text}");
        // The list keeps load order, not alphabetical order.
        let position = |needle: &[u8]| {
            bytes
                .windows(needle.len())
                .position(|w| w == needle)
                .unwrap()
        };
        assert!(position(b"kernel/fs/b.ko\nkernel/fs/a.ko\n") > 0);
    }

    #[test]
    fn missing_inputs_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-agent");
        let spec = InitramfsSpec {
            init: &missing,
            release: "r",
            modules_dir: dir.path(),
            modules: &[],
        };
        match initramfs_archive(&spec) {
            Err(InitramfsError::Read { path, .. }) => assert_eq!(path, missing),
            other => panic!("unexpected {other:?}"),
        }
        let agent = dir.path().join("agent");
        fs::write(&agent, b"x").unwrap();
        let spec = InitramfsSpec {
            init: &agent,
            release: "../r",
            modules_dir: dir.path(),
            modules: &[],
        };
        assert!(matches!(
            initramfs_archive(&spec),
            Err(InitramfsError::BadRelease { .. })
        ));
    }
}
