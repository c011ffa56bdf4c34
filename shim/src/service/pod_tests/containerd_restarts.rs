//! containerd killed and started again: a call in flight when it died, and a restarted
//! containerd's look at the shim's tasks.

use std::sync::Arc;
use std::time::Duration;

use containerd_shim::protos::api::DeleteRequest;
use containerd_shim::protos::shim_async::{create_task, TaskClient};
use containerd_shim::protos::topics;
use containerd_shim::ExitSignal;
use ttrpc::r#async::{Client, Server};
use ttrpc::Code;

use super::fake_vm::FAKE_PID;
use super::{code, Harness, ProcessStatus, APP, KILL, PATIENCE};
use crate::sandbox::PodVm;
use crate::service::TaskService;

/// ttrpc drops a handler when its connection closes; the call's work must still finish,
/// or a delete cut between its steps leaves the guest container and the rootfs behind.
#[tokio::test]
async fn a_delete_whose_caller_went_away_still_finishes() {
    let h = Harness::running_app().await;
    h.vm().exit_process(APP, "", 0);
    assert_eq!(h.wait(APP, "").await, 0);

    let socket = format!("unix://{}", h.dir.path().join("shim.sock").display());
    let service = TaskService::new(Arc::clone(&h.pod), Arc::new(ExitSignal::default()));
    let mut server = Server::new()
        .bind(&socket)
        .unwrap()
        .register_service(create_task(Arc::new(service)));
    server.start().await.unwrap();

    h.vm().stall_removes(true);
    let containerd = TaskClient::new(Client::connect(&socket).await.unwrap());
    let call = tokio::spawn(async move {
        let request = DeleteRequest {
            id: APP.to_string(),
            ..Default::default()
        };
        containerd
            .delete(ttrpc::context::with_timeout(0), &request)
            .await
    });
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !h.vm().calls().contains(&format!("remove {APP}")) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Delete never reached the guest"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // containerd dies: its connection closes with the Delete in flight.
    call.abort();
    let _ = call.await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.vm().stall_removes(false);

    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !h
        .topics()
        .iter()
        .any(|t| t == topics::TASK_DELETE_EVENT_TOPIC)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Delete stopped with its caller: no delete event"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(!h.vm().has_container(APP), "the guest container stayed");
    let gone = h.pod.state(APP, "").await.map(|_| ()).map_err(code);
    assert_eq!(gone, Err(Code::NOT_FOUND));
    server.shutdown().await.unwrap();
}

/// containerd, restarted, asks each task's Pids and deletes a task with none; a refused
/// delete makes it forget the task (CI: a container killed just before containerd died
/// stayed in the shim, its rootfs mounted, the shim alive after its pod).
#[tokio::test]
async fn a_container_counts_its_init_until_the_exit_reaches_the_shim() {
    let h = Harness::running_app().await;
    h.vm().stall_waits(true);
    h.pod.kill(APP, "", KILL, false).await.unwrap();
    assert!(h.vm().list_processes(APP).await.unwrap().is_empty());

    let state = h.pod.state(APP, "").await.unwrap();
    assert_eq!(
        state.status,
        ProcessStatus::Running,
        "the exit is not in yet"
    );
    let pids = h.pod.pids(APP).await.unwrap();
    assert_eq!(pids, vec![FAKE_PID], "Pids empty while State says running");
    let refused = h.pod.delete(APP, "").await.map(|_| ()).map_err(code);
    assert_eq!(refused, Err(Code::FAILED_PRECONDITION));

    h.vm().stall_waits(false);
    assert_eq!(h.wait(APP, "").await, 137);
    assert!(h.pod.pids(APP).await.unwrap().is_empty());
    h.pod.delete(APP, "").await.unwrap();
}
