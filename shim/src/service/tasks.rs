//! The pod's task table: containers (the sandbox task and app containers), their init
//! processes and execs, and the allowed transitions. Pure bookkeeping: no I/O, no VM.
//!
//! Process state lives in a `watch` channel per process, so `Wait` is a subscription. An
//! exit is recorded exactly once: whoever first claims it ([`TaskTable::claim_exit`])
//! drains the output and records it; every later claim (the VM's death racing a process
//! watcher, say) gets nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::SystemTime;

use tokio::sync::watch;

use super::bundle_rootfs::MountedRootfs;
use super::error::ShimError;
use super::io::{IoPumps, StdioPaths};
use super::spec::TaskKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessStatus {
    Created,
    Running,
    Stopped {
        exit_code: u32,
        exited_at: SystemTime,
    },
}

impl ProcessStatus {
    pub fn name(&self) -> &'static str {
        match self {
            ProcessStatus::Created => "created",
            ProcessStatus::Running => "running",
            ProcessStatus::Stopped { .. } => "stopped",
        }
    }

    fn is_stopped(&self) -> bool {
        matches!(self, ProcessStatus::Stopped { .. })
    }
}

/// A process as containerd sees it.
pub struct Process {
    pub stdio: StdioPaths,
    status: watch::Sender<ProcessStatus>,
    /// OCI Process JSON of an exec, kept from Exec until Start.
    pub exec_spec: Vec<u8>,
    pub pumps: Option<IoPumps>,
    /// Somebody is recording this process's exit.
    exit_claimed: bool,
    /// A Start is asking the guest to run it (outside the task lock).
    pub starting: bool,
}

impl Process {
    pub fn new(stdio: StdioPaths) -> Self {
        Self {
            stdio,
            status: watch::channel(ProcessStatus::Created).0,
            exec_spec: Vec::new(),
            pumps: None,
            exit_claimed: false,
            starting: false,
        }
    }

    pub fn status(&self) -> ProcessStatus {
        *self.status.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<ProcessStatus> {
        self.status.subscribe()
    }

    pub fn set_running(&self) {
        self.status.send_replace(ProcessStatus::Running);
    }
}

pub struct Task {
    pub kind: TaskKind,
    pub bundle: PathBuf,
    /// containerd's rootfs mounts, which we mounted at `<bundle>/rootfs` and must unmount.
    pub rootfs: Option<MountedRootfs>,
    pub init: Process,
    pub execs: HashMap<String, Process>,
}

impl Task {
    pub fn new(kind: TaskKind, bundle: PathBuf, stdio: StdioPaths) -> Self {
        Self {
            kind,
            bundle,
            rootfs: None,
            init: Process::new(stdio),
            execs: HashMap::new(),
        }
    }

