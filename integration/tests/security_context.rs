//! A container's security context holds in the VM as under runc (found wanting by
//! critest): an exec'd process gets the container's seccomp profile (the container runtime
//! in the guest, youki's libcontainer 0.7.0, dropped it for execs, so every `kubectl exec`
//! ran unfiltered; Spry builds a patched copy, agent/vendor/libcontainer/SPRY-PATCH.md),
//! `readOnlyRootFilesystem` makes the rootfs read-only (the agent overrode it with
//! whether the rootfs had a writable layer), and NET_ADMIN can make a bridge (the guest
//! kernel's bridge module was not loaded). Needs root, the guest and the test images.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::json;
use spry_integration::spry::SpryNode;
use spry_integration::{require_root, ContainerConfig, PodConfig};

#[test]
fn an_exec_gets_the_containers_seccomp_profile() -> Result<()> {
    require_root()?;
    let node = SpryNode::start("spry-exec-seccomp", false)?;
    let containerd = &node.containerd;
    let leaks = containerd.leak_check()?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(60));
    let pod_cfg = PodConfig::new("exec-seccomp").write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, Some("spry"))?;
    // RuntimeDefault (profile_type 0): containerd's default profile.
    let ctr_cfg = ContainerConfig::new("filtered", &node.image)
        .command(&["sh", "-c", "grep Seccomp: /proc/self/status; sleep 3600"])
        .patch(json!({"linux": {"security_context": {"seccomp": {"profile_type": 0}}}}))
        .write_to(&containerd.dir())?;
    let ctr = crictl.create(&pod, &ctr_cfg, &pod_cfg)?;
    crictl.start(&ctr)?;
    crictl.wait_container_state(&ctr, "CONTAINER_RUNNING", Duration::from_secs(30))?;
    // Mode 2: a filter is installed.
    let filtered = |text: &str| text.contains("Seccomp:\t2");
    let init = spry_integration::system::wait_for(Duration::from_secs(20), || {
        let logs = crictl.logs(&ctr)?;
        Ok(logs.contains("Seccomp:").then_some(logs))
    })?
    .unwrap_or_default();
    ensure!(filtered(&init), "the container's init: {init:?}");
    let exec = crictl.exec_ok(&ctr, &["grep", "Seccomp:", "/proc/self/status"])?;
    ensure!(filtered(&exec), "an exec: {exec:?}");
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    leaks.assert_clean()
}

#[test]
fn a_read_only_root_filesystem_is_read_only() -> Result<()> {
    require_root()?;
    let node = SpryNode::start("spry-ro-rootfs", false)?;
    let containerd = &node.containerd;
    let leaks = containerd.leak_check()?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(60));
    let pod_cfg = PodConfig::new("ro-rootfs").write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, Some("spry"))?;
    for (name, readonly) in [("ro", true), ("rw", false)] {
        let ctr_cfg = ContainerConfig::new(name, &node.image)
            .command(&["sleep", "3600"])
            .patch(json!({"linux": {"security_context": {"readonly_rootfs": readonly}}}))
            .write_to(&containerd.dir())?;
        let ctr = crictl.create(&pod, &ctr_cfg, &pod_cfg)?;
        crictl.start(&ctr)?;
        let out = crictl.exec(&ctr, &["touch", "/written"])?;
        if readonly {
            ensure!(
                out.code != 0 && out.stderr.contains("Read-only file system"),
                "touch in a read-only rootfs: {out:?}"
            );
        } else {
            ensure!(out.code == 0, "touch in a writable rootfs: {out:?}");
        }
    }
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    leaks.assert_clean()
}

/// A container given NET_ADMIN can make a Linux bridge (the guest loads the bridge module:
/// it has no modprobe for the kernel to load it on demand); one without cannot.
#[test]
fn net_admin_makes_a_bridge_and_its_absence_refuses_one() -> Result<()> {
    require_root()?;
    let node = SpryNode::start("spry-net-admin", false)?;
    let containerd = &node.containerd;
    let leaks = containerd.leak_check()?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(60));
    let pod_cfg = PodConfig::new("net-admin").write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, Some("spry"))?;
    for (name, caps) in [("admin", json!(["NET_ADMIN"])), ("plain", json!([]))] {
        let ctr_cfg = ContainerConfig::new(name, &node.image)
            .command(&["sleep", "3600"])
            .patch(json!({"linux": {"security_context": {"capabilities": {"add_capabilities": caps}}}}))
            .write_to(&containerd.dir())?;
        let ctr = crictl.create(&pod, &ctr_cfg, &pod_cfg)?;
        crictl.start(&ctr)?;
        let out = crictl.exec(&ctr, &["brctl", "addbr", "spry-test-br"])?;
        if name == "admin" {
            ensure!(out.code == 0, "brctl addbr with NET_ADMIN: {out:?}");
        } else {
            ensure!(
                out.code != 0 && out.stderr.contains("not permitted"),
                "brctl addbr without NET_ADMIN: {out:?}"
            );
        }
    }
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    leaks.assert_clean()
}
