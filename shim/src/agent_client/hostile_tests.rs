//! The agent client against a hostile agent double: a real ttrpc server on a unix socket
//! (what QEMU's virtio-serial chardev is to the shim) that answers the handshake
//! correctly and then lies or stalls. The shim must turn each lie into an error, never a
//! spin or unbounded growth, and never wait on a stalled metrics call for long.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use spry_proto::agent::*;
use spry_proto::agent_ttrpc::{create_agent, Agent};
use ttrpc::r#async::TtrpcContext;

use super::transport::VirtioSerialTransport;
use super::*;

struct HostileAgent;

#[async_trait]
impl Agent for HostileAgent {
    async fn check(&self, _: &TtrpcContext, _: CheckRequest) -> ttrpc::Result<CheckResponse> {
        Ok(CheckResponse {
            protocol_version: ProtocolVersion::PROTOCOL_VERSION_CURRENT as u32,
            ..Default::default()
        })
    }

    /// Empty but "not at the end": a pump that believed it would spin.
    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        _: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        Ok(ReadStreamResponse::default())
    }

    /// More than was asked for.
    async fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        Ok(ReadStreamResponse {
            data: vec![b'x'; req.max_bytes as usize + 1],
            ..Default::default()
        })
    }

    /// "Nothing written", forever.
    async fn write_stdin(
        &self,
        _: &TtrpcContext,
        _: WriteStdinRequest,
    ) -> ttrpc::Result<WriteStdinResponse> {
        Ok(WriteStdinResponse::default())
    }

    /// Never answers in time.
    async fn stats_container(
        &self,
        _: &TtrpcContext,
        _: ContainerRequest,
    ) -> ttrpc::Result<ContainerStats> {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(ContainerStats::default())
    }
}

async fn connect_to_hostile_agent(dir: &std::path::Path) -> (ttrpc::r#async::Server, AgentClient) {
    let socket = dir.join("agent.sock");
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .unwrap()
        .register_service(create_agent(Arc::new(HostileAgent)));
    server.start().await.unwrap();
    let transport = VirtioSerialTransport { socket };
    let client = AgentClient::connect(&transport, Duration::from_secs(5))
        .await
        .unwrap();
    (server, client)
}

#[tokio::test]
async fn lies_become_errors_and_a_stalled_stats_call_ends_in_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, client) = connect_to_hostile_agent(dir.path()).await;
    let process = ProcessId::init("c1");

    let empty = client
        .read_output(&process, OutputStream::Stdout, 4096)
        .await;
    assert!(
        matches!(empty, Err(AgentError::BadReply { .. })),
        "{empty:?}"
    );
    let oversized = client
        .read_output(&process, OutputStream::Stderr, 4096)
        .await;
    assert!(
        matches!(oversized, Err(AgentError::BadReply { .. })),
        "{oversized:?}"
    );
    let stuck = tokio::time::timeout(
        Duration::from_secs(5),
        client.write_stdin_all(&process, b"input"),
    )
    .await
    .expect("a guest writing nothing made the shim loop");
    assert!(
        matches!(stuck, Err(AgentError::BadReply { .. })),
        "{stuck:?}"
    );
    assert_eq!(
        stuck.unwrap_err().code(),
        Some(ttrpc::Code::INTERNAL),
        "one status for a broken guest"
    );

    // Twenty stalled metrics calls at once (containerd polls every task): all end by
    // the metrics deadline, not the control calls' minute.
    let started = Instant::now();
    let calls = (0..20).map(|_| client.stats("c1"));
    let results = futures::future::join_all(calls).await;
    assert!(results.iter().all(Result::is_err));
    assert!(
        started.elapsed() < STATS_CALL_TIMEOUT + Duration::from_secs(2),
        "stalled stats took {:?}",
        started.elapsed()
    );
    server.shutdown().await.unwrap();
}
