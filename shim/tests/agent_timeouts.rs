//! A silent guest cannot grow the shim: every agent call that times out must leave
//! nothing behind in the ttrpc client (ttrpc before 0.10 kept each timed-out stream's
//! entry forever). Its own test binary, so the process's memory is this test's alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use spry_proto::agent::{CheckRequest, CheckResponse};
use spry_proto::agent_ttrpc::{create_agent, Agent, AgentClient};
use ttrpc::r#async::TtrpcContext;

/// Answers every call, but only after the caller has given up.
struct LateAgent;

#[async_trait]
impl Agent for LateAgent {
    async fn check(&self, _: &TtrpcContext, _: CheckRequest) -> ttrpc::Result<CheckResponse> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(CheckResponse::default())
    }
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

async fn timed_out_calls(client: &AgentClient, count: usize) {
    const AT_ONCE: usize = 1000;
    let request = CheckRequest::default();
    for _ in 0..count / AT_ONCE {
        let calls = (0..AT_ONCE).map(|_| {
            client.check(
                ttrpc::context::with_duration(Duration::from_millis(1)),
                &request,
            )
        });
        let results = futures::future::join_all(calls).await;
        assert!(
            results.iter().all(Result::is_err),
            "a call did not time out"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_timed_out_calls_leave_the_shims_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let socket = format!("unix://{}", dir.path().join("agent.sock").display());
    let mut server = ttrpc::r#async::Server::new()
        .bind(&socket)
        .unwrap()
        .register_service(create_agent(Arc::new(LateAgent)));
    server.start().await.unwrap();
    let client = AgentClient::new(ttrpc::r#async::Client::connect(&socket).await.unwrap());

    // Warm up: the allocator's arenas, tokio's task slabs, the late replies in flight.
    timed_out_calls(&client, 10_000).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = resident_bytes();
    let started = Instant::now();
    timed_out_calls(&client, 50_000).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let grown = resident_bytes().saturating_sub(before);
    eprintln!(
        "50,000 timed-out calls in {:?}: resident memory grew {} KiB",
        started.elapsed(),
        grown / 1024
    );
    // A kept entry (a stream id and its reply channel) costs hundreds of bytes: 50,000
    // would be tens of MiB.
    assert!(grown < 4 * 1024 * 1024, "grew {grown} bytes");
    server.shutdown().await.unwrap();
}
