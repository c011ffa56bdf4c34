//! The host↔agent transport: one trait, three implementations.

mod virtio_serial;

use std::path::PathBuf;

use ttrpc::r#async::transport::Listener;

pub use virtio_serial::{find_port, VirtioSerial};

/// Errors of setting up a transport.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("no virtio-serial port named {name} appeared under {dir}")]
    PortNotFound { name: String, dir: PathBuf },
    #[error("failed to open {path}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to listen on {address}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("channel {value:?} is not one of virtio-serial, vsock, unix://PATH")]
    Unknown { value: String },
}

/// A transport that yields ttrpc connections from the host.
pub trait AgentChannel {
    fn listen(self: Box<Self>) -> Result<Listener, ChannelError>;
}

/// vsock port the agent listens on (KVM hosts with vhost-vsock).
pub const VSOCK_PORT: u32 = 1024;

/// AF_VSOCK listener on any CID.
pub struct Vsock {
    pub port: u32,
}

impl AgentChannel for Vsock {
    fn listen(self: Box<Self>) -> Result<Listener, ChannelError> {
        let address = format!("vsock://-1:{}", self.port);
        Listener::bind(&address).map_err(|source| ChannelError::Listen { address, source })
    }
}

/// A unix socket (host test mode). A stale socket file is replaced.
pub struct Unix {
    pub path: PathBuf,
}

impl AgentChannel for Unix {
    fn listen(self: Box<Self>) -> Result<Listener, ChannelError> {
        let _ = std::fs::remove_file(&self.path);
        let address = format!("unix://{}", self.path.display());
        Listener::bind(&address).map_err(|source| ChannelError::Listen { address, source })
    }
}

/// Parses a channel name: `virtio-serial`, `vsock` or `unix://PATH`.
pub fn from_name(value: &str) -> Result<Box<dyn AgentChannel>, ChannelError> {
    match value {
        "virtio-serial" => Ok(Box::new(VirtioSerial::default())),
        "vsock" => Ok(Box::new(Vsock { port: VSOCK_PORT })),
        other => match other.strip_prefix("unix://") {
            Some(path) if !path.is_empty() => Ok(Box::new(Unix { path: path.into() })),
            _ => Err(ChannelError::Unknown {
                value: value.to_string(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_parse() {
        assert!(from_name("virtio-serial").is_ok());
        assert!(from_name("vsock").is_ok());
        assert!(from_name("unix:///tmp/a.sock").is_ok());
        assert!(matches!(
            from_name("unix://"),
            Err(ChannelError::Unknown { .. })
        ));
        assert!(matches!(
            from_name("tcp://x"),
            Err(ChannelError::Unknown { .. })
        ));
    }

    #[tokio::test]
    async fn unix_listener_accepts_a_connection() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        std::fs::write(&path, b"stale").unwrap();
        let mut listener = Box::new(Unix { path: path.clone() }).listen().unwrap();
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        assert!(listener.next().await.unwrap().is_ok());
    }
}
