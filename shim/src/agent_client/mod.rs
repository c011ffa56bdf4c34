//! Host-side client of the in-guest agent, behind a transport trait.
//!
//! [`AgentClient::connect`] opens a connection through an [`AgentTransport`] and runs the
//! version handshake (`Check`) before anything else, so a host and a guest image of
//! different protocol versions fail at once with a clear error.

mod transport;

use std::time::Duration;

use spry_proto::agent::{self as pb, ProtocolVersion};
use spry_proto::agent_ttrpc;
use tracing::debug;

pub use transport::{AgentTransport, TransportError, VirtioSerialTransport, VsockTransport};

/// Ceiling for control calls (create, start, signal...). Blocking calls (wait, reads,
/// OOM events) have none. Generous because container setup under TCG is slow.
const CONTROL_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Failure to talk to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(
        "the agent did not answer within {timeout:?} (on a slow host, raise [vm] boot_timeout_s)"
    )]
    Timeout { timeout: Duration },
    #[error("the guest agent speaks protocol version {agent}, this host speaks {host}: install matching guest assets")]
    ProtocolMismatch { host: u32, agent: u32 },
    /// The agent answered with an error status.
    #[error("agent {method}: {message}")]
    Status {
        method: &'static str,
        code: ttrpc::Code,
        message: String,
    },
    /// The guest answered something no agent of ours sends: it is broken or hostile.
    #[error("agent {method}: a reply no agent sends ({what}); treating the guest as broken")]
    BadReply { method: &'static str, what: String },
    /// The call never got an answer: the connection broke or the VM is gone.
    #[error("agent {method}: the connection to the agent broke")]
    Connection {
        method: &'static str,
        #[source]
        source: ttrpc::Error,
    },
}

impl AgentError {
    fn from_ttrpc(method: &'static str, err: ttrpc::Error) -> Self {
        match err {
            ttrpc::Error::RpcStatus(status) if status.code() == ttrpc::Code::DEADLINE_EXCEEDED => {
                AgentError::Status {
                    method,
                    code: ttrpc::Code::DEADLINE_EXCEEDED,
                    message: status.message().to_string(),
                }
            }
            ttrpc::Error::RpcStatus(status) => AgentError::Status {
                method,
                code: status.code(),
                message: status.message().to_string(),
            },
            other => AgentError::Connection {
                method,
                source: other,
            },
        }
    }

    /// The status code the agent answered with, if it answered.
    pub fn code(&self) -> Option<ttrpc::Code> {
        match self {
            AgentError::Status { code, .. } => Some(*code),
            AgentError::BadReply { .. } => Some(ttrpc::Code::INTERNAL),
            AgentError::Transport(_)
            | AgentError::Timeout { .. }
            | AgentError::ProtocolMismatch { .. }
            | AgentError::Connection { .. } => None,
        }
    }
}

/// Identifies one process in the guest: a container's init, or one of its execs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProcessId {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
}

impl ProcessId {
    pub fn init(container_id: &str) -> Self {
        Self {
            container_id: container_id.to_string(),
            exec_id: String::new(),
        }
    }

    pub fn exec(container_id: &str, exec_id: &str) -> Self {
        Self {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
        }
    }

    fn to_pb(&self) -> pb::ProcessRef {
        pb::ProcessRef {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            ..Default::default()
        }
    }
}

/// Which output stream of a process to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A connected, version-checked agent. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    inner: agent_ttrpc::AgentClient,
    /// What `Check` reported.
    pub info: AgentInfo,
}

/// What the agent said about itself at connect.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub agent_version: String,
    pub kernel_release: String,
}

fn control() -> ttrpc::context::Context {
    ttrpc::context::with_duration(CONTROL_CALL_TIMEOUT)
}

/// Metrics: containerd collects every task's stats on the node one after another, so a
/// guest that does not answer may hold that up this long at most.
const STATS_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How much later than the host's own bound the first call's ttrpc deadline is.
const CHECK_DEADLINE_SLACK: Duration = Duration::from_secs(1);

fn metrics() -> ttrpc::context::Context {
    ttrpc::context::with_duration(STATS_CALL_TIMEOUT)
}

fn blocking() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

