//! Which containerd will load the `spry` handler, and whether it can drive Spry's shim.
//!
//! The shim speaks task API v3 (the `containerd-shim` crate 0.12), which containerd 2.0
//! introduced: a containerd 1.x would accept the patched config and then fail every pod.
//! So `spry install` looks for the containerd that reads the config it patches, in this
//! order, and refuses a 1.x unless forced:
//! 1. the binary named by `--containerd-bin`;
//! 2. a running daemon whose `--config` (default `/etc/containerd/config.toml`) is that file;
//! 3. `containerd` on `PATH`.
//!
//! When none is found the config's schema is the only hint: `version = 3` is written for
//! containerd 2.x, `version = 2` for either.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The oldest containerd major version whose task API (v3) the shim speaks.
pub const MIN_SUPPORTED_MAJOR: u32 = 2;
/// containerd's config path when it runs without `--config`.
const CONTAINERD_DEFAULT_CONFIG: &str = "/etc/containerd/config.toml";

/// A containerd release, as `containerd --version` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdVersion {
    pub major: u32,
    pub minor: u32,
    /// The version word as printed, e.g. `v2.2.9` or Debian's `1.6.20~ds1`.
    pub text: String,
}

impl ContainerdVersion {
    /// Parses `containerd --version` output, e.g. upstream's
    /// `containerd github.com/containerd/containerd/v2 v2.2.9 <revision>` or Debian's
    /// `containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1`.
    pub fn parse(output: &str) -> Option<Self> {
        let mut words = output.lines().next()?.split_whitespace();
        if words.next()? != "containerd" {
            return None;
        }
        let text = words.nth(1)?;
        let mut numbers = text.trim_start_matches('v').split(['.', '~', '-', '+']);
        let major = numbers.next()?.parse().ok()?;
        let minor = numbers.next()?.parse().ok()?;
        Some(Self {
            major,
            minor,
            text: text.to_string(),
        })
    }

    pub fn is_supported(&self) -> bool {
        self.major >= MIN_SUPPORTED_MAJOR
    }
}

impl std::fmt::Display for ContainerdVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.text.trim_start_matches('v'))
    }
}

/// Where a containerd was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerdSource {
    /// `--containerd-bin`.
    Given(PathBuf),
    /// A running daemon reading the config being patched.
    Daemon { pid: u32, exe: PathBuf },
    /// `containerd` found on `PATH`.
    OnPath(PathBuf),
}

impl std::fmt::Display for ContainerdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Given(path) => write!(f, "binary {}, from --containerd-bin", path.display()),
            Self::Daemon { pid, exe } => {
                write!(f, "running daemon pid {pid}, {}", exe.display())
            }
            Self::OnPath(path) => write!(f, "binary {}, on PATH", path.display()),
        }
    }
}

/// Why the containerd could not be identified or accepted.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdVersionError {
    #[error(
        "containerd {version} ({found_at}) cannot run Spry pods: Spry's shim speaks task API v3, \
         which needs containerd {MIN_SUPPORTED_MAJOR}.0 or newer. Upgrade containerd (or point \
         --containerd-bin at the 2.x binary that reads this config), or pass --force to install anyway"
    )]
    Unsupported {
        version: ContainerdVersion,
        found_at: ContainerdSource,
    },
    #[error("cannot run {binary} --version")]
    Run {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{binary} --version printed {output:?}, which is not a containerd version")]
    Unrecognized { binary: PathBuf, output: String },
}

/// The containerd found, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundContainerd {
    pub version: ContainerdVersion,
    pub source: ContainerdSource,
}

/// Finds the containerd that will read `config` (see the module docs for the order).
pub fn find(
    given: Option<&Path>,
    config: &Path,
) -> Result<Option<FoundContainerd>, ContainerdVersionError> {
    let source = match given {
        Some(binary) => Some(ContainerdSource::Given(binary.to_path_buf())),
        None => daemon_reading(config).or_else(|| on_path().map(ContainerdSource::OnPath)),
    };
    let Some(source) = source else {
        return Ok(None);
    };
    let binary = match &source {
        ContainerdSource::Given(path) | ContainerdSource::OnPath(path) => path.clone(),
        // The daemon's own binary, even if the file on disk was replaced since it started.
        ContainerdSource::Daemon { pid, .. } => PathBuf::from(format!("/proc/{pid}/exe")),
    };
    let version = version_of(&binary)?;
    Ok(Some(FoundContainerd { version, source }))
}

/// Refuses a containerd older than 2.0.
pub fn check(found: &FoundContainerd) -> Result<(), ContainerdVersionError> {
    if found.version.is_supported() {
        Ok(())
    } else {
        Err(ContainerdVersionError::Unsupported {
            version: found.version.clone(),
            found_at: found.source.clone(),
        })
    }
}

fn version_of(binary: &Path) -> Result<ContainerdVersion, ContainerdVersionError> {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|source| ContainerdVersionError::Run {
            binary: binary.to_path_buf(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ContainerdVersion::parse(&stdout).ok_or_else(|| ContainerdVersionError::Unrecognized {
        binary: binary.to_path_buf(),
        output: stdout.trim().chars().take(200).collect(),
    })
}

fn on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("containerd"))
        .find(|candidate| candidate.is_file())
}

