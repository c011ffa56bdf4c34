//! The pod lifecycle driven the way containerd's CRI plugin drives it, over a fake VM:
//! no root, no QEMU, a few milliseconds per test.

mod containerd_restarts;
mod exec_deletes;
mod fake_vm;
mod oom_events;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::protos::events::task::TaskExit;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use oci_spec::runtime::Spec;
use ttrpc::Code;

use super::{Pod, ProcessStatus};
use crate::service::events::{EventPublisher, EventSink};
use crate::service::io::StdioPaths;
use crate::service::spec::{CONTAINER_TYPE_ANNOTATION, SANDBOX_ID_ANNOTATION};
use crate::service::ShimError;
use fake_vm::{FakeLauncher, FakeVm, FAKE_PID};

const SANDBOX: &str = "sbx";
const APP: &str = "app";
const KILL: u32 = libc::SIGKILL as u32;
const TERM: u32 = libc::SIGTERM as u32;
/// Generous: a fake call takes microseconds; only a hang reaches it.
const PATIENCE: Duration = Duration::from_secs(5);

type Events = Arc<Mutex<Vec<(String, Box<dyn MessageDyn>)>>>;

struct Recorder(Events);

#[async_trait]
impl EventPublisher for Recorder {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        self.0.lock().unwrap().push((topic.to_string(), event));
    }
}

struct Harness {
    pod: Arc<Pod>,
    vms: Arc<Mutex<Vec<Arc<FakeVm>>>>,
    events: Events,
    dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        Self::with_launcher(false)
    }

    fn with_launcher(fail: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let vms = Arc::default();
        let events: Events = Arc::default();
        let launcher = FakeLauncher {
            vms: Arc::clone(&vms),
            state_dir: dir.path().join("state"),
            fail,
        };
        let pod = Pod::new(
            Box::new(launcher),
            EventSink::new(Box::new(Recorder(Arc::clone(&events)))),
        );
        Self {
            pod,
            vms,
            events,
            dir,
        }
    }

    fn vm(&self) -> Arc<FakeVm> {
        Arc::clone(self.vms.lock().unwrap().last().expect("a VM was launched"))
    }

    /// A bundle whose spec carries CRI's annotations (`kind` "sandbox" or "container").
    fn bundle(&self, id: &str, kind: Option<&str>) -> PathBuf {
        let bundle = self.dir.path().join(id);
        std::fs::create_dir_all(&bundle).unwrap();
        let mut spec = Spec::default();
        if let Some(kind) = kind {
            spec.set_annotations(Some(
                [
                    (CONTAINER_TYPE_ANNOTATION.to_string(), kind.to_string()),
                    (SANDBOX_ID_ANNOTATION.to_string(), SANDBOX.to_string()),
                ]
                .into(),
            ));
        }
        spec.save(bundle.join("config.json")).unwrap();
        bundle
    }

    async fn create(&self, id: &str, kind: Option<&str>) -> Result<u32, ShimError> {
        self.create_with(id, kind, StdioPaths::default()).await
    }

    async fn create_with(
        &self,
        id: &str,
        kind: Option<&str>,
        stdio: StdioPaths,
    ) -> Result<u32, ShimError> {
        let bundle = self.bundle(id, kind);
        self.pod.create(id, &bundle, &[], stdio, None).await
    }

    /// A running pod with a started app container.
    async fn running_app() -> Self {
        let h = Self::new();
        h.create(SANDBOX, Some("sandbox")).await.unwrap();
        h.pod.start(SANDBOX, "").await.unwrap();
        h.create(APP, Some("container")).await.unwrap();
        h.pod.start(APP, "").await.unwrap();
        h
    }

    async fn exec(&self, exec_id: &str) {
        let spec = serde_json::to_vec(&oci_spec::runtime::Process::default()).unwrap();
        self.pod
            .exec(APP, exec_id, StdioPaths::default(), spec)
            .await
            .unwrap();
        self.pod.start(APP, exec_id).await.unwrap();
    }

    async fn wait(&self, id: &str, exec_id: &str) -> u32 {
        let waited = tokio::time::timeout(PATIENCE, self.pod.wait(id, exec_id)).await;
        waited.expect("the exit came").unwrap().0
    }

    fn topics(&self) -> Vec<String> {
        let events = self.events.lock().unwrap();
        events.iter().map(|(topic, _)| topic.clone()).collect()
    }

    /// (container id, process id, exit status) of every exit event, in order.
    fn exits(&self) -> Vec<(String, String, u32)> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter_map(|(_, e)| <dyn MessageDyn>::downcast_ref::<TaskExit>(e.as_ref()))
            .map(|e| (e.container_id.clone(), e.id.clone(), e.exit_status))
            .collect()
    }

    /// Waits until `n` exit events were published (watchers run in the background).
    async fn until_exits(&self, n: usize) -> Vec<(String, String, u32)> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.exits().len() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.exits()
    }
}

