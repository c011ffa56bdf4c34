//! A one-node Kubernetes cluster with Spry for a user to try (the kubelet tests' cluster,
//! `spry_integration::kube`): runs in the foreground until Ctrl-C or SIGTERM
//! (`scripts/demo-k8s.sh --stop`), then removes everything it made.
//!
//! Usage (run by scripts/demo-k8s.sh): k8s-demo

use std::io::Write;

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};
use spry_integration::kube::{manifests, Cluster};
use spry_integration::{paths, require_root, Registry};

/// Where `--stop` finds the running demo.
const PID_FILE: &str = "/run/spry-k8s-demo.pid";

fn main() -> Result<()> {
    require_root()?;
    let registry = Registry::start_with_images(&["pause:1", "busybox:1"])?;
    let cluster = Cluster::start("demo", &registry)?;
    std::fs::write(PID_FILE, std::process::id().to_string())
        .with_context(|| format!("writing {PID_FILE}"))?;
    let example = cluster.dir().join("hello-spry.yaml");
    std::fs::write(
        &example,
        manifests::pod(
            "hello-spry",
            Some("spry"),
            &registry.image("busybox:1"),
            "echo hello from a Spry VM; uname -r; sleep 3600",
            "",
        ),
    )?;
    // Blocked only now: the cluster's processes are started and keep default handling.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("blocking SIGINT/SIGTERM")?;
    let kubectl = paths::deps_bin_dir().join("kubectl");
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\nSpry on Kubernetes: a one-node cluster is running (kubelet, apiserver, etcd, \
         scheduler, controller-manager; Spry's RuntimeClass applied).\n\
         In another shell (as root):\n\n  \
         export KUBECONFIG={kubeconfig}\n  \
         alias kubectl={kubectl}\n  \
         kubectl get runtimeclass,nodes\n  \
         kubectl apply -f {example}\n  \
         kubectl wait --for=condition=Ready pod/hello-spry --timeout=180s\n  \
         kubectl logs hello-spry            # the guest kernel's release, not the host's\n  \
         kubectl exec -it hello-spry -- sh\n  \
         kubectl set image pod/hello-spry main={python}   # swapped inside the same VM\n\n\
         Images: {registry} (pause:1, busybox:1; scripts/build-test-images.sh adds python:1).\n\
         Stop: Ctrl-C here, or scripts/demo-k8s.sh --stop; everything it made is removed.",
        kubeconfig = cluster.kubeconfig().display(),
        kubectl = kubectl.display(),
        example = example.display(),
        python = registry.image("python:1"),
        registry = registry.host(),
    )?;
    drop(out);
    let signal = signals.wait().context("waiting for a signal")?;
    eprintln!("k8s-demo: {signal:?}: tearing the cluster down");
    let _ = std::fs::remove_file(PID_FILE);
    drop(cluster);
    Ok(())
}
