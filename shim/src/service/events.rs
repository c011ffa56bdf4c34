//! Publishing task events to containerd.

use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::shim::event::Envelope;
use containerd_shim::protos::topics;
use tracing::warn;

/// Where events go: containerd's event service, or a recorder in tests.
#[async_trait]
pub trait EventPublisher: Send + Sync {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>);
}

/// containerd's event service at its ttrpc `address`, in the shim's namespace, through
/// a queue that outlives containerd restarts (`events_forward.rs`).
pub struct ContainerdEvents {
    queue: tokio::sync::mpsc::Sender<Envelope>,
    namespace: String,
}

impl ContainerdEvents {
    pub fn new(address: String, namespace: String) -> Self {
        Self {
            queue: super::events_forward::start(address),
            namespace,
        }
    }
}

#[async_trait]
impl EventPublisher for ContainerdEvents {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let mut any = Any::new();
        any.type_url = event.descriptor_dyn().full_name().to_string();
        if let Err(e) = event.write_to_vec_dyn(&mut any.value) {
            warn!(topic, error = %e, "cannot encode event");
            return;
        }
        let envelope = Envelope {
            timestamp: Some(timestamp(SystemTime::now())).into(),
            namespace: self.namespace.clone(),
            topic: topic.to_string(),
            event: Some(any).into(),
            ..Default::default()
        };
        // Events are best effort: containerd also learns state through the task API.
        if let Err(e) = self.queue.try_send(envelope) {
            warn!(topic, error = %e, "event queue full or closed; event dropped");
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
