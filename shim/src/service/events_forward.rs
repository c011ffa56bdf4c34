//! Forwarding events to containerd so that they survive a containerd restart.
//!
//! containerd-shim 0.12's publisher reconnects only when ttrpc says the socket closed;
//! after a containerd restart its forwards fail with other errors ("reserve channel
//! capacity failed: channel closed") and every later event is lost, so an OOM kill in a
//! pod that outlived the restart shows as `Completed`. Here one task forwards the queued
//! events in order and, on any failure, drops the connection, reconnects and retries
//! for up to [`FORWARD_PATIENCE`] (a containerd restart takes seconds).

use std::time::{Duration, Instant};

use containerd_shim::protos::shim::event::Envelope;
use containerd_shim::protos::shim::events::ForwardRequest;
use containerd_shim::protos::shim_async::{Client, EventsClient};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Events waiting for containerd; beyond this a burst is dropped (and said so).
pub const QUEUE: usize = 1024;
/// How long one event is retried before it is dropped.
pub const FORWARD_PATIENCE: Duration = Duration::from_secs(60);
/// One forward call's limit.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(2);

/// Starts the forwarding task for containerd's ttrpc `address`; events go in through the
/// returned queue.
pub fn start(address: String) -> mpsc::Sender<Envelope> {
    let (queue, events) = mpsc::channel(QUEUE);
    tokio::spawn(forward_all(address, events));
    queue
}

async fn forward_all(address: String, mut events: mpsc::Receiver<Envelope>) {
    let socket = format!(
        "unix://{}",
        address.strip_prefix("unix://").unwrap_or(&address)
    );
    let mut client: Option<Client> = None;
    while let Some(envelope) = events.recv().await {
        let topic = envelope.topic.clone();
        let req = ForwardRequest {
            envelope: Some(envelope).into(),
            ..Default::default()
        };
        let started = Instant::now();
        let mut delay = FIRST_RETRY;
        let mut failures = 0u32;
        loop {
            if client.is_none() {
                client = Client::connect(&socket).await.ok();
            }
            if let Some(connected) = &client {
                let ctx = ttrpc::context::with_duration(FORWARD_TIMEOUT);
                match EventsClient::new(connected.clone())
                    .forward(ctx, &req)
                    .await
                {
                    Ok(_) => {
                        if failures > 0 {
                            info!(
                                topic,
                                failures, "event reached containerd after reconnecting"
                            );
                        }
                        break;
                    }
                    Err(e) => {
                        debug!(topic, error = %e, "forwarding an event failed; reconnecting");
                        client = None;
                    }
                }
            }
            failures += 1;
            if started.elapsed() >= FORWARD_PATIENCE {
                warn!(
                    topic,
                    failures, "containerd did not take an event for a minute; dropped"
                );
                break;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(LAST_RETRY);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use containerd_shim::protos::api::Empty;
    use containerd_shim::protos::shim_async::{create_events, Events};
    use ttrpc::r#async::{Server, TtrpcContext};

    use super::*;

    /// containerd's event service, recording topics.
    #[derive(Clone, Default)]
    struct FakeContainerd(Arc<Mutex<Vec<String>>>);

    #[async_trait]
    impl Events for FakeContainerd {
        async fn forward(&self, _: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
            self.0.lock().unwrap().push(req.envelope.topic.clone());
            Ok(Empty::default())
        }
    }

    fn serve(socket: &std::path::Path, seen: &FakeContainerd) -> Server {
        let _ = std::fs::remove_file(socket);
        Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .unwrap()
            .register_service(create_events(Arc::new(seen.clone())))
    }

    fn envelope(topic: &str) -> Envelope {
        Envelope {
            topic: topic.into(),
            namespace: "k8s.io".into(),
            ..Default::default()
        }
    }

    async fn until_seen(seen: &FakeContainerd, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.0.lock().unwrap().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen.0.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn events_published_while_containerd_restarts_reach_the_new_one_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock.ttrpc");
        let first = FakeContainerd::default();
        let mut server = serve(&socket, &first);
        server.start().await.unwrap();
        let queue = start(socket.display().to_string());
        queue.send(envelope("/tasks/start")).await.unwrap();
        assert_eq!(until_seen(&first, 1).await, ["/tasks/start"]);

        // containerd goes away; events happen meanwhile; a new containerd comes up.
        server.shutdown().await.unwrap();
        queue.send(envelope("/tasks/oom")).await.unwrap();
        queue.send(envelope("/tasks/exit")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let second = FakeContainerd::default();
        let mut server = serve(&socket, &second);
        server.start().await.unwrap();
        assert_eq!(until_seen(&second, 2).await, ["/tasks/oom", "/tasks/exit"]);
        server.shutdown().await.unwrap();
    }
}
