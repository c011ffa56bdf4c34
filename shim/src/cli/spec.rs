//! The OCI spec `spry vm run` gives its container: runc's default spec, adjusted.

use std::path::PathBuf;

use oci_spec::runtime::{LinuxMemoryBuilder, LinuxNamespaceType, LinuxResourcesBuilder, Spec};

/// What the user asked for on the command line.
#[derive(Debug, Clone, Default)]
pub struct ProcessOptions {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub hostname: Option<String>,
    pub terminal: bool,
    /// cgroup memory limit for the container, bytes.
    pub memory_limit: Option<i64>,
}

/// Builds the container spec. The network namespace is dropped: containers share the
/// VM's network, as a pod's containers share the pod's.
pub fn container_spec(opts: &ProcessOptions) -> Spec {
    let mut spec = Spec::default();
    if let Some(process) = spec.process_mut() {
        process.set_args(Some(opts.args.clone()));
        process.set_terminal(Some(opts.terminal));
        let mut env =
            vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
        if opts.terminal {
            env.push("TERM=xterm".into());
        }
        env.extend(opts.env.iter().cloned());
        process.set_env(Some(env));
        if let Some(cwd) = &opts.cwd {
            process.set_cwd(cwd.clone());
        }
    }
    spec.set_hostname(opts.hostname.clone().or_else(|| Some("spry".into())));
    if let Some(root) = spec.root_mut() {
        root.set_readonly(Some(false));
    }
    if let Some(linux) = spec.linux_mut() {
        if let Some(namespaces) = linux.namespaces_mut() {
            namespaces.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
        }
        if let Some(limit) = opts.memory_limit {
            let memory = LinuxMemoryBuilder::default()
                .limit(limit)
                .swap(limit)
                .build()
                .expect("memory limits are plain numbers");
            let resources = LinuxResourcesBuilder::default()
                .memory(memory)
                .build()
                .expect("resources are plain values");
            linux.set_resources(Some(resources));
        }
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_carries_the_options_and_no_network_namespace() {
        let spec = container_spec(&ProcessOptions {
            args: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec!["FOO=bar".into()],
            cwd: Some("/tmp".into()),
            hostname: Some("box".into()),
            terminal: true,
            memory_limit: Some(32 << 20),
        });
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.args().as_ref().unwrap()[0], "sh");
        assert!(process
            .env()
            .as_ref()
            .unwrap()
            .contains(&"FOO=bar".to_string()));
        assert_eq!(process.cwd(), &PathBuf::from("/tmp"));
        assert_eq!(process.terminal(), Some(true));
        assert_eq!(spec.hostname().as_deref(), Some("box"));
        let linux = spec.linux().as_ref().unwrap();
        let namespaces = linux.namespaces().as_ref().unwrap();
        assert!(namespaces
            .iter()
            .all(|ns| ns.typ() != LinuxNamespaceType::Network));
        assert!(namespaces
            .iter()
            .any(|ns| ns.typ() == LinuxNamespaceType::Pid));
        let memory = linux
            .resources()
            .as_ref()
            .unwrap()
            .memory()
            .as_ref()
            .unwrap();
        assert_eq!(memory.limit(), Some(32 << 20));
    }
}
