//! The shim's errors and their one mapping to ttrpc status codes (which containerd turns
//! into its errdefs: NotFound, AlreadyExists, FailedPrecondition...).

use std::path::PathBuf;

use crate::agent_client::AgentError;
use crate::cgroup::CgroupError;
use crate::config::ConfigError;
use crate::network::NetworkError;
use crate::rootfs::{CacheError, ErofsError, RootfsError};
use crate::sandbox::ResourceError;
use crate::sandbox::SandboxError;
use crate::volumes::VolumeError;

/// Failure of a task API call.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("container {id} not found")]
    ContainerNotFound { id: String },
    #[error("process {exec_id} of container {id} not found")]
    ProcessNotFound { id: String, exec_id: String },
    #[error("container {id} already exists")]
    ContainerExists { id: String },
    #[error("process {exec_id} already exists in container {id}")]
    ProcessExists { id: String, exec_id: String },
    #[error("container {id} cannot be created before its pod sandbox is running")]
    NoSandbox { id: String },
    #[error("process {exec_id:?} of container {id} is {state}, not {wanted}")]
    WrongState {
        id: String,
        exec_id: String,
        state: &'static str,
        wanted: &'static str,
    },
    #[error("cannot read the OCI spec {path}")]
    ReadSpec {
        path: PathBuf,
        #[source]
        source: Box<oci_spec::OciSpecError>,
    },
    #[error("the exec spec of {exec_id} in container {id} is not a valid OCI process")]
    ExecSpec {
        id: String,
        exec_id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the resources given to container {id} are not valid OCI LinuxResources")]
    Resources {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    // Boxed: these carry whole error chains and would bloat every Result.
    #[error(transparent)]
    Sandbox(Box<SandboxError>),
    #[error(transparent)]
    Agent(Box<AgentError>),
    #[error("cannot mount the rootfs of container {id} at {target}")]
    MountRootfs {
        id: String,
        target: PathBuf,
        #[source]
        source: containerd_shim::Error,
    },
    #[error("cannot open the stdio FIFO {path}")]
    Fifo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not supported by Spry")]
    Unsupported { what: &'static str },
    #[error(
        "pod {id} asks for the host's network (hostNetwork); a Spry pod is a VM with a kernel \
         and network stack of its own, so it cannot share the node's: run this pod with runc"
    )]
    HostNetwork { id: String },
    #[error("cannot bring the volumes of container {id} into its pod's VM")]
    Volume {
        id: String,
        #[source]
        source: Box<VolumeError>,
    },
    #[error("cannot place pod {id} in its cgroup")]
    Cgroup {
        id: String,
        #[source]
        source: crate::cgroup::CgroupError,
    },
    #[error(
        "the shim's {call} call ended before it finished ({}); the shim's log says why",
        if *panicked { "it panicked: a bug" } else { "the shim is shutting down" }
    )]
    CallAborted { call: &'static str, panicked: bool },
    #[error("cannot read the network of pod {id}")]
    Network {
        id: String,
        #[source]
        source: Box<NetworkError>,
    },
}

impl ShimError {
    /// The status code containerd sees.
    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            ShimError::ContainerNotFound { .. } | ShimError::ProcessNotFound { .. } => {
                Code::NOT_FOUND
            }
            ShimError::ContainerExists { .. } | ShimError::ProcessExists { .. } => {
                Code::ALREADY_EXISTS
            }
            ShimError::NoSandbox { .. } | ShimError::WrongState { .. } => Code::FAILED_PRECONDITION,
            ShimError::ReadSpec { .. }
            | ShimError::ExecSpec { .. }
            | ShimError::Resources { .. }
            | ShimError::Config(_) => Code::INVALID_ARGUMENT,
            ShimError::Unsupported { .. } => Code::UNIMPLEMENTED,
            ShimError::HostNetwork { .. } => Code::INVALID_ARGUMENT,
            ShimError::Cgroup { source, .. } => cgroup_code(source),
            ShimError::Network { source, .. } => network_code(source),
            ShimError::Volume { source, .. } => volume_code(source),
            ShimError::Agent(e) => agent_code(e),
            ShimError::Sandbox(e) => match e.as_ref() {
                SandboxError::Container { source, .. } => agent_code(source),
                SandboxError::ContainerExists { .. } => Code::ALREADY_EXISTS,
                SandboxError::StartVm { .. } => Code::FAILED_PRECONDITION,
                SandboxError::Volume(e) => volume_code(e),
                SandboxError::Rootfs(e) => rootfs_code(e),
                SandboxError::Resource(e) => match e {
                    ResourceError::Rootfs(e) => rootfs_code(e),
                    ResourceError::Network(e) => network_code(e),
                    ResourceError::Volume(e) => volume_code(e),
                    ResourceError::Cgroup(e) => cgroup_code(e),
                },
                SandboxError::DiedDuringBoot { .. }
                | SandboxError::Agent { .. }
                | SandboxError::StopVm { .. } => Code::INTERNAL,
            },
            ShimError::MountRootfs { .. }
            | ShimError::Fifo { .. }
            | ShimError::CallAborted { .. } => Code::INTERNAL,
        }
    }
}

