use std::path::PathBuf;
use std::time::SystemTime;

use super::*;

fn table_with_app_and_exec() -> TaskTable {
    let mut table = TaskTable::default();
    let sandbox = Task::new(
        TaskKind::Sandbox,
        PathBuf::from("/b/sbx"),
        StdioPaths::default(),
    );
    table.insert("sbx", sandbox).unwrap();
    let app = Task::new(
        TaskKind::App,
        PathBuf::from("/b/app"),
        StdioPaths::default(),
    );
    table.insert("app", app).unwrap();
    table.process("app", "").unwrap().set_running();
    table
        .add_exec("app", "e1", Process::new(StdioPaths::default()))
        .unwrap();
    table
}

#[test]
fn an_exit_is_claimed_once_and_never_after_it_is_recorded() {
    let mut table = table_with_app_and_exec();
    assert!(table.claim_exit("app", "").is_some());
    assert!(table.claim_exit("app", "").is_none(), "second claim");
    assert!(table.record_exit("app", "", 7, SystemTime::now()));
    assert!(table.claim_exit("app", "").is_none(), "after the record");
    assert!(matches!(
        table.process("app", "").unwrap().status(),
        ProcessStatus::Stopped { exit_code: 7, .. }
    ));
    assert!(table.claim_exit("gone", "").is_none());
}

#[test]
fn a_dead_vm_takes_unstopped_inits_and_running_execs() {
    let mut table = table_with_app_and_exec();
    // e1 is created, not started: it never ran, so the VM's death does not end it.
    table
        .add_exec("app", "e2", Process::new(StdioPaths::default()))
        .unwrap();
    table.process("app", "e2").unwrap().set_running();
    let lost = table.lost_with_vm(137, 255);
    assert_eq!(
        lost,
        [
            ("app".to_string(), String::new(), 255),
            ("app".to_string(), "e2".to_string(), 255),
            ("sbx".to_string(), String::new(), 137),
        ]
    );
    table.claim_exit("sbx", "");
    table.record_exit("sbx", "", 137, SystemTime::now());
    assert_eq!(table.lost_with_vm(137, 255).len(), 2);
}

#[test]
fn transitions_refuse_the_wrong_state() {
    let mut table = table_with_app_and_exec();
    assert!(matches!(
        table.startable("app", ""),
        Err(ShimError::WrongState {
            state: "running",
            wanted: "created",
            ..
        })
    ));
    assert!(table.startable("app", "e1").is_ok());
    assert!(matches!(
        table.add_exec("sbx", "e1", Process::new(StdioPaths::default())),
        Err(ShimError::WrongState {
            state: "created",
            wanted: "running",
            ..
        })
    ));
    assert!(matches!(
        table.add_exec("app", "e1", Process::new(StdioPaths::default())),
        Err(ShimError::ProcessExists { .. })
    ));
    assert!(matches!(
        table.delete("app", ""),
        Err(ShimError::WrongState {
            state: "running",
            wanted: "stopped",
            ..
        })
    ));
    assert!(matches!(
        table.insert(
            "app",
            Task::new(TaskKind::App, PathBuf::new(), StdioPaths::default())
        ),
        Err(ShimError::ContainerExists { .. })
    ));
}

#[test]
fn delete_takes_an_exec_or_the_whole_container() {
    let mut table = table_with_app_and_exec();
    let exec = table.delete("app", "e1").unwrap();
    assert_eq!(exec.exit_code, 0, "a never-started exec");
    assert!(exec.task.is_none());
    assert!(matches!(
        table.process("app", "e1"),
        Err(ShimError::ProcessNotFound { .. })
    ));
    table.claim_exit("app", "");
    table.record_exit("app", "", 9, SystemTime::now());
    let whole = table.delete("app", "").unwrap();
    assert_eq!(whole.exit_code, 9);
    assert_eq!(
        whole.task.unwrap().rootfs_dir(),
        PathBuf::from("/b/app/rootfs")
    );
    assert!(matches!(
        table.task("app"),
        Err(ShimError::ContainerNotFound { .. })
    ));
    assert!(matches!(table.killable("sbx", ""), Ok(TaskKind::Sandbox)));
}

#[test]
fn an_exec_a_dead_vm_ended_outlives_its_deleted_container_until_deleted() {
    let mut table = table_with_app_and_exec();
    table.process("app", "e1").unwrap().set_running();
    // The VM dies: the container and its exec end together.
    for (id, exec_id, code) in table.lost_with_vm(137, 255) {
        table.claim_exit(&id, &exec_id);
        table.record_exit(&id, &exec_id, code, SystemTime::now());
    }
    // containerd deletes the container first...
    table.delete("app", "").unwrap();
    assert_eq!(table.leftover_execs(), 1);
    // ...and then the exec, which still answers with its exit.
    assert!(matches!(
        table.process("app", "e1").unwrap().status(),
        ProcessStatus::Stopped { exit_code: 255, .. }
    ));
    let exec = table.delete("app", "e1").unwrap();
    assert_eq!(exec.exit_code, 255);
    assert_eq!(table.leftover_execs(), 0);
    assert!(matches!(
        table.delete("app", "e1"),
        Err(ShimError::ContainerNotFound { .. })
    ));
}

#[test]
fn a_never_started_exec_ends_with_its_container() {
    let mut table = table_with_app_and_exec();
    table.claim_exit("app", "");
    table.record_exit("app", "", 0, SystemTime::now());
    table.delete("app", "").unwrap();
    assert_eq!(table.leftover_execs(), 0);
}
