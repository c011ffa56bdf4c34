//! Warming a spare's VM before any pod comes: one throwaway container of Spry's own (the
//! guest agent's binary, from the VM's initramfs, printing its version) created, started,
//! waited for and removed through the same host and guest paths a pod's container takes:
//! erofs image, disk hot-plug, writable layer, the agent's container helper, namespaces,
//! cgroup, exec; then the guest runs the pod network's paths on its NICs with a throwaway
//! config and puts them back (the agent's WarmNetwork). Under TCG a restored VM translates every guest code path the first time it
//! runs it (the translations live in the QEMU process, not in the template), so a pod's
//! first container in a fresh clone starts about twice as slowly as its second; the pod
//! now finds those paths translated. The VM has then run only Spry's code.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use spry_proto::agent as pb;

use super::{io_error, PoolError};
use crate::agent_client::ProcessId;
use crate::assets::cpio;
use crate::rootfs::{RootfsShare, RootfsSource};
use crate::sandbox::BootedVm;

/// The warm-up container's id (never a CRI id: those are 64 hex characters).
const WARM_ID: &str = "spry-warm-up";

/// Runs the warm-up container in `booted`, its rootfs staged under `work` and attached
/// through `share`; everything it made is gone afterwards, error or not.
pub async fn warm_up(
    booted: &BootedVm,
    share: &dyn RootfsShare,
    initramfs: &Path,
    work: &Path,
) -> Result<(), PoolError> {
    let rootfs = work.join("warm-up-rootfs");
    stage_rootfs(initramfs, &rootfs)?;
    let attached = share
        .attach(
            booted.vm(),
            WARM_ID,
            &RootfsSource::Directory(rootfs.clone()),
        )
        .await;
    let _ = std::fs::remove_dir_all(&rootfs);
    let attached = attached.map_err(|e| PoolError::Warm(e.to_string()))?;
    let ran = run(booted, attached.rootfs.clone()).await;
    let detached = share.detach(booted.vm(), attached).await;
    ran?;
    detached.map_err(|e| PoolError::Warm(e.to_string()))?;
    booted
        .agent()
        .warm_network()
        .await
        .map_err(|e| PoolError::Warm(e.to_string()))
}

async fn run(booted: &BootedVm, rootfs: pb::Rootfs) -> Result<(), PoolError> {
    let agent = booted.agent();
    let spec = serde_json::to_vec(&warm_spec()).map_err(PoolError::Encode)?;
    let failed = |e: crate::agent_client::AgentError| PoolError::Warm(e.to_string());
    agent
        .create_container(pb::CreateContainerRequest {
            container_id: WARM_ID.into(),
            oci_spec_json: spec,
            rootfs: Some(rootfs).into(),
            ..Default::default()
        })
        .await
        .map_err(failed)?;
    let started = agent.start_container(WARM_ID).await;
    let waited = match started {
        Ok(()) => agent
            .wait_process(&ProcessId::init(WARM_ID))
            .await
            .map(|status| status.exit_code),
        Err(e) => Err(e),
    };
    let removed = agent.remove_container(WARM_ID).await;
    match waited.map_err(failed)? {
        0 => removed.map_err(failed),
        code => Err(PoolError::Warm(format!(
            "the warm-up container exited {code}"
        ))),
    }
}

/// A rootfs holding only the agent's binary, as `/init`.
fn stage_rootfs(initramfs: &Path, rootfs: &Path) -> Result<(), PoolError> {
    let archive = std::fs::read(initramfs).map_err(io_error("read", initramfs))?;
    let agent = cpio::find_file(&archive, "init")
        .ok_or_else(|| PoolError::Warm(format!("no /init in {}", initramfs.display())))?;
    // Not create_dir_all: the spare's dir is gone when the pool was drained meanwhile, and
    // must stay gone (a recreated dir would keep the spare alive and the drain waiting).
    std::fs::create_dir(rootfs).map_err(io_error("create", rootfs))?;
    let init = rootfs.join("init");
    std::fs::write(&init, agent).map_err(io_error("write", &init))?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
        .map_err(io_error("chmod", &init))
}

/// runc's default spec running `/init --version`, in the VM's network and PID namespaces
/// (as PID 1 of a namespace of its own the agent would set a VM up).
fn warm_spec() -> Spec {
    let mut spec = Spec::default();
    if let Some(process) = spec.process_mut() {
        process.set_args(Some(vec!["/init".into(), "--version".into()]));
    }
    if let Some(namespaces) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.namespaces_mut().as_mut())
    {
        namespaces.retain(|ns| {
            !matches!(
                ns.typ(),
                LinuxNamespaceType::Network | LinuxNamespaceType::Pid
            )
        });
    }
    spec
}
