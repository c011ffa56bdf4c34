//! Checks of a VM's config before anything is spawned or created.

use std::path::Path;

use super::cmdline::StatePaths;
use super::{AgentChannelKind, GuestMemory, NetNamespace, VmConfig, VmError};

/// Linux `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
const MIN_MEMORY_MIB: u32 = 64;

/// The files a VM needs, checked before anything (the KVM probe included) uses them, so a
/// missing kernel is reported as such and not as an unusable accelerator.
pub fn require_boot_files(config: &VmConfig) -> Result<(), VmError> {
    for (what, path) in [
        ("kernel", &config.kernel),
        ("initramfs", &config.initramfs),
        ("QEMU binary", &config.qemu),
    ] {
        if !path.is_file() {
            return Err(VmError::MissingFile {
                what,
                path: path.clone(),
            });
        }
    }
    Ok(())
}

/// Checks the config before anything is spawned or created.
pub fn validate(config: &VmConfig) -> Result<(), VmError> {
    let id_ok = !config.id.is_empty()
        && config.id.len() <= 64
        && config
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !id_ok {
        return Err(VmError::InvalidId {
            id: config.id.clone(),
        });
    }
    if config.cpus == 0 {
        return Err(VmError::NoCpus {
            id: config.id.clone(),
        });
    }
    if config.restore.is_some() && !matches!(config.memory, GuestMemory::PrivateFile { .. }) {
        return Err(VmError::RestoreWithoutMemoryFile {
            id: config.id.clone(),
        });
    }
    if let GuestMemory::PrivateFile { path } = &config.memory {
        if !path.is_file() {
            return Err(VmError::MissingFile {
                what: "memory file",
                path: path.clone(),
            });
        }
    }
    if config.memory_mib < MIN_MEMORY_MIB {
        return Err(VmError::TooLittleMemory {
            id: config.id.clone(),
            memory_mib: config.memory_mib,
            minimum: MIN_MEMORY_MIB,
        });
    }
    if !config.nics.is_empty() && config.netns == NetNamespace::Inherit {
        // The taps would land in the shim's own namespace, next to the host's interfaces.
        return Err(VmError::NicsWithoutNetns {
            id: config.id.clone(),
        });
    }
    for nic in &config.nics {
        let ok = !nic.tap.is_empty()
            && nic.tap.len() < 16
            && nic
                .tap
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
        if !ok {
            return Err(VmError::InvalidTapName {
                id: config.id.clone(),
                tap: nic.tap.clone(),
            });
        }
    }
    require_boot_files(config)?;
    if let AgentChannelKind::Vsock { .. } = config.agent_channel {
        if !Path::new("/dev/vhost-vsock").exists() {
            return Err(VmError::NoVhostVsock);
        }
    }
    let paths = StatePaths::new(&config.state_dir);
    for socket in [&paths.qmp_socket, &paths.agent_socket] {
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmError::SocketPathTooLong {
                path: socket.clone(),
                max: MAX_SOCKET_PATH,
            });
        }
    }
    Ok(())
}