fn code(err: ShimError) -> Code {
    match ttrpc::Error::from(err) {
        ttrpc::Error::RpcStatus(status) => status.code(),
        other => panic!("not a status: {other:?}"),
    }
}

#[tokio::test]
async fn a_pod_runs_through_the_whole_cri_lifecycle() {
    let h = Harness::new();
    assert_eq!(h.create(SANDBOX, Some("sandbox")).await.unwrap(), FAKE_PID);
    assert_eq!(h.pod.start(SANDBOX, "").await.unwrap(), FAKE_PID);
    h.create(APP, Some("container")).await.unwrap();
    let created = h.pod.state(APP, "").await.unwrap();
    assert_eq!(created.status, ProcessStatus::Created);
    h.pod.start(APP, "").await.unwrap();
    assert_eq!(
        h.pod.state(APP, "").await.unwrap().status,
        ProcessStatus::Running
    );
    assert_eq!(h.pod.pids(SANDBOX).await.unwrap(), vec![FAKE_PID]);

    h.exec("e1").await;
    h.vm().exit_process(APP, "e1", 3);
    assert_eq!(h.wait(APP, "e1").await, 3);
    assert_eq!(h.pod.delete(APP, "e1").await.unwrap().exit_code, 3);

    h.vm().exit_process(APP, "", 0);
    assert_eq!(h.wait(APP, "").await, 0);
    assert_eq!(h.pod.delete(APP, "").await.unwrap().exit_code, 0);
    assert!(
        !h.vm().has_container(APP),
        "the guest container was removed"
    );

    h.pod.kill(SANDBOX, "", KILL, false).await.unwrap();
    assert_eq!(h.wait(SANDBOX, "").await, 137);
    h.pod.delete(SANDBOX, "").await.unwrap();
    assert!(h.pod.is_empty().await);
    // Kill and delete of the sandbox both stop it, and so may the VM watcher once the VM
    // is gone; shutdown is idempotent.
    assert!(
        h.vm().shutdowns() >= 2,
        "kill and delete of the sandbox both stop it"
    );
    assert_eq!(
        h.vm().calls(),
        ["create app", "start app", "exec app/e1", "remove app"]
    );
    assert_eq!(
        h.topics(),
        [
            topics::TASK_CREATE_EVENT_TOPIC,
            topics::TASK_START_EVENT_TOPIC,
            topics::TASK_CREATE_EVENT_TOPIC,
            topics::TASK_START_EVENT_TOPIC,
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            topics::TASK_EXIT_EVENT_TOPIC,
            topics::TASK_EXIT_EVENT_TOPIC,
            topics::TASK_DELETE_EVENT_TOPIC,
            topics::TASK_EXIT_EVENT_TOPIC,
            topics::TASK_DELETE_EVENT_TOPIC,
        ]
    );
}

#[tokio::test]
async fn when_the_vm_dies_every_process_exits_once_with_the_documented_status() {
    let h = Harness::running_app().await;
    h.exec("e1").await;
    h.create("created-only", Some("container")).await.unwrap();
    h.vm().crash();
    assert_eq!(h.wait(APP, "").await, 255);
    assert_eq!(h.wait(APP, "e1").await, 255);
    assert_eq!(h.wait("created-only", "").await, 255);
    assert_eq!(h.wait(SANDBOX, "").await, 137);
    let mut exits = h.until_exits(4).await;
    // Both the process watchers and the VM watcher saw the death: still one exit each.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.exits().len(), 4, "{:?}", h.exits());
    exits.sort();
    assert_eq!(
        exits,
        [
            ("app".into(), "app".into(), 255),
            ("app".into(), "e1".into(), 255),
            ("created-only".into(), "created-only".into(), 255),
            ("sbx".into(), "sbx".into(), 137),
        ]
    );
    // Calls that need the guest now fail as "unavailable"; cleanup still works.
    assert_eq!(code(h.pod.stats(APP).await.unwrap_err()), Code::UNAVAILABLE);
    h.pod.delete(APP, "e1").await.unwrap();
    for id in [APP, "created-only", SANDBOX] {
        h.pod.delete(id, "").await.unwrap();
    }
    assert!(h.pod.is_empty().await);
}

