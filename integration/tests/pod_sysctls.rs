//! A pod's sysctls (CRI `PodSandboxConfig.linux.sysctls`) reach its containers, as under
//! runc (where the pause container's namespaces carry them): here the agent sets them in
//! the VM, whose namespaces are the pod's, cold and from a template. A sysctl the guest's
//! kernel does not have fails runp naming it. Needs root, the guest and the test images.

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use serde_json::json;
use spry_integration::spry::SpryNode;
use spry_integration::{require_root, ContainerConfig, PodConfig};

#[test]
fn pod_sysctls_are_set_in_the_vm_and_a_bad_one_is_named() -> Result<()> {
    require_root()?;
    let node = SpryNode::start("spry-sysctls", true)?;
    let containerd = &node.containerd;
    let leaks = node.leak_check()?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(60));
    // One safe sysctl (kubelet allows it by default) and one "unsafe" (allowed per node).
    let sysctls = json!({"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "100"});
    for handler in ["spry-cold", "spry"] {
        let pod_cfg = PodConfig::new(&format!("sysctls-{handler}"))
            .patch(json!({"linux": {"sysctls": sysctls}}))
            .write_to(&containerd.dir())?;
        let pod = crictl.runp(&pod_cfg, Some(handler))?;
        let ctr_cfg = ContainerConfig::new("reader", &node.image)
            .command(&["sleep", "3600"])
            .write_to(&containerd.dir())?;
        let ctr = crictl.create(&pod, &ctr_cfg, &pod_cfg)?;
        crictl.start(&ctr)?;
        for (file, want) in [
            ("/proc/sys/kernel/shm_rmid_forced", "1"),
            ("/proc/sys/fs/mqueue/msg_max", "100"),
        ] {
            let got = crictl.exec_ok(&ctr, &["cat", file])?;
            ensure!(got == want, "{handler}: {file} reads {got:?}, not {want:?}");
        }
        crictl.stopp(&pod)?;
        crictl.rmp(&pod)?;
    }
    let pod_cfg = PodConfig::new("sysctls-unknown")
        .patch(json!({"linux": {"sysctls": {"kernel.no_such_sysctl": "1"}}}))
        .write_to(&containerd.dir())?;
    match crictl.runp(&pod_cfg, Some("spry")) {
        Ok(_) => bail!("a pod with a sysctl the guest lacks started"),
        Err(e) => ensure!(
            format!("{e:#}").contains("kernel.no_such_sysctl"),
            "the error does not name the sysctl: {e:#}"
        ),
    }
    leaks.assert_clean()
}
