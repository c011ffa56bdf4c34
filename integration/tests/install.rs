//! `spry install` against real containerd binaries: Debian's 1.6 (installed by
//! scripts/install-deps.sh next to our 2.x) is refused, as a binary, on PATH and as a
//! running daemon reading the config; the 2.x is accepted. Needs root (the daemon).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use spry_integration::{paths, require_root, system};

const DEBIAN_CONTAINERD: &str = "/usr/bin/containerd";

fn spry_bin() -> PathBuf {
    std::env::var_os("SPRY_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::repo_root().join("target/debug"))
        .join("spry")
}

/// The Debian package's containerd, which must be a 1.x for these tests to mean anything.
fn debian_containerd() -> Result<PathBuf> {
    let out = Command::new(DEBIAN_CONTAINERD)
        .arg("--version")
        .output()
        .with_context(|| format!("{DEBIAN_CONTAINERD} missing: run scripts/install-deps.sh"))?;
    let version = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        version.contains(" 1."),
        "{DEBIAN_CONTAINERD} is not Debian's containerd 1.x: {version}"
    );
    Ok(PathBuf::from(DEBIAN_CONTAINERD))
}

/// `spry install --dry-run` into `dir`, with extra flags and an optional PATH.
fn dry_run(dir: &Path, extra: &[&str], path_env: Option<&str>) -> Result<Output> {
    let guest = spry_integration::spry::guest_dir()?;
    let mut cmd = Command::new(spry_bin());
    cmd.args(["install", "--dry-run", "--containerd-config"])
        .arg(dir.join("config.toml"))
        .arg("--prefix")
        .arg(dir.join("prefix"))
        .arg("--guest-dir")
        .arg(&guest)
        .arg("--spry-config")
        .arg(dir.join("spry.toml"))
        .args(extra);
    if let Some(path) = path_env {
        cmd.env("PATH", path);
    }
    cmd.output().context("running spry install")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn debian_containerd_1x_is_refused_as_a_binary_and_on_path_and_2x_is_accepted() -> Result<()> {
    require_root()?;
    let debian = debian_containerd()?;
    let dir = tempfile::tempdir()?;

    let given = dry_run(dir.path(), &["--containerd-bin", DEBIAN_CONTAINERD], None)?;
    let text = stderr(&given);
    assert_eq!(given.status.code(), Some(125), "{text}");
    assert!(
        text.contains("containerd 1.6") && text.contains(&debian.display().to_string()),
        "{text}"
    );
    assert!(text.contains("--force"), "{text}");
    assert!(!dir.path().join("prefix").exists());

    // Only Debian's on PATH (our 2.x lives outside PATH, in /opt/spry/deps/bin).
    let on_path = dry_run(dir.path(), &[], Some("/usr/bin:/bin"))?;
    let text = stderr(&on_path);
    assert_eq!(on_path.status.code(), Some(125), "{text}");
    assert!(
        text.contains("containerd 1.6") && text.contains(", on PATH"),
        "{text}"
    );

    let forced = dry_run(
        dir.path(),
        &["--containerd-bin", DEBIAN_CONTAINERD, "--force"],
        None,
    )?;
    let text = stderr(&forced);
    assert_eq!(forced.status.code(), Some(0), "{text}");
    assert!(text.contains("installing anyway (--force)"), "{text}");

    let ours = paths::containerd_bin();
    let accepted = dry_run(
        dir.path(),
        &["--containerd-bin", &ours.display().to_string()],
        None,
    )?;
    let text = stderr(&accepted);
    assert_eq!(accepted.status.code(), Some(0), "{text}");
    assert!(text.contains("spry: containerd 2."), "{text}");
    Ok(())
}

/// A containerd daemon, killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = system::terminate_child(&mut self.0, Duration::from_secs(10)) {
            eprintln!("stopping containerd 1.6: {e:#}");
        }
    }
}

#[test]
fn a_running_1x_daemon_reading_the_config_is_refused_even_with_2x_on_path() -> Result<()> {
    require_root()?;
    let debian = debian_containerd()?;
    let dir = tempfile::tempdir_in("/run")?;
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{root}/root\"\nstate = \"{root}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\naddress = \"{root}/c.sock\"\n",
            root = dir.path().display()
        ),
    )?;
    let log = std::fs::File::create(dir.path().join("containerd.log"))?;
    let _daemon = Daemon(
        Command::new(&debian)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    let socket = dir.path().join("c.sock");
    system::wait_for(Duration::from_secs(20), || {
        Ok(socket.exists().then_some(()))
    })?
    .context("containerd 1.6 did not open its socket")?;

    // Our 2.x first on PATH: the daemon that reads the config is what counts.
    let path = format!("{}:/usr/bin:/bin", paths::deps_bin_dir().display());
    let out = dry_run(dir.path(), &[], Some(&path))?;
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{text}");
    assert!(
        text.contains("containerd 1.6") && text.contains("running daemon pid"),
        "{text}"
    );
    Ok(())
}