#[tokio::test]
async fn kill_reaches_the_guest_and_a_finished_process_is_not_found() {
    let h = Harness::running_app().await;
    h.pod.kill(APP, "", TERM, false).await.unwrap();
    assert_eq!(h.wait(APP, "").await, 128 + TERM);
    assert!(h.vm().calls().contains(&"signal app/ 15".to_string()));
    // containerd reads NotFound as "already finished".
    let again = h.pod.kill(APP, "", KILL, false).await.unwrap_err();
    assert_eq!(code(again), Code::NOT_FOUND);
    assert_eq!(h.until_exits(1).await, [("app".into(), "app".into(), 143)]);
}

#[tokio::test]
async fn calls_in_the_wrong_state_get_the_codes_containerd_expects() {
    let h = Harness::new();
    // An app container before its pod's sandbox.
    let early = h.create(APP, Some("container")).await.unwrap_err();
    assert_eq!(code(early), Code::FAILED_PRECONDITION);
    h.create(SANDBOX, Some("sandbox")).await.unwrap();
    h.pod.start(SANDBOX, "").await.unwrap();
    let twice = h.create(SANDBOX, Some("sandbox")).await.unwrap_err();
    assert_eq!(code(twice), Code::ALREADY_EXISTS);
    h.create(APP, Some("container")).await.unwrap();

    let spec = serde_json::to_vec(&oci_spec::runtime::Process::default()).unwrap();
    let exec_before_start = h
        .pod
        .exec(APP, "e1", StdioPaths::default(), spec.clone())
        .await
        .unwrap_err();
    assert_eq!(code(exec_before_start), Code::FAILED_PRECONDITION);
    h.pod.start(APP, "").await.unwrap();
    let start_twice = h.pod.start(APP, "").await.unwrap_err();
    assert_eq!(code(start_twice), Code::FAILED_PRECONDITION);
    let delete_running = h.pod.delete(APP, "").await.unwrap_err();
    assert_eq!(code(delete_running), Code::FAILED_PRECONDITION);

    h.pod
        .exec(APP, "e1", StdioPaths::default(), spec.clone())
        .await
        .unwrap();
    let same_exec = h
        .pod
        .exec(APP, "e1", StdioPaths::default(), spec)
        .await
        .unwrap_err();
    assert_eq!(code(same_exec), Code::ALREADY_EXISTS);
    let bad_spec = h
        .pod
        .exec(APP, "e2", StdioPaths::default(), b"{not json".to_vec())
        .await
        .unwrap_err();
    assert_eq!(code(bad_spec), Code::INVALID_ARGUMENT);

    for err in [
        h.pod.start("nope", "").await.unwrap_err(),
        h.pod.start(APP, "nope").await.unwrap_err(),
        h.pod.kill("nope", "", KILL, false).await.unwrap_err(),
        h.pod.delete(APP, "nope").await.map(|_| ()).unwrap_err(),
        h.pod.wait("nope", "").await.map(|_| ()).unwrap_err(),
        h.pod.state(APP, "nope").await.map(|_| ()).unwrap_err(),
    ] {
        assert_eq!(code(err), Code::NOT_FOUND);
    }
    // Nothing reached the guest for any refused call.
    assert_eq!(h.vm().calls(), ["create app", "start app"]);
}

#[tokio::test]
async fn a_create_the_guest_refuses_passes_its_code_on_and_leaves_no_task() {
    let h = Harness::new();
    h.create(SANDBOX, Some("sandbox")).await.unwrap();
    h.vm().fail_next_create(Code::INVALID_ARGUMENT);
    let refused = h.create(APP, Some("container")).await.unwrap_err();
    assert_eq!(code(refused), Code::INVALID_ARGUMENT);
    assert_eq!(
        code(h.pod.state(APP, "").await.map(|_| ()).unwrap_err()),
        Code::NOT_FOUND
    );
    // The same id works once the cause is gone.
    h.create(APP, Some("container")).await.unwrap();
    assert_eq!(
        h.vm().shutdowns(),
        0,
        "a failed app create keeps the pod's VM"
    );
}

#[tokio::test]
async fn a_vm_that_cannot_start_fails_the_sandbox_and_leaves_nothing() {
    let h = Harness::with_launcher(true);
    let err = h.create(SANDBOX, Some("sandbox")).await.unwrap_err();
    assert!(
        err.to_string().contains("exited before its agent answered"),
        "{err}"
    );
    assert!(h.pod.is_empty().await);
    assert_eq!(h.pod.vm_pid().await, 0);
    assert!(h.topics().is_empty(), "no create event for a failed create");
}

#[tokio::test]
async fn a_container_never_started_is_deleted_with_status_zero() {
    let h = Harness::new();
    h.create(SANDBOX, Some("sandbox")).await.unwrap();
    h.create(APP, Some("container")).await.unwrap();
    let deleted = h.pod.delete(APP, "").await.unwrap();
    assert_eq!(deleted.exit_code, 0);
    assert_eq!(h.vm().calls(), ["create app", "remove app"]);
}

