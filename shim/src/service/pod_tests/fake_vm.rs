//! A fake pod VM: an in-memory guest whose processes exit when the test says so (or when
//! they get SIGKILL/SIGTERM), which can crash, report OOM kills and fail chosen calls.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use oci_spec::runtime::Spec;
use spry_proto::agent as pb;
use tokio::sync::watch;

use crate::agent_client::{AgentError, OutputStream, ProcessId};
use crate::rootfs::RootfsSource;
use crate::sandbox::{PodVm, ProcessExit, SandboxError};
use crate::service::error::ShimError;
use crate::service::launcher::{Launched, SandboxLauncher};
use crate::vm::VmExit;

pub const FAKE_PID: u32 = 4242;

#[derive(Default)]
struct Guest {
    containers: HashSet<String>,
    /// How it exited, once it has.
    processes: HashMap<ProcessId, Option<ProcessExit>>,
    output: HashMap<ProcessId, VecDeque<Vec<u8>>>,
    ooms: VecDeque<String>,
    /// The next CreateContainer fails with this status.
    fail_create: Option<ttrpc::Code>,
    /// StartContainer does not answer while set.
    stall_starts: bool,
    /// RemoveContainer does not answer while set.
    stall_removes: bool,
    /// WaitProcess does not answer while set: exits stay in the guest.
    stall_waits: bool,
    calls: Vec<String>,
    shutdowns: usize,
}

pub struct FakeVm {
    guest: Mutex<Guest>,
    /// Bumped on every change, so blocking calls wake up and look again.
    version: watch::Sender<u64>,
    exit: watch::Sender<Option<VmExit>>,
}

impl FakeVm {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            guest: Mutex::new(Guest::default()),
            version: watch::channel(0).0,
            exit: watch::channel(None).0,
        })
    }

    fn change<T>(&self, f: impl FnOnce(&mut Guest) -> T) -> T {
        let out = f(&mut self.guest.lock().unwrap());
        self.version.send_modify(|v| *v += 1);
        out
    }

    fn call(&self, what: String) {
        self.change(|g| g.calls.push(what));
    }

    /// Every call that reached the guest, in order ("create c1", "signal c1/ 9"...).
    pub fn calls(&self) -> Vec<String> {
        self.guest.lock().unwrap().calls.clone()
    }

    pub fn shutdowns(&self) -> usize {
        self.guest.lock().unwrap().shutdowns
    }

    pub fn has_container(&self, id: &str) -> bool {
        self.guest.lock().unwrap().containers.contains(id)
    }

    /// The guest process exits with `code`.
    pub fn exit_process(&self, id: &str, exec_id: &str, code: u32) {
        let exit = ProcessExit {
            code,
            oom_killed: false,
        };
        self.end_process(id, exec_id, exit);
    }

    /// The OOM killer ends the guest process (SIGKILL), with no OOM report of its own.
    pub fn oom_kill_process(&self, id: &str, exec_id: &str) {
        let exit = ProcessExit {
            code: 137,
            oom_killed: true,
        };
        self.end_process(id, exec_id, exit);
    }

    fn end_process(&self, id: &str, exec_id: &str, exit: ProcessExit) {
        self.change(|g| g.processes.insert(ProcessId::exec(id, exec_id), Some(exit)));
    }

    /// The guest process writes `data` to its stdout.
    pub fn print(&self, id: &str, exec_id: &str, data: &[u8]) {
        self.change(|g| {
            g.output
                .entry(ProcessId::exec(id, exec_id))
                .or_default()
                .push_back(data.to_vec())
        });
    }

    pub fn oom(&self, id: &str) {
        self.change(|g| g.ooms.push_back(id.to_string()));
    }

    /// StartContainer hangs (a stalled guest) until called again with false.
    pub fn stall_starts(&self, on: bool) {
        self.change(|g| g.stall_starts = on);
    }

    /// RemoveContainer hangs until called again with false.
    pub fn stall_removes(&self, on: bool) {
        self.change(|g| g.stall_removes = on);
    }

    /// Exits reach the shim only once called again with false (the agent's reply is on
    /// its way).
    pub fn stall_waits(&self, on: bool) {
        self.change(|g| g.stall_waits = on);
    }

    pub fn fail_next_create(&self, code: ttrpc::Code) {
        self.change(|g| g.fail_create = Some(code));
    }

    /// QEMU dies under the pod.
    pub fn crash(&self) {
        self.exit.send_replace(Some(VmExit {
            code: Some(1),
            signal: None,
            console_tail: "Kernel panic".into(),
        }));
        self.version.send_modify(|v| *v += 1);
    }

    fn dead(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Blocks until `look` finds an answer; the VM's death answers `Err` (a broken link).
    async fn until<T>(
        &self,
        method: &'static str,
        mut look: impl FnMut(&mut Guest) -> Option<T>,
    ) -> Result<T, AgentError> {
        let mut version = self.version.subscribe();
        loop {
            if let Some(answer) = look(&mut self.guest.lock().unwrap()) {
                return Ok(answer);
            }
            if self.dead() {
                return Err(broken(method));
            }
            let _ = version.changed().await;
        }
    }

    fn answer(&self, method: &'static str, process: &ProcessId) -> Result<(), AgentError> {
        if self.dead() {
            return Err(broken(method));
        }
        if !self.guest.lock().unwrap().processes.contains_key(process) {
            return Err(status(method, ttrpc::Code::NOT_FOUND));
        }
        Ok(())
    }
}

