//! The agent's error type and its one mapping to ttrpc status codes.

use ttrpc::Code;

use crate::container::helper::FailureKind;
use crate::container::{ContainerError, StdioError};
use crate::network::NetworkError;
use crate::sandbox::sysctl::SysctlError;
use crate::sandbox::SandboxError;
use crate::storage::StorageError;
use crate::volumes::VolumeError;

/// Everything an RPC can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("protocol version {requested} is not supported (the agent speaks {supported})")]
    ProtocolVersion { requested: u32, supported: u32 },
    #[error("the sandbox has not been created yet")]
    NoSandbox,
    #[error("the sandbox exists: its network is no longer the agent's to warm")]
    SandboxExists,
    #[error("signal {signal} is not a valid signal number")]
    BadSignal { signal: u32 },
    #[error("sandbox setup failed")]
    Sandbox {
        #[from]
        source: SandboxError,
    },
    #[error("pod network setup failed")]
    Network {
        #[from]
        source: NetworkError,
    },
    #[error("pod volume setup failed")]
    Volume {
        #[from]
        source: VolumeError,
    },
    #[error("container operation failed")]
    Container { source: Box<ContainerError> },
}

impl From<ContainerError> for AgentError {
    fn from(source: ContainerError) -> Self {
        AgentError::Container {
            source: Box::new(source),
        }
    }
}

impl AgentError {
    /// The ttrpc status code for this error (the table in agent.proto's header).
    pub fn code(&self) -> Code {
        match self {
            AgentError::ProtocolVersion { .. } => Code::FAILED_PRECONDITION,
            AgentError::NoSandbox => Code::UNAVAILABLE,
            AgentError::SandboxExists => Code::FAILED_PRECONDITION,
            AgentError::BadSignal { .. } => Code::INVALID_ARGUMENT,
            AgentError::Sandbox { source } => match source {
                SandboxError::EmptyId
                | SandboxError::BadHostname { .. }
                | SandboxError::BadDnsEntry { .. }
                | SandboxError::BadClock { .. } => Code::INVALID_ARGUMENT,
                SandboxError::AlreadyExists { .. } => Code::ALREADY_EXISTS,
                SandboxError::Hostname { .. }
                | SandboxError::Write { .. }
                | SandboxError::Entropy { .. }
                | SandboxError::Clock { .. } => Code::INTERNAL,
                SandboxError::Sysctl(sysctl) => match sysctl {
                    SysctlError::BadName { .. } | SysctlError::BadValue { .. } => {
                        Code::INVALID_ARGUMENT
                    }
                    // The guest's kernel has no such sysctl, or refuses the value.
                    SysctlError::Write { .. } => Code::FAILED_PRECONDITION,
                },
            },
            AgentError::Network { source } => match source {
                NetworkError::BadMac { .. }
                | NetworkError::BadIp { .. }
                | NetworkError::BadCidr { .. }
                | NetworkError::BadName { .. }
                | NetworkError::BadMtu { .. }
                | NetworkError::BadRoute { .. }
                | NetworkError::UnknownDevice { .. }
                | NetworkError::DuplicateInterface { .. } => Code::INVALID_ARGUMENT,
                NetworkError::NoSuchNic { .. } => Code::NOT_FOUND,
                NetworkError::Connect { .. }
                | NetworkError::Netlink { .. }
                | NetworkError::Sysctl { .. } => Code::INTERNAL,
            },
            AgentError::Volume { source } => match source {
                VolumeError::BadSharePath { .. }
                | VolumeError::NoSource { .. }
                | VolumeError::BadSnapshot { .. }
                | VolumeError::BadPodVolume { .. }
                | VolumeError::BadBlockDevice { .. } => Code::INVALID_ARGUMENT,
                VolumeError::NoShare { .. } => Code::FAILED_PRECONDITION,
                VolumeError::PodDisk { source, .. } | VolumeError::BlockDevice { source, .. } => {
                    match source {
                        StorageError::DiskNotFound { .. } => Code::NOT_FOUND,
                        _ => Code::INTERNAL,
                    }
                }
                VolumeError::Shm { .. }
                | VolumeError::Dir { .. }
                | VolumeError::Share(_)
                | VolumeError::Tmpfs { .. } => Code::INTERNAL,
            },
            AgentError::Container { source } => container_code(source),
        }
    }

    /// One line for a person: this error and its causes.
    pub fn message(&self) -> String {
        let mut message = String::new();
        let mut current: Option<&dyn std::error::Error> = Some(self);
        while let Some(err) = current {
            let text = err.to_string();
            if !message.contains(&text) {
                if !message.is_empty() {
                    message.push_str(": ");
                }
                message.push_str(&text);
            }
            current = err.source();
        }
        message
    }
}