impl AgentClient {
    /// Connects and runs the version handshake, waiting at most `timeout` for the agent
    /// to answer (it may still be booting).
    pub async fn connect(
        transport: &dyn AgentTransport,
        timeout: Duration,
    ) -> Result<Self, AgentError> {
        let socket = transport.connect().await?;
        let inner = agent_ttrpc::AgentClient::new(ttrpc::r#async::Client::new(socket));
        let host = ProtocolVersion::PROTOCOL_VERSION_CURRENT as u32;
        let req = pb::CheckRequest {
            protocol_version: host,
            ..Default::default()
        };
        // The agent enforces the ttrpc deadline; a guest that never comes up would leave
        // us waiting, so the call is bounded here as well. The client library enforces
        // the deadline too, reporting it as a broken connection: the deadline it sees is
        // a little later, so that a silent guest reads as the timeout it is.
        let reply = tokio::time::timeout(
            timeout,
            inner.check(
                ttrpc::context::with_duration(timeout + CHECK_DEADLINE_SLACK),
                &req,
            ),
        )
        .await
        .map_err(|_| AgentError::Timeout { timeout })?
        .map_err(|e| AgentError::from_ttrpc("Check", e))?;
        if reply.protocol_version != host {
            return Err(AgentError::ProtocolMismatch {
                host,
                agent: reply.protocol_version,
            });
        }
        debug!(agent_version = %reply.agent_version, kernel = %reply.kernel_release, "agent connected");
        Ok(Self {
            inner,
            info: AgentInfo {
                agent_version: reply.agent_version,
                kernel_release: reply.kernel_release,
            },
        })
    }

    pub async fn create_sandbox(&self, req: pb::CreateSandboxRequest) -> Result<(), AgentError> {
        self.inner
            .create_sandbox(control(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::from_ttrpc("CreateSandbox", e))
    }

    /// Runs the pod network's guest paths on a VM no pod has yet (the warm pool).
    pub async fn warm_network(&self) -> Result<(), AgentError> {
        self.inner
            .warm_network(control(), &pb::Empty::new())
            .await
            .map(drop)
            .map_err(|e| AgentError::from_ttrpc("WarmNetwork", e))
    }

    pub async fn sync_volume(&self, snapshot: pb::VolumeSnapshot) -> Result<(), AgentError> {
        self.inner
            .sync_volume(control(), &snapshot)
            .await
            .map(drop)
            .map_err(|e| AgentError::from_ttrpc("SyncVolume", e))
    }

    pub async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        self.inner
            .destroy_sandbox(control(), &pb::Empty::new())
            .await
            .map(drop)
            .map_err(|e| AgentError::from_ttrpc("DestroySandbox", e))
    }

    /// Asks the guest to sync and power off. The answer may never come (the VM is gone
    /// first): callers wait for the VM to exit rather than for this reply.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.inner
            .shutdown(control(), &pb::Empty::new())
            .await
            .map(drop)
            .map_err(|e| AgentError::from_ttrpc("Shutdown", e))
    }

