//! The guest's OOM kills as containerd's `/tasks/oom` events: CRI reads an exit as
//! `OOMKilled` only when that event came, so it must come once per kill and only for
//! this pod's containers, whether the guest's watcher or the process's exit says so.

use std::time::Duration;

use containerd_shim::protos::events::task::TaskOOM;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;

use super::{Harness, APP, PATIENCE};

impl Harness {
    /// The container ids of the OOM events published so far, in order.
    fn ooms(&self) -> Vec<String> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter_map(|(_, e)| <dyn MessageDyn>::downcast_ref::<TaskOOM>(e.as_ref()))
            .map(|e| e.container_id.clone())
            .collect()
    }
}

#[tokio::test]
async fn oom_kills_in_the_guest_become_oom_events() {
    let h = Harness::running_app().await;
    h.vm().oom(APP);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while h.ooms().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(h.ooms(), [APP]);
}

/// The guest's memory.events watch can miss a kill (or report it late); the process's
/// exit still says it was an OOM kill, and that event must reach containerd before the
/// exit does.
#[tokio::test]
async fn an_oom_killed_exit_the_watcher_missed_publishes_the_oom_event_before_the_exit() {
    let h = Harness::running_app().await;
    h.vm().oom_kill_process(APP, "");
    assert_eq!(h.wait(APP, "").await, 137);
    h.until_exits(1).await;
    let topics: Vec<String> = h
        .topics()
        .into_iter()
        .filter(|t| t == topics::TASK_OOM_EVENT_TOPIC || t == topics::TASK_EXIT_EVENT_TOPIC)
        .collect();
    assert_eq!(
        topics,
        [topics::TASK_OOM_EVENT_TOPIC, topics::TASK_EXIT_EVENT_TOPIC]
    );
    assert_eq!(h.ooms(), [APP]);
}

#[tokio::test]
async fn a_kill_both_the_watcher_and_the_exit_report_is_one_event() {
    let h = Harness::running_app().await;
    h.vm().oom(APP);
    h.vm().oom_kill_process(APP, "");
    assert_eq!(h.wait(APP, "").await, 137);
    h.until_exits(1).await;
    // The watcher takes a report every 10 ms: give it time to publish a second one.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.ooms(), [APP]);
}

/// A real-looking id of a container elsewhere on the node.
const SANDBOX_OF_ANOTHER_POD: &str =
    "4f1d0c2a9b8e7d6c5b4a39281706f5e4d3c2b1a0f9e8d7c6b5a4938271605f4e";

#[tokio::test]
async fn a_guest_naming_strangers_or_flooding_oom_kills_publishes_one_event() {
    let h = Harness::running_app().await;
    h.vm().oom("not-in-this-pod");
    h.vm().oom(SANDBOX_OF_ANOTHER_POD);
    for _ in 0..50 {
        h.vm().oom(APP);
    }
    // The watcher takes a report every 10 ms: give it the 52 and a margin.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(h.ooms(), [APP]);
}
