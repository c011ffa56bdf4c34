//! The kubelet's configuration file for the test node.

use std::net::Ipv4Addr;
use std::path::Path;

/// What the kubelet of the test node is given.
pub struct KubeletSettings<'a> {
    pub node_ip: Ipv4Addr,
    pub port: u16,
    pub runtime_socket: &'a Path,
    pub cgroup_root: &'a str,
    pub pod_logs: &'a Path,
    pub ca_cert: &'a Path,
    pub tls_cert: &'a Path,
    pub tls_key: &'a Path,
    /// Pass a pod's RuntimeClass handler to image pulls (alpha gate
    /// `RuntimeClassInImageCriApi`), so containerd pulls into the handler's snapshotter.
    pub runtime_class_in_image_pulls: bool,
}

/// A `KubeletConfiguration` for a throwaway node: cgroupfs (containerd's runc default), swap
/// and cgroup v1 tolerated, no iptables chains, no image GC and no disk eviction (as kind
/// does: a test machine's shared disk can dip under any percentage while a test runs, and a
/// node tainted `disk-pressure` schedules nothing, so every later test would time out), anonymous read access
/// for the apiserver's logs/exec proxying, and every path it writes under our dirs where the
/// kubelet lets us choose.
pub fn config_yaml(s: &KubeletSettings) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "{node_ip}"
port: {port}
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
  x509:
    clientCAFile: "{ca}"
authorization:
  mode: AlwaysAllow
tlsCertFile: "{cert}"
tlsPrivateKeyFile: "{key}"
containerRuntimeEndpoint: "unix://{socket}"
imageServiceEndpoint: "unix://{socket}"
cgroupDriver: cgroupfs
cgroupRoot: "{cgroup_root}"
failSwapOn: false
failCgroupV1: false
makeIPTablesUtilChains: false
podLogsDirectory: "{pod_logs}"
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
clusterDomain: cluster.local
syncFrequency: 10s
fileCheckFrequency: 10s
nodeStatusUpdateFrequency: 5s
shutdownGracePeriod: 0s
featureGates:
  RuntimeClassInImageCriApi: {runtime_class_in_image_pulls}
"#,
        node_ip = s.node_ip,
        port = s.port,
        ca = s.ca_cert.display(),
        cert = s.tls_cert.display(),
        key = s.tls_key.display(),
        socket = s.runtime_socket.display(),
        cgroup_root = s.cgroup_root,
        pod_logs = s.pod_logs.display(),
        runtime_class_in_image_pulls = s.runtime_class_in_image_pulls,
    )
}