fn cgroup_code(error: &CgroupError) -> ttrpc::Code {
    use ttrpc::Code;
    match error {
        CgroupError::BadPath { .. } => Code::INVALID_ARGUMENT,
        CgroupError::Create { .. } | CgroupError::Join { .. } | CgroupError::ReadProcess { .. } => {
            Code::INTERNAL
        }
    }
}

fn network_code(error: &NetworkError) -> ttrpc::Code {
    use ttrpc::Code;
    match error {
        NetworkError::UnsupportedLink { .. } | NetworkError::TooManyInterfaces { .. } => {
            Code::INVALID_ARGUMENT
        }
        NetworkError::OpenNetns { .. } => Code::FAILED_PRECONDITION,
        NetworkError::EnterNetns { .. }
        | NetworkError::Thread { .. }
        | NetworkError::ThreadDied { .. }
        | NetworkError::Connect { .. }
        | NetworkError::Netlink { .. }
        | NetworkError::MissingTap { .. }
        | NetworkError::PortForward { .. } => Code::INTERNAL,
    }
}

/// A full state dir (a layer image that does not fit) is the node's resource running
/// out, which kubelet and users tell apart from a bug by the code.
fn rootfs_code(error: &RootfsError) -> ttrpc::Code {
    use ttrpc::Code;
    let image = match error {
        RootfsError::Image(e) | RootfsError::Cache(CacheError::Build(e)) => e,
        RootfsError::NotADirectory { .. } => return Code::INVALID_ARGUMENT,
        RootfsError::WorkDir { .. }
        | RootfsError::Cache(
            CacheError::Layer { .. } | CacheError::Io { .. } | CacheError::Lock { .. },
        )
        | RootfsError::Writable(_)
        | RootfsError::Hotplug { .. }
        | RootfsError::EmptyDisk { .. }
        | RootfsError::Unplug { .. } => return Code::INTERNAL,
    };
    match image {
        ErofsError::NoRoom { .. } => Code::RESOURCE_EXHAUSTED,
        // The state dir filled up while the image was written (another writer took the
        // room the check saw).
        ErofsError::WriteImage { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            Code::RESOURCE_EXHAUSTED
        }
        ErofsError::Spawn { .. }
        | ErofsError::Failed { .. }
        | ErofsError::ReadTree { .. }
        | ErofsError::WriteImage { .. } => Code::INTERNAL,
    }
}

fn volume_code(error: &VolumeError) -> ttrpc::Code {
    use ttrpc::Code;
    match error {
        VolumeError::MissingSource { .. } | VolumeError::NoHostDevice { .. } => Code::NOT_FOUND,
        VolumeError::UnsupportedPropagation { .. }
        | VolumeError::UnsupportedSource { .. }
        | VolumeError::BadContainerId { .. } => Code::INVALID_ARGUMENT,
        VolumeError::NoShare { .. } => Code::FAILED_PRECONDITION,
        VolumeError::Prepare { .. }
        | VolumeError::Bind { .. }
        | VolumeError::SpawnServer { .. }
        | VolumeError::ServerFailed { .. }
        | VolumeError::Snapshot { .. }
        | VolumeError::TooBig { .. }
        | VolumeError::EmptyDir { .. }
        | VolumeError::DiskImage { .. }
        | VolumeError::Plug { .. } => Code::INTERNAL,
    }
}

