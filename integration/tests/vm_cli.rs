//! `spry vm run` as a user runs it: exit codes, stdio, tty, bad input. Needs root.

mod vm_support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use vm_support::*;

fn spry_vm_run(
    rootfs: &std::path::Path,
    extra: &[&str],
    cmd: &[&str],
    stdin: Option<&[u8]>,
) -> (Output, u32) {
    let area = TestArea::new();
    spry_vm_run_with(&cli_config(&area), rootfs, extra, cmd, stdin)
}

/// Runs `spry --config CONFIG vm run ...` (logging at info) and checks it left nothing.
fn spry_vm_run_with(
    config: &Path,
    rootfs: &Path,
    extra: &[&str],
    cmd: &[&str],
    stdin: Option<&[u8]>,
) -> (Output, u32) {
    require_root();
    let mut command = Command::new(spry_bin());
    command
        .env("SPRY_LOG", "info")
        .arg("--config")
        .arg(config)
        .args(["vm", "run", "--rootfs"])
        .arg(rootfs)
        .args(extra)
        .arg("--")
        .args(cmd)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let pid = child.id();
    if let Some(data) = stdin {
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    let output = child.wait_with_output().unwrap();
    let id = format!("vm-run-{pid}");
    let root = shared_state_root();
    assert_no_leaks_matching(&id, &[]);
    assert!(
        !root.join("vms").join(&id).exists(),
        "VM state dir left behind"
    );
    assert!(
        !root.join("rootfs").join(&id).exists(),
        "rootfs work dir left behind"
    );
    (output, pid)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_string()
}

#[test]
fn echo_and_exit_code() {
    let rootfs = busybox_rootfs();
    let (out, _) = spry_vm_run(
        rootfs.path(),
        &[],
        &["sh", "-c", "echo hi; echo oops >&2; exit 3"],
        None,
    );
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi\n");
    assert!(
        text(&out.stderr).contains("oops"),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn stdin_is_piped_through_and_vm_size_applies() {
    let rootfs = busybox_rootfs();
    let (out, _) = spry_vm_run(
        rootfs.path(),
        &["-i", "--cpus", "2", "--memory", "320"],
        &["sh", "-c", "cat; nproc; grep MemTotal /proc/meminfo"],
        Some(b"hello from stdin\n"),
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "hello from stdin");
    assert_eq!(lines[1], "2");
    let kib: u64 = lines[2].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        (250_000..=330_000).contains(&kib),
        "guest memory {kib} KiB for --memory 320"
    );
}

#[test]
fn tty_mode() {
    let rootfs = busybox_rootfs();
    let (out, _) = spry_vm_run(
        rootfs.path(),
        &["--tty"],
        &["sh", "-c", "test -t 1 && echo tty-ok; exit 7"],
        None,
    );
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("tty-ok"),
        "stdout: {}",
        text(&out.stdout)
    );
}

#[test]
fn missing_rootfs_is_a_clear_error() {
    let (out, _) = spry_vm_run(
        std::path::Path::new("/no/such/rootfs"),
        &[],
        &["true"],
        None,
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("/no/such/rootfs"),
        "stderr: {}",
        text(&out.stderr)
    );
}

/// Run from a built checkout with a config that names no guest (and none installed),
/// `spry vm run` boots the checkout's `build/guest/current`.
#[test]
fn boots_the_checkouts_guest_when_none_is_installed() {
    let installed = Path::new("/usr/local/share/spry/guest/vmlinux");
    assert!(
        !installed.exists(),
        "{} is installed: it hides the checkout fallback this test checks",
        installed.display()
    );
    assert!(
        spry_bin().starts_with(workspace_root()),
        "{} is not built in this checkout",
        spry_bin().display()
    );
    let area = TestArea::new();
    let config = area.dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("state_dir = \"{}\"\n", shared_state_root().display()),
    )
    .unwrap();
    let rootfs = busybox_rootfs();
    let (out, _) = spry_vm_run_with(&config, rootfs.path(), &[], &["echo", "hi"], None);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(text(&out.stdout), "hi\n");
    assert!(stderr.contains("using the checkout's"), "stderr: {stderr}");
}

/// A missing kernel is named, with the command that builds it, and nothing blames the
/// accelerator for it.
#[test]
fn a_missing_kernel_is_named_not_blamed_on_the_accelerator() {
    let area = TestArea::new();
    let config = area.dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[vm]\nkernel = \"/no/such/vmlinux\"\ninitramfs = \"{}\"\n",
            shared_state_root().display(),
            guest_dir().join("initramfs.img").display()
        ),
    )
    .unwrap();
    let rootfs = busybox_rootfs();
    let (out, _) = spry_vm_run_with(&config, rootfs.path(), &[], &["true"], None);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "stderr: {stderr}");
    assert!(
        stderr.contains("guest kernel /no/such/vmlinux does not exist")
            && stderr.contains("scripts/build-guest.sh"),
        "stderr: {stderr}"
    );
    assert!(!stderr.contains("KVM"), "stderr: {stderr}");
}
