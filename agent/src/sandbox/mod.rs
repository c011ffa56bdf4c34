//! The pod's identity inside the VM: hostname, DNS, entropy, clock and sysctls. Applied
//! by CreateSandbox after every boot or snapshot restore, never baked into the image.

pub mod sysctl;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};
use spry_proto::agent::CreateSandboxRequest;

use crate::sys;

/// Errors of applying the sandbox identity.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("the sandbox id must not be empty")]
    EmptyId,
    #[error("sandbox {existing} already exists (asked for {requested})")]
    AlreadyExists { existing: String, requested: String },
    #[error("hostname {hostname:?} is not valid")]
    BadHostname { hostname: String },
    #[error("DNS entry {entry:?} contains a line break")]
    BadDnsEntry { entry: String },
    #[error("failed to set the hostname")]
    Hostname { source: nix::Error },
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to add entropy through {path}")]
    Entropy {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to set the clock")]
    Clock { source: nix::Error },
    #[error("the clock value {nanos} is negative")]
    BadClock { nanos: i64 },
    #[error(transparent)]
    Sysctl(#[from] sysctl::SysctlError),
}

/// Which host-wide effects CreateSandbox may have (all in the VM; the host test mode leaves
/// the host's clock alone).
#[derive(Debug, Clone, Copy)]
pub struct SandboxOptions {
    pub set_clock: bool,
    /// The VM's network stack is the pod's: bring loopback up and configure the NICs.
    pub own_network: bool,
    /// Mount the pod's /dev/shm tmpfs and file share (only in a VM).
    pub pod_mounts: bool,
    /// Set the pod's sysctls (only in a VM: they are the kernel's).
    pub set_sysctls: bool,
}

/// The pod identity applied to this VM.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub id: String,
    pub hostname: String,
    /// The pod's resolv.conf, bind-mounted into containers that do not mount their own.
    pub resolv_conf: Option<PathBuf>,
}

/// Applies `request` to this VM. `current` is the sandbox already applied, if any: the same
/// id is re-applied (idempotent), another one is refused.
pub fn apply(
    request: &CreateSandboxRequest,
    current: Option<&Sandbox>,
    run_dir: &Path,
    options: SandboxOptions,
) -> Result<Sandbox, SandboxError> {
    if request.sandbox_id.is_empty() {
        return Err(SandboxError::EmptyId);
    }
    if let Some(existing) = current {
        if existing.id != request.sandbox_id {
            return Err(SandboxError::AlreadyExists {
                existing: existing.id.clone(),
                requested: request.sandbox_id.clone(),
            });
        }
    }
    if !request.entropy.is_empty() {
        let path = PathBuf::from("/dev/random");
        let random = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|source| SandboxError::Entropy {
                path: path.clone(),
                source,
            })?;
        sys::add_entropy(random.as_fd(), &request.entropy)
            .and_then(|()| sys::reseed_crng(random.as_fd()))
            .map_err(|source| SandboxError::Entropy { path, source })?;
    }
    if options.set_clock && request.clock_unix_nanos != 0 {
        let nanos =
            u64::try_from(request.clock_unix_nanos).map_err(|_| SandboxError::BadClock {
                nanos: request.clock_unix_nanos,
            })?;
        clock_settime(
            ClockId::CLOCK_REALTIME,
            TimeSpec::from_duration(Duration::from_nanos(nanos)),
        )
        .map_err(|source| SandboxError::Clock { source })?;
    }
    if options.set_sysctls {
        sysctl::apply(Path::new("/proc/sys"), &request.sysctls)?;
    } else if !request.sysctls.is_empty() {
        tracing::warn!("not in a VM: the pod's sysctls are not applied");
    }
    if !request.hostname.is_empty() {
        validate_hostname(&request.hostname)?;
        nix::unistd::sethostname(&request.hostname)
            .map_err(|source| SandboxError::Hostname { source })?;
    }
    let resolv_conf = if request.dns_nameservers.is_empty()
        && request.dns_searches.is_empty()
        && request.dns_options.is_empty()
    {
        None
    } else {
        let dir = run_dir.join("sandbox");
        let path = dir.join("resolv.conf");
        let text = resolv_conf_text(request)?;
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|source| SandboxError::Write {
                path: path.clone(),
                source,
            })?;
        Some(path)
    };
    Ok(Sandbox {
        id: request.sandbox_id.clone(),
        hostname: request.hostname.clone(),
        resolv_conf,
    })
}

fn validate_hostname(hostname: &str) -> Result<(), SandboxError> {
    let ok = hostname.len() <= 64
        && hostname
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(SandboxError::BadHostname {
            hostname: hostname.to_string(),
        })
    }
}

/// The resolv.conf for the pod's DNS settings.
pub fn resolv_conf_text(request: &CreateSandboxRequest) -> Result<String, SandboxError> {
    let all = request
        .dns_nameservers
        .iter()
        .chain(&request.dns_searches)
        .chain(&request.dns_options);
    for entry in all {
        if entry.contains(['\n', '\r']) {
            return Err(SandboxError::BadDnsEntry {
                entry: entry.clone(),
            });
        }
    }
    let mut text = String::new();
    for server in &request.dns_nameservers {
        text.push_str(&format!("nameserver {server}\n"));
    }
    if !request.dns_searches.is_empty() {
        text.push_str(&format!("search {}\n", request.dns_searches.join(" ")));
    }
    if !request.dns_options.is_empty() {
        text.push_str(&format!("options {}\n", request.dns_options.join(" ")));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_lists_servers_searches_and_options() {
        let mut request = CreateSandboxRequest::new();
        request.dns_nameservers = vec!["10.0.0.10".into(), "1.1.1.1".into()];
        request.dns_searches = vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()];
        request.dns_options = vec!["ndots:5".into()];
        assert_eq!(
            resolv_conf_text(&request).unwrap(),
            "nameserver 10.0.0.10\nnameserver 1.1.1.1\nsearch ns.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
        request.dns_options = vec!["x\nnameserver 6.6.6.6".into()];
        assert!(matches!(
            resolv_conf_text(&request),
            Err(SandboxError::BadDnsEntry { .. })
        ));
    }

    #[test]
    fn a_second_sandbox_is_refused_but_the_same_one_reapplies() {
        let dir = tempfile::tempdir().unwrap();
        let mut request = CreateSandboxRequest::new();
        request.sandbox_id = "pod-a".into();
        request.dns_nameservers = vec!["10.0.0.10".into()];
        let options = SandboxOptions {
            set_clock: false,
            own_network: false,
            pod_mounts: false,
            set_sysctls: false,
        };
        let sandbox = apply(&request, None, dir.path(), options).unwrap();
        assert_eq!(
            std::fs::read_to_string(sandbox.resolv_conf.as_ref().unwrap()).unwrap(),
            "nameserver 10.0.0.10\n"
        );
        assert!(apply(&request, Some(&sandbox), dir.path(), options).is_ok());
        request.sandbox_id = "pod-b".into();
        assert!(matches!(
            apply(&request, Some(&sandbox), dir.path(), options),
            Err(SandboxError::AlreadyExists { .. })
        ));
    }

    #[test]
    fn hostnames_are_checked() {
        assert!(validate_hostname("web-0.ns").is_ok());
        assert!(validate_hostname("bad host").is_err());
        assert!(validate_hostname(&"a".repeat(65)).is_err());
    }
}
