//! A container in the pod's PID namespace (for a Spry pod: the VM's) whose init exits
//! while a child it started in the background lives on, keeping the container's output
//! open. Under runc, containerd's shim kills such leftovers when the init exits. Found by
//! critest's PID namespace specs with Spry: the leftover kept the output open, the shim
//! kept the output FIFO open, and containerd, which reads a task's output to its end
//! before deleting it, hung in its event loop: the pod could not be stopped for good.
//! Now the agent kills what the init left, and the shim closes a process's output once it
//! gives up waiting for it (a guest is not trusted to end its streams). Needs root, the
//! guest and the test images.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::json;
use spry_integration::spry::SpryNode;
use spry_integration::{require_root, ContainerConfig, PodConfig};

#[test]
fn an_init_that_leaves_a_daemonized_child_exits_and_is_removed() -> Result<()> {
    require_root()?;
    let node = SpryNode::start("spry-leftover", false)?;
    let containerd = &node.containerd;
    let leaks = node.leak_check()?;
    let crictl = containerd.crictl().with_timeout(Duration::from_secs(60));
    // NamespaceMode POD (0) for the PID namespace: the container shares the pod's.
    let pod_cfg = PodConfig::new("leftover")
        .patch(json!({"linux": {"security_context": {"namespace_options": {"pid": 0}}}}))
        .write_to(&containerd.dir())?;
    let pod = crictl.runp(&pod_cfg, Some("spry"))?;
    let ctr_cfg = ContainerConfig::new("daemonizer", &node.image)
        .command(&[
            "sh",
            "-c",
            "sleep 3600 & echo child started; sleep 1; echo init done",
        ])
        .patch(json!({"linux": {"security_context": {"namespace_options": {"pid": 0}}}}))
        .write_to(&containerd.dir())?;
    let ctr = crictl.create(&pod, &ctr_cfg, &pod_cfg)?;
    let t0 = Instant::now();
    crictl.start(&ctr)?;
    crictl.wait_container_state(&ctr, "CONTAINER_EXITED", Duration::from_secs(30))?;
    let took = t0.elapsed();
    eprintln!("the container read exited {took:?} after its start");
    let logs = crictl.logs(&ctr)?;
    ensure!(
        logs.contains("child started") && logs.contains("init done"),
        "logs: {logs:?}"
    );
    // The exit came with its output ended, not after the shim gave up on it.
    let log = containerd.log();
    let late: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("output not drained") && l.contains(&ctr))
        .collect();
    ensure!(
        late.is_empty(),
        "the exit waited for output a leftover held open:\n{}",
        late.join("\n")
    );
    crictl.rm(&ctr)?;
    crictl.stopp(&pod)?;
    crictl.rmp(&pod)?;
    leaks.assert_clean()
}