    pub fn rootfs_dir(&self) -> PathBuf {
        self.bundle.join("rootfs")
    }
}

/// What a Delete took out of the table.
pub struct Deleted {
    pub exit_code: u32,
    pub exited_at: SystemTime,
    /// The whole container's task, when the container (not an exec) was deleted.
    pub task: Option<Box<Task>>,
}

/// Every task of the pod, by container id.
#[derive(Default)]
pub struct TaskTable {
    tasks: HashMap<String, Task>,
    /// Execs that had run when their container was deleted, by (container, exec) id. A dead
    /// VM ends a container and its execs at once, and containerd may delete the container
    /// first: each stays here until containerd deletes it too (and gets its exit), so the
    /// shim does not go away under that Delete.
    leftover_execs: HashMap<(String, String), Process>,
}

impl TaskTable {
    pub fn contains(&self, id: &str) -> bool {
        self.tasks.contains_key(id)
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// How many execs of deleted containers containerd has not deleted yet.
    pub fn leftover_execs(&self) -> usize {
        self.leftover_execs.len()
    }

    /// How many execs of deleted container `id` containerd has not deleted yet.
    pub fn leftover_execs_of(&self, id: &str) -> usize {
        self.leftover_execs.keys().filter(|(c, _)| c == id).count()
    }

    pub fn insert(&mut self, id: &str, task: Task) -> Result<(), ShimError> {
        if self.tasks.contains_key(id) {
            return Err(ShimError::ContainerExists { id: id.to_string() });
        }
        self.tasks.insert(id.to_string(), task);
        Ok(())
    }

    pub fn task(&self, id: &str) -> Result<&Task, ShimError> {
        self.tasks
            .get(id)
            .ok_or_else(|| ShimError::ContainerNotFound { id: id.to_string() })
    }

    pub fn process(&self, id: &str, exec_id: &str) -> Result<&Process, ShimError> {
        if let Some(leftover) = self.leftover(id, exec_id) {
            return Ok(leftover);
        }
        let task = self.task(id)?;
        if exec_id.is_empty() {
            return Ok(&task.init);
        }
        task.execs
            .get(exec_id)
            .ok_or_else(|| process_not_found(id, exec_id))
    }

    pub fn process_mut(&mut self, id: &str, exec_id: &str) -> Result<&mut Process, ShimError> {
        if self.leftover(id, exec_id).is_some() {
            let key = (id.to_string(), exec_id.to_string());
            return self
                .leftover_execs
                .get_mut(&key)
                .ok_or_else(|| process_not_found(id, exec_id));
        }
        let task = self
            .tasks
            .get_mut(id)
            .ok_or_else(|| ShimError::ContainerNotFound { id: id.to_string() })?;
        if exec_id.is_empty() {
            return Ok(&mut task.init);
        }
        task.execs
            .get_mut(exec_id)
            .ok_or_else(|| process_not_found(id, exec_id))
    }

    /// The process Start may start: it must exist and be created, not yet started.
    pub fn startable(
        &mut self,
        id: &str,
        exec_id: &str,
    ) -> Result<(TaskKind, &mut Process), ShimError> {
        let kind = self.task(id)?.kind;
        let process = self.process_mut(id, exec_id)?;
        let status = process.status();
        if status != ProcessStatus::Created || process.starting {
            return Err(wrong_state(id, exec_id, status, "created"));
        }
        Ok((kind, process))
    }

    /// Registers a new exec; the container's init must be running.
    pub fn add_exec(&mut self, id: &str, exec_id: &str, process: Process) -> Result<(), ShimError> {
        let task = self
            .tasks
            .get_mut(id)
            .ok_or_else(|| ShimError::ContainerNotFound { id: id.to_string() })?;
        if task.execs.contains_key(exec_id) {
            return Err(ShimError::ProcessExists {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            });
        }
        let status = task.init.status();
        if status != ProcessStatus::Running {
            return Err(wrong_state(id, "", status, "running"));
        }
        task.execs.insert(exec_id.to_string(), process);
        Ok(())
    }

    /// The kind of task a Kill reaches. A stopped process is NotFound, which containerd
    /// takes as "already finished".
    pub fn killable(&self, id: &str, exec_id: &str) -> Result<TaskKind, ShimError> {
        let kind = self.task(id)?.kind;
        if self.process(id, exec_id)?.status().is_stopped() {
            return Err(process_not_found(id, exec_id));
        }
        Ok(kind)
    }

    /// Claims the right to record a process's exit; `None` if it is gone, stopped, or
    /// already claimed. The claim hands over the process's I/O pumps to drain.
    pub fn claim_exit(&mut self, id: &str, exec_id: &str) -> Option<Option<IoPumps>> {
        let process = self.process_mut(id, exec_id).ok()?;
        if process.exit_claimed || process.status().is_stopped() {
            return None;
        }
        process.exit_claimed = true;
        Some(process.pumps.take())
    }

    /// Records a claimed exit; false if the process was deleted meanwhile.
    pub fn record_exit(
        &self,
        id: &str,
        exec_id: &str,
        exit_code: u32,
        exited_at: SystemTime,
    ) -> bool {
        let Ok(process) = self.process(id, exec_id) else {
            return false;
        };
        process.status.send_replace(ProcessStatus::Stopped {
            exit_code,
            exited_at,
        });
        true
    }

    /// The processes a dead VM took with it, with the exit code each gets: every init
    /// not stopped yet (`sandbox_code` for the sandbox task, `app_code` for the others)
    /// and every running exec.
    pub fn lost_with_vm(&self, sandbox_code: u32, app_code: u32) -> Vec<(String, String, u32)> {
        let mut lost = Vec::new();
        for (id, task) in &self.tasks {
            if !task.init.status().is_stopped() {
                let code = match task.kind {
                    TaskKind::Sandbox => sandbox_code,
                    TaskKind::App => app_code,
                };
                lost.push((id.clone(), String::new(), code));
            }
            for (exec_id, process) in &task.execs {
                if process.status() == ProcessStatus::Running {
                    lost.push((id.clone(), exec_id.clone(), app_code));
                }
            }
        }
        lost.sort();
        lost
    }

    /// Takes an exec or a whole container out of the table; it must not be running.
    /// A created, never started process is deleted with exit code 0, as runc does.
    pub fn delete(&mut self, id: &str, exec_id: &str) -> Result<Deleted, ShimError> {
        let process = self.process(id, exec_id)?;
        let status = process.status();
        if process.starting {
            return Err(wrong_state(id, exec_id, status, "stopped (it is starting)"));
        }
        let (exit_code, exited_at) = match status {
            ProcessStatus::Running => return Err(wrong_state(id, exec_id, status, "stopped")),
            ProcessStatus::Stopped {
                exit_code,
                exited_at,
            } => (exit_code, exited_at),
            ProcessStatus::Created => (0, SystemTime::now()),
        };
        if !exec_id.is_empty() {
            if let Some(task) = self.tasks.get_mut(id) {
                task.execs.remove(exec_id);
            }
            self.leftover_execs
                .remove(&(id.to_string(), exec_id.to_string()));
            return Ok(Deleted {
                exit_code,
                exited_at,
                task: None,
            });
        }
        let mut task = self
            .tasks
            .remove(id)
            .ok_or_else(|| ShimError::ContainerNotFound { id: id.to_string() })?;
        // Execs that ran outlive their container in the table until containerd deletes
        // them; one never started ends here (containerd never deletes what it never ran).
        for (exec_id, process) in task.execs.drain() {
            if process.status() != ProcessStatus::Created {
                self.leftover_execs
                    .insert((id.to_string(), exec_id), process);
            }
        }
        Ok(Deleted {
            exit_code,
            exited_at,
            task: Some(Box::new(task)),
        })
    }

    fn leftover(&self, id: &str, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() || self.tasks.contains_key(id) {
            return None;
        }
        self.leftover_execs
            .get(&(id.to_string(), exec_id.to_string()))
    }

    /// Empties the table (the shim is going away).
    pub fn drain(&mut self) -> Vec<Task> {
        self.leftover_execs.clear();
        self.tasks.drain().map(|(_, t)| t).collect()
    }
}

fn process_not_found(id: &str, exec_id: &str) -> ShimError {
    ShimError::ProcessNotFound {
        id: id.to_string(),
        exec_id: exec_id.to_string(),
    }
}

pub fn wrong_state(
    id: &str,
    exec_id: &str,
    status: ProcessStatus,
    wanted: &'static str,
) -> ShimError {
    ShimError::WrongState {
        id: id.to_string(),
        exec_id: exec_id.to_string(),
        state: status.name(),
        wanted,
    }
}

#[cfg(test)]
#[path = "tasks_tests.rs"]
mod tests;
