//! Warming a spare's VM before any pod comes: one throwaway container of Spry's own (the
//! guest agent's binary, from the VM's initramfs, printing its version) created, started,
//! waited for and removed through the same host and guest paths a pod's container takes:
//! erofs image, disk hot-plug, writable layer, the agent's container helper, namespaces,
//! cgroup, the file bind mounts CRI gives every container (/etc/hostname, /etc/hosts,
//! /etc/resolv.conf: a mountpoint made in the image's /etc, so its overlay copy-up and the
//! writable layer's first file), exec; then the guest runs the pod network's paths on its
//! NICs with a throwaway config and puts them back (the agent's WarmNetwork). Under TCG a
//! restored VM translates every guest code path the first time it runs it (the
//! translations live in the QEMU process, not in the template), so a pod's first container
//! in a fresh clone starts about twice as slowly as its second; the pod now finds those
//! paths translated. The VM has then run only Spry's code.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};
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

/// Where CRI bind-mounts a file of its own into every container; the warm-up binds
/// /dev/null there instead (nothing reads it).
const CRI_FILE_MOUNTS: [&str; 3] = ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"];

/// A rootfs holding the agent's binary, as `/init`, and an /etc without CRI's files (as
/// most images have), so that binding them copies /etc up.
fn stage_rootfs(initramfs: &Path, rootfs: &Path) -> Result<(), PoolError> {
    let archive = std::fs::read(initramfs).map_err(io_error("read", initramfs))?;
    let agent = cpio::find_file(&archive, "init")
        .ok_or_else(|| PoolError::Warm(format!("no /init in {}", initramfs.display())))?;
    // Not create_dir_all: the spare's dir is gone when the pool was drained meanwhile, and
    // must stay gone (a recreated dir would keep the spare alive and the drain waiting).
    std::fs::create_dir(rootfs).map_err(io_error("create", rootfs))?;
    let etc = rootfs.join("etc");
    std::fs::create_dir(&etc).map_err(io_error("create", &etc))?;
    let passwd = etc.join("passwd");
    std::fs::write(&passwd, "root:x:0:0:root:/:/init\n").map_err(io_error("write", &passwd))?;
    let init = rootfs.join("init");
    std::fs::write(&init, agent).map_err(io_error("write", &init))?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
        .map_err(io_error("chmod", &init))
}

/// runc's default spec running `/init --version`, in the VM's network and PID namespaces
/// (as PID 1 of a namespace of its own the agent would set a VM up), with CRI's file
/// mounts as the agent makes them for a pod's container.
fn warm_spec() -> Spec {
    let mut spec = Spec::default();
    let mounts = spec.mounts_mut().get_or_insert_with(Vec::new);
    for destination in CRI_FILE_MOUNTS {
        let mut bind = Mount::default();
        bind.set_destination(destination.into())
            .set_typ(Some("bind".into()))
            .set_source(Some("/dev/null".into()))
            .set_options(Some(vec!["rbind".into(), "rprivate".into()]));
        mounts.push(bind);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warm_up_binds_cri_s_files_into_an_etc_that_lacks_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut archive = cpio::CpioArchive::new();
        archive.add_file("init", 0o755, b"agent".to_vec()).unwrap();
        let initramfs = dir.path().join("initramfs");
        std::fs::write(&initramfs, archive.to_bytes().unwrap()).unwrap();
        let rootfs = dir.path().join("rootfs");
        stage_rootfs(&initramfs, &rootfs).unwrap();
        assert_eq!(std::fs::read(rootfs.join("init")).unwrap(), b"agent");
        assert!(rootfs.join("etc/passwd").is_file());
        // Missing from the image, so the container's bind makes them: /etc is copied up.
        for destination in CRI_FILE_MOUNTS {
            assert!(!rootfs.join(&destination[1..]).exists(), "{destination}");
        }

        let spec = warm_spec();
        let mounts = spec.mounts().as_ref().unwrap();
        for destination in CRI_FILE_MOUNTS {
            let bind = mounts
                .iter()
                .find(|m| m.destination() == Path::new(destination))
                .unwrap_or_else(|| panic!("no mount at {destination}"));
            assert_eq!(bind.typ().as_deref(), Some("bind"));
            assert_eq!(bind.source().as_deref(), Some(Path::new("/dev/null")));
        }
        let namespaces = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap();
        assert!(namespaces.iter().all(|ns| !matches!(
            ns.typ(),
            LinuxNamespaceType::Network | LinuxNamespaceType::Pid
        )));
    }
}
