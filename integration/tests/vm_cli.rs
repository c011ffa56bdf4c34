//! `spry vm run` as a user runs it: exit codes, stdio, tty, bad input. Needs root.

mod vm_support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use vm_support::*;

fn spry_vm_run(
    rootfs: &std::path::Path,
    extra: &[&str],
    cmd: &[&str],
    stdin: Option<&[u8]>,
) -> (Output, u32) {
    require_root();
    let area = TestArea::new();
    let mut command = Command::new(spry_bin());
    command
        .arg("--config")
        .arg(cli_config(&area))
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