#[tokio::test]
async fn a_guest_stalling_a_start_does_not_hold_up_the_pods_other_calls() {
    let h = Harness::new();
    h.create(SANDBOX, Some("sandbox")).await.unwrap();
    h.pod.start(SANDBOX, "").await.unwrap();
    h.create(APP, Some("container")).await.unwrap();
    h.vm().stall_starts(true);
    let pod = Arc::clone(&h.pod);
    let start = tokio::spawn(async move { pod.start(APP, "").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let quick = Duration::from_secs(1);
    tokio::time::timeout(quick, h.pod.state(SANDBOX, ""))
        .await
        .expect("State waited on the stalled start")
        .unwrap();
    tokio::time::timeout(quick, h.pod.kill(APP, "", 9, false))
        .await
        .expect("Kill waited on the stalled start")
        .unwrap();
    // A second Start, or a Delete, of the starting container is refused, not queued.
    let again = tokio::time::timeout(quick, h.pod.start(APP, ""))
        .await
        .unwrap();
    assert_eq!(code(again.unwrap_err()), Code::FAILED_PRECONDITION);
    let delete = tokio::time::timeout(quick, h.pod.delete(APP, ""))
        .await
        .unwrap();
    assert_eq!(code(delete.err().unwrap()), Code::FAILED_PRECONDITION);
    h.vm().stall_starts(false);
    start.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_with_tasks_left_stops_the_vm_and_forgets_every_task() {
    let h = Harness::running_app().await;
    h.exec("e1").await;
    h.pod.shutdown().await;
    assert_eq!(h.vm().shutdowns(), 1);
    assert!(h.pod.is_empty().await);
    assert_eq!(h.pod.vm_pid().await, 0);
    assert_eq!(
        code(h.pod.kill(APP, "", KILL, false).await.unwrap_err()),
        Code::NOT_FOUND
    );
}

#[tokio::test]
async fn a_task_without_cri_annotations_gets_a_vm_of_its_own() {
    let h = Harness::new();
    h.create("ctr-run", None).await.unwrap();
    assert_eq!(h.vms.lock().unwrap().len(), 1);
    h.pod.start("ctr-run", "").await.unwrap();
    assert_eq!(h.vm().calls(), ["create ctr-run", "start ctr-run"]);
}

#[tokio::test]
async fn the_last_output_reaches_the_fifo_before_the_exit_event() {
    let h = Harness::new();
    h.create(SANDBOX, Some("sandbox")).await.unwrap();
    let stdout = h.dir.path().join("stdout");
    nix::unistd::mkfifo(&stdout, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut reader = open_fifo_reader(&stdout);
    let stdio = StdioPaths {
        stdout: stdout.to_string_lossy().into(),
        ..Default::default()
    };
    h.create_with(APP, Some("container"), stdio).await.unwrap();
    h.pod.start(APP, "").await.unwrap();
    h.vm().print(APP, "", b"last words\n");
    h.vm().exit_process(APP, "", 0);
    assert_eq!(h.until_exits(1).await.len(), 1);
    // The exit event is out: the output must already be in the FIFO.
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut reader, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"last words\n");
}

#[tokio::test]
async fn close_io_forwards_what_containerd_wrote_before_closing_stdin() {
    let h = Harness::new();
    h.create(SANDBOX, Some("sandbox")).await.unwrap();
    let stdin = h.dir.path().join("stdin");
    nix::unistd::mkfifo(&stdin, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let stdio = StdioPaths {
        stdin: stdin.to_string_lossy().into(),
        ..Default::default()
    };
    h.create_with(APP, Some("container"), stdio).await.unwrap();
    h.pod.start(APP, "").await.unwrap();
    // containerd (kubectl attach with stdinOnce): write the input, then CloseIO at once.
    let mut writer = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new().write(true).open(stdin).unwrap()
    })
    .await
    .unwrap();
    std::io::Write::write_all(&mut writer, b"ping\n").unwrap();
    h.pod.close_stdin(APP, "").await.unwrap();
    let vm = h.vm();
    let closed = "close-stdin app/".to_string();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !vm.calls().contains(&closed) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let calls = vm.calls();
    let data = calls.iter().position(|c| c == "stdin app/ ping");
    let close = calls.iter().position(|c| *c == closed);
    assert!(
        data.is_some() && data < close,
        "the input must reach the guest before its stdin closes: {calls:?}"
    );
    drop(writer);
}

fn open_fifo_reader(path: &Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap()
}
