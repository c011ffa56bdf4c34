//! VM benchmark: boots N VMs one after another and reports medians of
//! - VM start → agent ready (QEMU spawn until `Check` answered),
//! - container start (create + start until its first output line),
//! - host memory of a VM with an idle container (QEMU RSS and PSS).
//!
//! Usage: bench-vm [--runs N] [--out DIR]   (root; guest assets from SPRY_GUEST_DIR)
//! Writes DIR/vm.json and DIR/vm.md (default target/bench).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use spry_integration::bench::round;
use spry_proto::agent as pb;
use spry_shim::agent_client::{OutputStream, ProcessId};
use spry_shim::cli::{container_spec, ProcessOptions};
use spry_shim::rootfs::{ErofsBlockShare, RootfsSource};
use spry_shim::sandbox::{PodVm, Sandbox, SandboxIdentity, DEFAULT_BOOT_TIMEOUT};
use spry_shim::vm::{AccelChoice, AgentChannelKind, QemuHypervisor, VmConfig};

struct Sample {
    agent_ready: Duration,
    container_start: Duration,
    rss_kib: u64,
    pss_kib: u64,
}

fn main() -> Result<()> {
    let mut runs = 5usize;
    let mut out_dir = PathBuf::from("target/bench");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = args.next().context("--runs needs a number")?.parse()?,
            "--out" => out_dir = args.next().context("--out needs a dir")?.into(),
            other => bail!("unknown argument {other}"),
        }
    }
    if runs < 5 {
        bail!("--runs must be at least 5 (medians of fewer are noise on these machines)");
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("bench-vm needs root (it boots VMs)");
    }
    let guest = std::env::var_os("SPRY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "build/guest/current".into());
    let rootfs = spry_integration::rootfs::busybox_rootfs()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut samples = Vec::new();
    let mut accel = String::new();
    for i in 0..runs {
        let (sample, used) = runtime.block_on(one_run(i, &guest, rootfs.path()))?;
        eprintln!(
            "run {i}: agent ready {:.3}s, container start {:.3}s, RSS {} MiB, PSS {} MiB ({used})",
            sample.agent_ready.as_secs_f64(),
            sample.container_start.as_secs_f64(),
            sample.rss_kib / 1024,
            sample.pss_kib / 1024
        );
        accel = used;
        samples.push(sample);
    }
    let med = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    let ready = med(&|s| s.agent_ready.as_secs_f64() * 1000.0);
    let start = med(&|s| s.container_start.as_secs_f64() * 1000.0);
    let rss = med(&|s| s.rss_kib as f64 / 1024.0);
    let pss = med(&|s| s.pss_kib as f64 / 1024.0);
    let json = serde_json::json!({
        "machine": { "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "accelerator": accel },
        "runs": runs,
        "vm_start_to_agent_ready_ms_p50": round(ready),
        "container_start_ms_p50": round(start),
        "idle_vm_rss_mib_p50": round(rss),
        "idle_vm_pss_mib_p50": round(pss),
    });
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(
        out_dir.join("vm.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    let md = format!(
        "# VM benchmark ({runs} runs, {accel}, medians)\n\n| metric | p50 |\n|---|---|\n\
         | VM start → agent ready | {ready:.0} ms |\n| container start (create+start → first output) | {start:.0} ms |\n\
         | idle VM + container, QEMU RSS | {rss:.1} MiB |\n| idle VM + container, QEMU PSS | {pss:.1} MiB |\n"
    );
    std::fs::write(out_dir.join("vm.md"), &md)?;
    print!("{md}");
    Ok(())
}

async fn one_run(i: usize, guest: &Path, rootfs: &Path) -> Result<(Sample, String)> {
    let area = tempfile::Builder::new()
        .prefix("spry-bench-")
        .tempdir_in("/run")?;
    let id = format!("bench-{i}");
    let config = VmConfig {
        id: id.clone(),
        state_dir: area.path().join("vms").join(&id),
        kernel: guest.join("vmlinux"),
        initramfs: guest.join("initramfs.img"),
        cpus: 1,
        memory_mib: 256,
        accel: AccelChoice::Auto,
        qemu: "/usr/bin/qemu-system-x86_64".into(),
        agent_channel: AgentChannelKind::VirtioSerial,
        extra_cmdline: Vec::new(),
        ..Default::default()
    };
    let hypervisor = QemuHypervisor::new("/run/spry-bench");
    let share = ErofsBlockShare::new(area.path().join("rootfs"));
    let t0 = Instant::now();
    let sandbox = Sandbox::start(
        &hypervisor,
        config,
        SandboxIdentity::default(),
        Box::new(share),
        DEFAULT_BOOT_TIMEOUT,
    )
    .await?;
    let agent_ready = t0.elapsed();
    let accel = sandbox.vm().accel().to_string();

    let opts = ProcessOptions {
        args: vec![
            "sh".into(),
            "-c".into(),
            "echo ready; exec sleep 1000".into(),
        ],
        ..Default::default()
    };
    let t1 = Instant::now();
    sandbox
        .create_container(
            "idle",
            &container_spec(&opts),
            &RootfsSource::Directory(rootfs.to_path_buf()),
            pb::StdioConfig::default(),
            Default::default(),
        )
        .await?;
    sandbox.start_container("idle").await?;
    let first = sandbox
        .agent()
        .read_output(&ProcessId::init("idle"), OutputStream::Stdout, 4096)
        .await?;
    let container_start = t1.elapsed();
    if first.as_deref() != Some(b"ready\n".as_slice()) {
        bail!("unexpected first output {first:?}");
    }
    // Let the guest settle, as an idle pod would.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_kib, pss_kib) = smaps_rollup(sandbox.vm().pid())?;
    sandbox
        .agent()
        .signal_process(&ProcessId::init("idle"), libc::SIGKILL as u32, true)
        .await?;
    sandbox
        .agent()
        .wait_process(&ProcessId::init("idle"))
        .await?;
    sandbox.remove_container("idle").await?;
    sandbox.shutdown(Duration::from_secs(10)).await?;
    Ok((
        Sample {
            agent_ready,
            container_start,
            rss_kib,
            pss_kib,
        },
        accel,
    ))
}

fn smaps_rollup(pid: u32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("Rss:"), field("Pss:")))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
