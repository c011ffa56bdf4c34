//! Publishing task events to containerd.

use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use tracing::warn;

/// Where events go: containerd's event service, or a recorder in tests.
#[async_trait]
pub trait EventPublisher: Send + Sync {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>);
}

/// containerd's event service, in the shim's namespace.
pub struct ContainerdEvents {
    publisher: RemotePublisher,
    namespace: String,
}

impl ContainerdEvents {
    pub fn new(publisher: RemotePublisher, namespace: String) -> Self {
        Self {
            publisher,
            namespace,
        }
    }
}

#[async_trait]
impl EventPublisher for ContainerdEvents {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        // Events are best effort: containerd also learns state through the task API.
        if let Err(e) = self
            .publisher
            .publish(
                ttrpc::context::Context::default(),
                topic,
                &self.namespace,
                event,
            )
            .await
        {
            warn!(topic, error = %e, "cannot publish event");
        }
    }
}

/// The pod's task events, typed.
pub struct EventSink {
    publisher: Box<dyn EventPublisher>,
}

pub fn timestamp(at: SystemTime) -> Timestamp {
    let d = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = d.as_secs() as i64;
    ts.nanos = d.subsec_nanos() as i32;
    ts
}

impl EventSink {
    pub fn new(publisher: Box<dyn EventPublisher>) -> Self {
        Self { publisher }
    }

    async fn send(&self, topic: &str, event: Box<dyn MessageDyn>) {
        self.publisher.publish(topic, event).await;
    }

    pub async fn create(&self, container_id: &str, bundle: &str, pid: u32) {
        let event = TaskCreate {
            container_id: container_id.into(),
            bundle: bundle.into(),
            pid,
            ..Default::default()
        };
        self.send(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event))
            .await;
    }

    pub async fn start(&self, container_id: &str, pid: u32) {
        let event = TaskStart {
            container_id: container_id.into(),
            pid,
            ..Default::default()
        };
        self.send(topics::TASK_START_EVENT_TOPIC, Box::new(event))
            .await;
    }

    pub async fn exec_added(&self, container_id: &str, exec_id: &str) {
        let event = TaskExecAdded {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.send(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event))
            .await;
    }

    pub async fn exec_started(&self, container_id: &str, exec_id: &str, pid: u32) {
        let event = TaskExecStarted {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            pid,
            ..Default::default()
        };
        self.send(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event))
            .await;
    }

    /// `id` is the exec id, or the container id for its init process.
    pub async fn exit(
        &self,
        container_id: &str,
        id: &str,
        pid: u32,
        exit_status: u32,
        at: SystemTime,
    ) {
        let event = TaskExit {
            container_id: container_id.into(),
            id: id.into(),
            pid,
            exit_status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        };
        self.send(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event))
            .await;
    }

    pub async fn delete(&self, container_id: &str, pid: u32, exit_status: u32, at: SystemTime) {
        let event = TaskDelete {
            container_id: container_id.into(),
            id: container_id.into(),
            pid,
            exit_status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        };
        self.send(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event))
            .await;
    }

    pub async fn oom(&self, container_id: &str) {
        let event = TaskOOM {
            container_id: container_id.into(),
            ..Default::default()
        };
        self.send(topics::TASK_OOM_EVENT_TOPIC, Box::new(event))
            .await;
    }
}