/// A running `containerd` whose config is `config`.
fn daemon_reading(config: &Path) -> Option<ContainerdSource> {
    let wanted = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
    let entries = std::fs::read_dir("/proc").ok()?;
    entries.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let proc_dir = entry.path();
        let comm = std::fs::read_to_string(proc_dir.join("comm")).ok()?;
        if comm.trim_end() != "containerd" {
            return None;
        }
        let cmdline = std::fs::read(proc_dir.join("cmdline")).ok()?;
        let args: Vec<&OsStr> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(OsStr::from_bytes)
            .collect();
        let daemon_config = config_argument(&args)?;
        // A relative --config is relative to the daemon's working directory.
        let daemon_config = proc_dir.join("cwd").join(daemon_config);
        let daemon_config = std::fs::canonicalize(&daemon_config).unwrap_or(daemon_config);
        if daemon_config != wanted {
            return None;
        }
        let exe = std::fs::read_link(proc_dir.join("exe")).unwrap_or_default();
        Some(ContainerdSource::Daemon { pid, exe })
    })
}

/// The config a containerd command line reads: `--config X`, `-c X`, `--config=X`, or the
/// default. None for a subcommand invocation (`containerd config dump` and the like).
fn config_argument(args: &[&OsStr]) -> Option<PathBuf> {
    let mut config = PathBuf::from(CONTAINERD_DEFAULT_CONFIG);
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        let arg = arg.to_str()?;
        if arg == "--config" || arg == "-c" {
            config = PathBuf::from(rest.next()?);
        } else if let Some(value) = arg.strip_prefix("--config=") {
            config = PathBuf::from(value);
        } else if !arg.starts_with('-') {
            // A flag's value (`--log-level debug`) or a subcommand: only the known
            // daemon flags with values are skipped over, anything else is not a daemon.
            return None;
        } else if matches!(
            arg,
            "--log-level" | "-l" | "--address" | "-a" | "--root" | "--state"
        ) {
            rest.next()?;
        }
    }
    Some(config)
}

/// A stand-in `containerd` in `dir` whose `--version` prints `version_line`.
#[cfg(test)]
pub(crate) fn fake_containerd(dir: &Path, version_line: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("containerd");
    std::fs::write(&path, format!("#!/bin/sh\necho '{version_line}'\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream_and_debian_version_lines() {
        let upstream = ContainerdVersion::parse(
            "containerd github.com/containerd/containerd/v2 v2.2.9 module-proxy\n",
        )
        .unwrap();
        assert_eq!((upstream.major, upstream.minor), (2, 2));
        assert!(upstream.is_supported());
        assert_eq!(upstream.to_string(), "2.2.9");
        let debian = ContainerdVersion::parse(
            "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1",
        )
        .unwrap();
        assert_eq!((debian.major, debian.minor), (1, 6));
        assert!(!debian.is_supported());
        assert_eq!(debian.to_string(), "1.6.20~ds1");
        assert_eq!(ContainerdVersion::parse("runc version 1.1.5"), None);
        assert_eq!(ContainerdVersion::parse(""), None);
        assert_eq!(
            ContainerdVersion::parse("containerd github.com/x garbage"),
            None
        );
    }

    #[test]
    fn reads_the_config_of_a_daemon_command_line() {
        fn os(args: &[&'static str]) -> Vec<&'static OsStr> {
            args.iter().map(|a| OsStr::new(*a)).collect()
        }
        assert_eq!(
            config_argument(&os(&["containerd"])),
            Some(PathBuf::from(CONTAINERD_DEFAULT_CONFIG))
        );
        assert_eq!(
            config_argument(&os(&[
                "containerd",
                "--log-level",
                "debug",
                "-c",
                "/x.toml"
            ])),
            Some(PathBuf::from("/x.toml"))
        );
        assert_eq!(
            config_argument(&os(&["/usr/bin/containerd", "--config=/y.toml"])),
            Some(PathBuf::from("/y.toml"))
        );
        assert_eq!(
            config_argument(&os(&["containerd", "config", "dump"])),
            None
        );
    }

    #[test]
    fn a_given_1x_binary_is_refused_naming_version_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_containerd(
            dir.path(),
            "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1",
        );
        let found = find(Some(&bin), &dir.path().join("config.toml"))
            .unwrap()
            .unwrap();
        assert_eq!(found.source, ContainerdSource::Given(bin.clone()));
        let err = check(&found).unwrap_err().to_string();
        for needle in ["containerd 1.6.20", "task API v3", "2.0", "--force"] {
            assert!(err.contains(needle), "{needle:?} missing in: {err}");
        }
        assert!(err.contains(&bin.display().to_string()), "{err}");
    }

    #[test]
    fn a_given_2x_binary_passes_and_garbage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_containerd(
            dir.path(),
            "containerd github.com/containerd/containerd/v2 v2.2.9 abc",
        );
        let found = find(Some(&bin), Path::new("/nonexistent"))
            .unwrap()
            .unwrap();
        check(&found).unwrap();
        let other = tempfile::tempdir().unwrap();
        let bin = fake_containerd(other.path(), "something else");
        let err = find(Some(&bin), Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a containerd version") && err.contains("something else"),
            "{err}"
        );
        let err = find(Some(&other.path().join("absent")), Path::new("/x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot run"), "{err}");
    }
}