    pub async fn create_container(
        &self,
        req: pb::CreateContainerRequest,
    ) -> Result<(), AgentError> {
        self.inner
            .create_container(control(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::from_ttrpc("CreateContainer", e))
    }

    pub async fn start_container(&self, container_id: &str) -> Result<(), AgentError> {
        self.inner
            .start_container(control(), &container_req(container_id))
            .await
            .map(drop)
            .map_err(|e| AgentError::from_ttrpc("StartContainer", e))
    }

    pub async fn remove_container(&self, container_id: &str) -> Result<(), AgentError> {
        self.inner
            .remove_container(control(), &container_req(container_id))
            .await
            .map(drop)
            .map_err(|e| AgentError::from_ttrpc("RemoveContainer", e))
    }

    pub async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), AgentError> {
        let req = pb::UpdateContainerRequest {
            container_id: container_id.to_string(),
            resources_json,
            ..Default::default()
        };
        self.inner
            .update_container(control(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::from_ttrpc("UpdateContainer", e))
    }

    pub async fn stats(&self, container_id: &str) -> Result<pb::ContainerStats, AgentError> {
        self.inner
            .stats_container(metrics(), &container_req(container_id))
            .await
            .map_err(|e| AgentError::from_ttrpc("StatsContainer", e))
    }

    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, AgentError> {
        self.inner
            .list_processes(control(), &container_req(container_id))
            .await
            .map(|r| r.pids)
            .map_err(|e| AgentError::from_ttrpc("ListProcesses", e))
    }

    pub async fn exec_process(
        &self,
        process: &ProcessId,
        oci_process_json: Vec<u8>,
        stdio: pb::StdioConfig,
    ) -> Result<(), AgentError> {
        let req = pb::ExecProcessRequest {
            process: Some(process.to_pb()).into(),
            oci_process_json,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.inner
            .exec_process(control(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::from_ttrpc("ExecProcess", e))
    }

    pub async fn signal_process(
        &self,
        process: &ProcessId,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let req = pb::SignalProcessRequest {
            process: Some(process.to_pb()).into(),
            signal,
            all,
            ..Default::default()
        };
        self.inner
            .signal_process(control(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::from_ttrpc("SignalProcess", e))
    }

    /// Blocks until the process exits.
    pub async fn wait_process(&self, process: &ProcessId) -> Result<pb::ExitStatus, AgentError> {
        self.inner
            .wait_process(blocking(), &process.to_pb())
            .await
            .map_err(|e| AgentError::from_ttrpc("WaitProcess", e))
    }

    /// Writes to the process's stdin; returns how many bytes the agent took.
    pub async fn write_stdin(&self, process: &ProcessId, data: Vec<u8>) -> Result<u32, AgentError> {
        let req = pb::WriteStdinRequest {
            process: Some(process.to_pb()).into(),
            data,
            ..Default::default()
        };
        self.inner
            .write_stdin(blocking(), &req)
            .await
            .map(|r| r.written)
            .map_err(|e| AgentError::from_ttrpc("WriteStdin", e))
    }

    /// Writes all of `data`, looping over the agent's partial writes.
    pub async fn write_stdin_all(
        &self,
        process: &ProcessId,
        mut data: &[u8],
    ) -> Result<(), AgentError> {
        while !data.is_empty() {
            let written = self.write_stdin(process, data.to_vec()).await? as usize;
            // Zero would loop forever, more than was sent is a lie.
            if written == 0 || written > data.len() {
                return Err(AgentError::BadReply {
                    method: "WriteStdin",
                    what: format!("{written} of {} bytes written", data.len()),
                });
            }
            data = &data[written..];
        }
        Ok(())
    }

    pub async fn close_stdin(&self, process: &ProcessId) -> Result<(), AgentError> {
        self.inner
            .close_stdin(control(), &process.to_pb())
            .await
            .map(drop)
            .map_err(|e| AgentError::from_ttrpc("CloseStdin", e))
    }

    /// Blocks until the stream has data; `None` at end of stream.
    pub async fn read_output(
        &self,
        process: &ProcessId,
        stream: OutputStream,
        max_bytes: u32,
    ) -> Result<Option<Vec<u8>>, AgentError> {
        let req = pb::ReadStreamRequest {
            process: Some(process.to_pb()).into(),
            max_bytes,
            ..Default::default()
        };
        let reply = match stream {
            OutputStream::Stdout => self
                .inner
                .read_stdout(blocking(), &req)
                .await
                .map_err(|e| AgentError::from_ttrpc("ReadStdout", e))?,
            OutputStream::Stderr => self
                .inner
                .read_stderr(blocking(), &req)
                .await
                .map_err(|e| AgentError::from_ttrpc("ReadStderr", e))?,
        };
        if reply.eof && reply.data.is_empty() {
            return Ok(None);
        }
        // The agent blocks until it has data: an empty answer would make the pump spin,
        // a larger one than asked for would grow the shim.
        if reply.data.is_empty() || reply.data.len() > max_bytes as usize {
            return Err(AgentError::BadReply {
                method: "ReadStream",
                what: format!("{} bytes for at most {max_bytes}", reply.data.len()),
            });
        }
        Ok(Some(reply.data))
    }

    pub async fn resize_tty(
        &self,
        process: &ProcessId,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        let req = pb::ResizeTtyRequest {
            process: Some(process.to_pb()).into(),
            rows,
            cols,
            ..Default::default()
        };
        self.inner
            .resize_tty(control(), &req)
            .await
            .map(drop)
            .map_err(|e| AgentError::from_ttrpc("ResizeTty", e))
    }

    /// Blocks until some container is OOM-killed; returns its id.
    pub async fn next_oom_event(&self) -> Result<String, AgentError> {
        self.inner
            .get_oom_event(blocking(), &pb::Empty::new())
            .await
            .map(|e| e.container_id)
            .map_err(|e| AgentError::from_ttrpc("GetOomEvent", e))
    }
}

fn container_req(container_id: &str) -> pb::ContainerRequest {
    pb::ContainerRequest {
        container_id: container_id.to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod hostile_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_status_keeps_code_and_message() {
        let err = AgentError::from_ttrpc(
            "CreateContainer",
            ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::INVALID_ARGUMENT,
                "unknown namespace type \"foo\"",
            )),
        );
        assert_eq!(err.code(), Some(ttrpc::Code::INVALID_ARGUMENT));
        assert_eq!(
            err.to_string(),
            "agent CreateContainer: unknown namespace type \"foo\""
        );
    }

    #[test]
    fn broken_connection_has_no_code() {
        let err = AgentError::from_ttrpc("WaitProcess", ttrpc::Error::Socket("closed".into()));
        assert_eq!(err.code(), None);
        assert!(matches!(
            err,
            AgentError::Connection {
                method: "WaitProcess",
                ..
            }
        ));
    }
}
