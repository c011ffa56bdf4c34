//! A container's security context holds in the VM as under runc (found wanting by
//! critest): an exec'd process gets the container's seccomp profile (the container runtime
//! in the guest, youki's libcontainer 0.7.0, dropped it for execs, so every `kubectl exec`
//! ran unfiltered; Spry builds a patched copy, agent/vendor/libcontainer/SPRY-PATCH.md),
//! `readOnlyRootFilesystem` makes the rootfs read-only (the agent overrode it with
//! whether the rootfs had a writable layer), and NET_ADMIN can make a bridge (the guest
//! kernel's bridge module was not loaded). Needs root, the guest and the test images.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use spry_integration::spry::SpryNode;
use spry_integration::{require_root, ContainerConfig, Crictl, LeakCheck, PodConfig};

/// A Spry pod on a node of its own, whose containers each get a security context.
struct Pod {
    node: SpryNode,
    leaks: LeakCheck,
    crictl: Crictl,
    id: String,
    config: std::path::PathBuf,
}

impl Pod {
    fn start(name: &str) -> Result<Self> {
        require_root()?;
        let node = SpryNode::start(&format!("spry-{name}"), false)?;
        let leaks = node.leak_check()?;
        let crictl = node
            .containerd
            .crictl()
            .with_timeout(Duration::from_secs(60));
        let config = PodConfig::new(name).write_to(&node.containerd.dir())?;
        let id = crictl.runp(&config, Some("spry"))?;
        Ok(Pod {
            node,
            leaks,
            crictl,
            id,
            config,
        })
    }

    /// Creates and starts container `name` running `argv` with `security_context`.
    fn container(&self, name: &str, argv: &[&str], security_context: Value) -> Result<String> {
        let cfg = ContainerConfig::new(name, &self.node.image)
            .command(argv)
            .patch(json!({"linux": {"security_context": security_context}}))
            .write_to(&self.node.containerd.dir())?;
        let ctr = self.crictl.create(&self.id, &cfg, &self.config)?;
        self.crictl.start(&ctr)?;
        Ok(ctr)
    }

    fn remove(self) -> Result<()> {
        self.crictl.stopp(&self.id)?;
        self.crictl.rmp(&self.id)?;
        self.leaks.assert_clean()
    }
}

#[test]
fn an_exec_gets_the_containers_seccomp_profile() -> Result<()> {
    let pod = Pod::start("exec-seccomp")?;
    let crictl = &pod.crictl;
    // RuntimeDefault (profile_type 0): containerd's default profile.
    let ctr = pod.container(
        "filtered",
        &["sh", "-c", "grep Seccomp: /proc/self/status; sleep 3600"],
        json!({"seccomp": {"profile_type": 0}}),
    )?;
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
    pod.remove()
}

#[test]
fn a_read_only_root_filesystem_is_read_only() -> Result<()> {
    let pod = Pod::start("ro-rootfs")?;
    for (name, readonly) in [("ro", true), ("rw", false)] {
        let ctr = pod.container(
            name,
            &["sleep", "3600"],
            json!({"readonly_rootfs": readonly}),
        )?;
        let out = pod.crictl.exec(&ctr, &["touch", "/written"])?;
        if readonly {
            ensure!(
                out.code != 0 && out.stderr.contains("Read-only file system"),
                "touch in a read-only rootfs: {out:?}"
            );
        } else {
            ensure!(out.code == 0, "touch in a writable rootfs: {out:?}");
        }
    }
    pod.remove()
}

/// A container given NET_ADMIN can make a Linux bridge (the guest loads the bridge module:
/// it has no modprobe for the kernel to load it on demand); one without cannot.
#[test]
fn net_admin_makes_a_bridge_and_its_absence_refuses_one() -> Result<()> {
    let pod = Pod::start("net-admin")?;
    for (name, caps) in [("admin", json!(["NET_ADMIN"])), ("plain", json!([]))] {
        let ctr = pod.container(
            name,
            &["sleep", "3600"],
            json!({"capabilities": {"add_capabilities": caps}}),
        )?;
        let out = pod.crictl.exec(&ctr, &["brctl", "addbr", "spry-test-br"])?;
        if name == "admin" {
            ensure!(out.code == 0, "brctl addbr with NET_ADMIN: {out:?}");
        } else {
            ensure!(
                out.code != 0 && out.stderr.contains("not permitted"),
                "brctl addbr without NET_ADMIN: {out:?}"
            );
        }
    }
    pod.remove()
}