fn container_code(err: &ContainerError) -> Code {
    match err {
        ContainerError::NotFound { .. }
        | ContainerError::ExecNotFound { .. }
        | ContainerError::ProcessExited { .. } => Code::NOT_FOUND,
        ContainerError::AlreadyExists { .. } | ContainerError::ExecAlreadyExists { .. } => {
            Code::ALREADY_EXISTS
        }
        ContainerError::WrongState { .. } => Code::FAILED_PRECONDITION,
        ContainerError::Spec { .. } | ContainerError::Resources { .. } => Code::INVALID_ARGUMENT,
        ContainerError::Storage { source, .. } => match source {
            StorageError::NoLayers
            | StorageError::NoSource { .. }
            | StorageError::UnknownSource { .. }
            | StorageError::BadSharedPath { .. }
            | StorageError::SharedPathMissing { .. } => Code::INVALID_ARGUMENT,
            StorageError::DiskNotFound { .. } => Code::NOT_FOUND,
            _ => Code::INTERNAL,
        },
        ContainerError::Runtime { .. } => match err.runtime_kind() {
            Some(FailureKind::InvalidSpec) => Code::INVALID_ARGUMENT,
            Some(FailureKind::WrongState) => Code::FAILED_PRECONDITION,
            Some(FailureKind::NotFound) => Code::NOT_FOUND,
            Some(FailureKind::Internal) | None => Code::INTERNAL,
        },
        ContainerError::Stdio { source, .. } => match source {
            StdioError::StdinClosed | StdioError::NoTerminal => Code::FAILED_PRECONDITION,
            _ => Code::INTERNAL,
        },
        ContainerError::Cgroup { .. }
        | ContainerError::Signal { .. }
        | ContainerError::Io { .. }
        | ContainerError::PtyTimeout { .. }
        | ContainerError::Unkillable { .. } => Code::INTERNAL,
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(err: AgentError) -> Self {
        let code = err.code();
        let message = err.message();
        if code == Code::INTERNAL {
            tracing::error!(error = %message, "request failed");
        } else {
            tracing::debug!(?code, error = %message, "request refused");
        }
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::helper::HelperError;
    use crate::container::spec::SpecError;

    fn status(err: AgentError) -> (Code, String) {
        match ttrpc::Error::from(err) {
            ttrpc::Error::RpcStatus(status) => (status.code(), status.message().to_string()),
            other => panic!("expected a status, got {other:?}"),
        }
    }

    fn container(source: ContainerError) -> AgentError {
        AgentError::from(source)
    }

    #[test]
    fn errors_map_to_the_documented_codes() {
        let id = || "c1".to_string();
        let sysctl = |e| AgentError::Sandbox {
            source: SandboxError::Sysctl(e),
        };
        let cases = [
            (AgentError::SandboxExists, Code::FAILED_PRECONDITION),
            (
                sysctl(SysctlError::BadName { name: "a b".into() }),
                Code::INVALID_ARGUMENT,
            ),
            (
                sysctl(SysctlError::Write {
                    name: "kernel.nope".into(),
                    path: "/proc/sys/kernel/nope".into(),
                    source: std::io::ErrorKind::NotFound.into(),
                }),
                Code::FAILED_PRECONDITION,
            ),
            (
                container(ContainerError::NotFound { id: id() }),
                Code::NOT_FOUND,
            ),
            (
                container(ContainerError::ProcessExited { pid: 5 }),
                Code::NOT_FOUND,
            ),
            (
                container(ContainerError::AlreadyExists { id: id() }),
                Code::ALREADY_EXISTS,
            ),
            (
                container(ContainerError::WrongState {
                    id: id(),
                    action: "remove",
                    state: "running",
                }),
                Code::FAILED_PRECONDITION,
            ),
            (
                container(ContainerError::Spec {
                    id: id(),
                    source: SpecError::NoArgs,
                }),
                Code::INVALID_ARGUMENT,
            ),
            (
                container(ContainerError::Runtime {
                    id: id(),
                    source: HelperError::Failed {
                        kind: FailureKind::InvalidSpec,
                        message: "bad".into(),
                    },
                }),
                Code::INVALID_ARGUMENT,
            ),
            (
                container(ContainerError::Runtime {
                    id: id(),
                    source: HelperError::NoReply,
                }),
                Code::INTERNAL,
            ),
            (
                container(ContainerError::Stdio {
                    id: id(),
                    source: StdioError::StdinClosed,
                }),
                Code::FAILED_PRECONDITION,
            ),
            (AgentError::NoSandbox, Code::UNAVAILABLE),
            (
                AgentError::BadSignal { signal: 999 },
                Code::INVALID_ARGUMENT,
            ),
            (
                AgentError::from(SandboxError::AlreadyExists {
                    existing: "a".into(),
                    requested: "b".into(),
                }),
                Code::ALREADY_EXISTS,
            ),
            (
                AgentError::ProtocolVersion {
                    requested: 2,
                    supported: 1,
                },
                Code::FAILED_PRECONDITION,
            ),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            assert_eq!(status(err).0, code, "{text}");
        }
    }

    #[test]
    fn the_message_carries_the_cause_once() {
        let err = container(ContainerError::Spec {
            id: "c1".into(),
            source: SpecError::ExecutableNotFound {
                name: "nope".into(),
                search_path: "/bin".into(),
            },
        });
        let (_, message) = status(err);
        assert_eq!(
            message,
            "container operation failed: invalid spec for container c1: executable \"nope\" was not found in the container (PATH \"/bin\")"
        );
    }
}
