//! A container and its execs ending together: containerd's two Deletes race on one
//! connection, and the container's answer must not cut the exec's off.

use std::time::{Duration, Instant};

use ttrpc::Code;

use super::{code, Harness, ProcessStatus, APP, KILL};

#[tokio::test]
async fn a_containers_delete_is_answered_after_its_ended_execs_deletes() {
    let h = Harness::running_app().await;
    h.exec("e1").await;
    h.vm().crash();
    assert_eq!(h.wait(APP, "e1").await, 255);
    assert_eq!(h.wait(APP, "").await, 255);

    // CRI's exit handler deletes the container; crictl's exec handler the exec, a moment
    // later.
    let pod = h.pod.clone();
    let container = tokio::spawn(async move { pod.delete(APP, "").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !container.is_finished(),
        "the container's Delete was answered while its exec's was still to come"
    );
    // containerd's Delete of the exec (WithProcessKill): Wait, Kill, State, Delete.
    assert_eq!(h.wait(APP, "e1").await, 255);
    let killed = h.pod.kill(APP, "e1", KILL, true).await;
    assert!(
        matches!(
            killed.map_err(code),
            Err(Code::NOT_FOUND | Code::FAILED_PRECONDITION)
        ),
        "containerd's WithProcessKill takes only these as 'already gone'"
    );
    let state = h.pod.state(APP, "e1").await.unwrap();
    assert!(matches!(
        state.status,
        ProcessStatus::Stopped { exit_code: 255, .. }
    ));
    let exec = h.pod.delete(APP, "e1").await.unwrap();
    assert_eq!(exec.exit_code, 255);
    let deleted = tokio::time::timeout(Duration::from_secs(1), container)
        .await
        .expect("the container's Delete is answered once its exec is deleted")
        .unwrap()
        .unwrap();
    assert_eq!(deleted.exit_code, 255);
}

#[tokio::test]
async fn an_exec_nobody_deletes_holds_its_containers_delete_only_briefly() {
    let h = Harness::running_app().await;
    h.exec("e1").await;
    h.vm().crash();
    assert_eq!(h.wait(APP, "").await, 255);
    let started = Instant::now();
    h.pod.delete(APP, "").await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(4),
        "waited {waited:?}"
    );
    // The exec can still be deleted afterwards, with its exit.
    assert_eq!(h.pod.delete(APP, "e1").await.unwrap().exit_code, 255);
}