impl From<SandboxError> for ShimError {
    fn from(e: SandboxError) -> Self {
        ShimError::Sandbox(Box::new(e))
    }
}

impl From<AgentError> for ShimError {
    fn from(e: AgentError) -> Self {
        ShimError::Agent(Box::new(e))
    }
}

/// The agent's own status passes through; a broken connection means the VM is gone.
fn agent_code(err: &AgentError) -> ttrpc::Code {
    err.code().unwrap_or(ttrpc::Code::UNAVAILABLE)
}

impl From<ShimError> for ttrpc::Error {
    fn from(err: ShimError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(err.code(), crate::error_chain(&err)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ttrpc::Code;

    fn status(err: ShimError) -> (Code, String) {
        match ttrpc::Error::from(err) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn codes_map_one_to_one() {
        let cases = [
            (
                ShimError::ContainerNotFound { id: "c".into() },
                Code::NOT_FOUND,
            ),
            (
                ShimError::ProcessNotFound {
                    id: "c".into(),
                    exec_id: "e".into(),
                },
                Code::NOT_FOUND,
            ),
            (
                ShimError::ContainerExists { id: "c".into() },
                Code::ALREADY_EXISTS,
            ),
            (
                ShimError::NoSandbox { id: "c".into() },
                Code::FAILED_PRECONDITION,
            ),
            (
                ShimError::WrongState {
                    id: "c".into(),
                    exec_id: String::new(),
                    state: "created",
                    wanted: "running",
                },
                Code::FAILED_PRECONDITION,
            ),
            (
                ShimError::Unsupported { what: "checkpoint" },
                Code::UNIMPLEMENTED,
            ),
            (
                ShimError::CallAborted {
                    call: "Delete",
                    panicked: true,
                },
                Code::INTERNAL,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(status(err).0, code);
        }
    }

    #[test]
    fn a_full_state_dir_is_resource_exhausted_wherever_the_build_ran() {
        let no_room = || ErofsError::NoRoom {
            source_dir: "/rootfs".into(),
            dir: "/run/spry/layer-images".into(),
            needed_mib: 240,
            free_mib: 3,
        };
        let through_cache = RootfsError::Cache(CacheError::Build(no_room()));
        for rootfs in [RootfsError::Image(no_room()), through_cache] {
            let err = ShimError::Sandbox(Box::new(SandboxError::Rootfs(rootfs)));
            let (code, message) = status(err);
            assert_eq!(code, Code::RESOURCE_EXHAUSTED);
            assert!(message.contains("state_dir"), "{message}");
        }
        // Filled up while the image was written; any other write failure is internal.
        for (errno, code) in [
            (libc::ENOSPC, Code::RESOURCE_EXHAUSTED),
            (libc::EIO, Code::INTERNAL),
        ] {
            let write = ErofsError::WriteImage {
                image: "/run/spry/layer-images/x.erofs".into(),
                source: std::io::Error::from_raw_os_error(errno),
            };
            let err = ShimError::Sandbox(Box::new(SandboxError::Rootfs(RootfsError::Image(write))));
            assert_eq!(status(err).0, code, "errno {errno}");
        }
        let missing = RootfsError::NotADirectory {
            path: "/nope".into(),
        };
        let err = ShimError::Sandbox(Box::new(SandboxError::Resource(missing.into())));
        assert_eq!(status(err).0, Code::INVALID_ARGUMENT);
    }

    #[test]
    fn agent_status_passes_through_and_broken_link_is_unavailable() {
        let answered = AgentError::Status {
            method: "StartContainer",
            code: Code::INVALID_ARGUMENT,
            message: "executable file /x not found".into(),
        };
        let (code, message) = status(answered.into());
        assert_eq!(code, Code::INVALID_ARGUMENT);
        assert!(message.contains("/x not found"), "{message}");
        let broken = AgentError::Connection {
            method: "WaitProcess",
            source: ttrpc::Error::Socket("closed".into()),
        };
        assert_eq!(status(broken.into()).0, Code::UNAVAILABLE);
    }

    #[test]
    fn message_carries_the_whole_chain() {
        let err = ShimError::Fifo {
            path: "/run/x/stdout".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        let (_, message) = status(err);
        assert!(
            message.contains("/run/x/stdout") && message.contains("No such file"),
            "{message}"
        );
    }
}