fn broken(method: &'static str) -> AgentError {
    AgentError::Connection {
        method,
        source: ttrpc::Error::Socket("the VM is gone".into()),
    }
}

fn status(method: &'static str, code: ttrpc::Code) -> AgentError {
    AgentError::Status {
        method,
        code,
        message: format!("fake guest says {code:?}"),
    }
}

fn container_error(id: &str, source: AgentError) -> SandboxError {
    SandboxError::Container {
        container_id: id.to_string(),
        source,
    }
}

#[async_trait]
impl PodVm for FakeVm {
    fn pid(&self) -> u32 {
        FAKE_PID
    }

    fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        self.exit.subscribe()
    }

    async fn create_container(
        &self,
        container_id: &str,
        _spec: &Spec,
        _rootfs: &RootfsSource,
        _stdio: pb::StdioConfig,
        _volumes: crate::volumes::GuestVolumes,
    ) -> Result<(), SandboxError> {
        self.call(format!("create {container_id}"));
        if self.dead() {
            return Err(container_error(container_id, broken("CreateContainer")));
        }
        // Ok(true): created; Ok(false): the id exists; Err: the guest refuses.
        let created = self.change(|g| {
            if let Some(code) = g.fail_create.take() {
                return Err(code);
            }
            let new = g.containers.insert(container_id.to_string());
            if new {
                g.processes.insert(ProcessId::init(container_id), None);
            }
            Ok(new)
        });
        match created {
            Ok(true) => Ok(()),
            Ok(false) => Err(SandboxError::ContainerExists {
                id: "fake".into(),
                container_id: container_id.to_string(),
            }),
            Err(code) => Err(container_error(
                container_id,
                status("CreateContainer", code),
            )),
        }
    }

    async fn start_container(&self, container_id: &str) -> Result<(), SandboxError> {
        self.call(format!("start {container_id}"));
        self.until("StartContainer", |g| (!g.stall_starts).then_some(()))
            .await
            .map_err(|e| container_error(container_id, e))?;
        self.answer("StartContainer", &ProcessId::init(container_id))
            .map_err(|e| container_error(container_id, e))
    }

    async fn remove_container(&self, container_id: &str) -> Result<(), SandboxError> {
        self.call(format!("remove {container_id}"));
        self.until("RemoveContainer", |g| (!g.stall_removes).then_some(()))
            .await
            .map_err(|e| container_error(container_id, e))?;
        self.change(|g| {
            g.containers.remove(container_id);
            g.processes.retain(|p, _| p.container_id != container_id);
        });
        Ok(())
    }

    async fn exec_process(
        &self,
        process: &ProcessId,
        _spec_json: Vec<u8>,
        _stdio: pb::StdioConfig,
    ) -> Result<(), AgentError> {
        self.call(format!("exec {}/{}", process.container_id, process.exec_id));
        self.answer("ExecProcess", &ProcessId::init(&process.container_id))?;
        self.change(|g| g.processes.insert(process.clone(), None));
        Ok(())
    }

    async fn wait_process(&self, process: &ProcessId) -> Result<ProcessExit, AgentError> {
        self.until("WaitProcess", |g| {
            if g.stall_waits {
                return None;
            }
            g.processes.get(process).copied().flatten()
        })
        .await
    }

    async fn signal_process(
        &self,
        process: &ProcessId,
        signal: u32,
        _all: bool,
    ) -> Result<(), AgentError> {
        self.call(format!(
            "signal {}/{} {signal}",
            process.container_id, process.exec_id
        ));
        self.answer("SignalProcess", process)?;
        if signal == libc::SIGKILL as u32 || signal == libc::SIGTERM as u32 {
            self.exit_process(&process.container_id, &process.exec_id, 128 + signal);
        }
        Ok(())
    }

    async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, AgentError> {
        let init = ProcessId::init(container_id);
        self.answer("ListProcesses", &init)?;
        // The guest's cgroup empties when its init dies, before the shim hears of it.
        let exited = self
            .guest
            .lock()
            .unwrap()
            .processes
            .get(&init)
            .copied()
            .flatten();
        Ok(if exited.is_some() { vec![] } else { vec![1] })
    }

    async fn stats(&self, container_id: &str) -> Result<pb::ContainerStats, AgentError> {
        self.answer("Stats", &ProcessId::init(container_id))?;
        Ok(pb::ContainerStats::default())
    }

    async fn update_container(&self, container_id: &str, _: Vec<u8>) -> Result<(), AgentError> {
        self.call(format!("update {container_id}"));
        self.answer("UpdateContainer", &ProcessId::init(container_id))
    }

    async fn resize_tty(&self, process: &ProcessId, _: u32, _: u32) -> Result<(), AgentError> {
        self.answer("ResizeTty", process)
    }

    async fn read_output(
        &self,
        process: &ProcessId,
        stream: OutputStream,
        _max: u32,
    ) -> Result<Option<Vec<u8>>, AgentError> {
        self.until("ReadOutput", |g| {
            if stream == OutputStream::Stdout {
                if let Some(chunk) = g.output.get_mut(process).and_then(|q| q.pop_front()) {
                    return Some(Some(chunk));
                }
            }
            // End of stream once the process has exited (or is gone).
            match g.processes.get(process) {
                Some(None) => None,
                _ => Some(None),
            }
        })
        .await
    }

    async fn write_stdin_all(&self, process: &ProcessId, data: &[u8]) -> Result<(), AgentError> {
        self.call(format!(
            "stdin {}/{} {}",
            process.container_id,
            process.exec_id,
            String::from_utf8_lossy(data).trim_end()
        ));
        self.answer("WriteStdin", process)
    }

    async fn close_stdin(&self, process: &ProcessId) -> Result<(), AgentError> {
        self.call(format!(
            "close-stdin {}/{}",
            process.container_id, process.exec_id
        ));
        self.answer("CloseStdin", process)
    }

    async fn next_oom_event(&self) -> Result<String, AgentError> {
        self.until("GetOomEvent", |g| g.ooms.pop_front()).await
    }

    async fn shutdown(&self, _timeout: Duration) -> Result<VmExit, SandboxError> {
        self.change(|g| g.shutdowns += 1);
        self.exit.send_if_modified(|exit| {
            if exit.is_some() {
                return false;
            }
            *exit = Some(VmExit {
                code: Some(0),
                signal: None,
                console_tail: String::new(),
            });
            true
        });
        self.version.send_modify(|v| *v += 1);
        Ok(self.exit.borrow().clone().expect("set above"))
    }
}

/// Hands out one fake VM per launch; can refuse to launch.
pub struct FakeLauncher {
    pub vms: Arc<Mutex<Vec<Arc<FakeVm>>>>,
    pub state_dir: PathBuf,
    pub fail: bool,
}

#[async_trait]
impl SandboxLauncher for FakeLauncher {
    async fn launch(
        &self,
        _id: &str,
        _spec: &Spec,
        _options: Option<&Any>,
    ) -> Result<Launched, ShimError> {
        if self.fail {
            return Err(SandboxError::DiedDuringBoot {
                id: "fake".into(),
                exit: "QEMU exited with status 1".into(),
                console_tail: "Kernel panic".into(),
            }
            .into());
        }
        let vm = FakeVm::new();
        self.vms.lock().unwrap().push(Arc::clone(&vm));
        Ok(Launched {
            vm,
            config: crate::config::Config {
                state_dir: self.state_dir.clone(),
                ..Default::default()
            },
            rebuild: None,
        })
    }
}
