//! The command lines of the cluster's processes: pure, from the cluster's dir, its
//! certificates and the node's IP.

use std::net::Ipv4Addr;
use std::path::Path;

use super::pki::Pki;

/// The test node's name (`--hostname-override`).
pub const NODE_NAME: &str = "spry-test-node";
const SERVICE_CIDR: &str = "10.96.0.0/16";

pub struct Flags<'a> {
    pub dir: &'a Path,
    pub pki: &'a Pki,
    pub node_ip: Ipv4Addr,
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Flags<'_> {
    /// A single-member etcd; fsync off (a test cluster's data is thrown away).
    pub fn etcd(&self, client_url: &str, peer_url: &str) -> Vec<String> {
        vec![
            "--name=default".into(),
            format!("--data-dir={}", path(&self.dir.join("etcd"))),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ]
    }

    /// Serving on the node IP (the kubelet refuses a loopback one); the kubelet is reached
    /// at its InternalIP, authenticated with the admin certificate.
    pub fn apiserver(&self, etcd_url: &str, port: u16) -> Vec<String> {
        let pki = self.pki;
        vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={}", self.node_ip),
            format!("--advertise-address={}", self.node_ip),
            format!("--secure-port={port}"),
            format!("--tls-cert-file={}", path(&pki.cert("apiserver"))),
            format!("--tls-private-key-file={}", path(&pki.key("apiserver"))),
            format!("--client-ca-file={}", path(&pki.ca_cert())),
            format!("--kubelet-client-certificate={}", path(&pki.cert("admin"))),
            format!("--kubelet-client-key={}", path(&pki.key("admin"))),
            "--kubelet-preferred-address-types=InternalIP".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", path(&pki.sa_pub())),
            format!("--service-account-signing-key-file={}", path(&pki.sa_key())),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=AlwaysAllow".into(),
            "--allow-privileged=true".into(),
            format!("--cert-dir={}", path(&self.dir.join("apiserver-certs"))),
            "--profiling=false".into(),
        ]
    }

    /// Every controller (Deployments, ReplicaSets, service-account tokens...), no serving.
    pub fn controller_manager(&self, kubeconfig: &Path) -> Vec<String> {
        let pki = self.pki;
        vec![
            format!("--kubeconfig={}", path(kubeconfig)),
            format!("--service-account-private-key-file={}", path(&pki.sa_key())),
            format!("--root-ca-file={}", path(&pki.ca_cert())),
            format!("--cluster-signing-cert-file={}", path(&pki.ca_cert())),
            format!("--cluster-signing-key-file={}", path(&pki.ca_key())),
            "--leader-elect=false".into(),
            "--use-service-account-credentials=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=0".into(),
        ]
    }

    pub fn scheduler(&self, kubeconfig: &Path) -> Vec<String> {
        vec![
            format!("--kubeconfig={}", path(kubeconfig)),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=0".into(),
        ]
    }

    pub fn kubelet(&self, config: &Path, kubeconfig: &Path) -> Vec<String> {
        vec![
            format!("--config={}", path(config)),
            format!("--kubeconfig={}", path(kubeconfig)),
            format!("--root-dir={}", path(&self.dir.join("kubelet"))),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={}", self.node_ip),
        ]
    }
}
