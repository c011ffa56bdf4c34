//! containerd's task API (v3) over [`Pod`]: request/response translation only.
//!
//! The calls that change the pod run to the end on a task of their own (`to_completion`):
//! ttrpc drops a handler's future when containerd's connection closes, and containerd
//! killed or restarted in the middle of a delete had left the container's rootfs mounted
//! and the shim alive after its pod was gone.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::protos::api;
use containerd_shim::protos::protobuf::well_known_types::empty::Empty;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::types::task::Status;
use containerd_shim::ExitSignal;
use ttrpc::r#async::TtrpcContext;

use super::error::ShimError;
use super::events::timestamp;
use super::io::StdioPaths;
use super::pod::Pod;
use super::stats;
use super::tasks::ProcessStatus;

type TtrpcResult<T> = ttrpc::Result<T>;

/// The task service containerd talks to.
/// How long an emptied pod's shim waits for containerd to delete the execs its dead VM
/// ended, before it goes anyway.
const LEFTOVER_EXEC_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

pub struct TaskService {
    pod: Arc<Pod>,
    exit: Arc<ExitSignal>,
}

impl TaskService {
    pub fn new(pod: Arc<Pod>, exit: Arc<ExitSignal>) -> Self {
        Self { pod, exit }
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let stdio = StdioPaths {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };
        let pod = Arc::clone(&self.pod);
        let pid = to_completion("Create", async move {
            let bundle = PathBuf::from(&req.bundle);
            pod.create(&req.id, &bundle, &req.rootfs, stdio, req.options.as_ref())
                .await
        })
        .await?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pod = Arc::clone(&self.pod);
        let pid = to_completion(
            "Start",
            async move { pod.start(&req.id, &req.exec_id).await },
        )
        .await?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let state = self.pod.state(&req.id, &req.exec_id).await?;
        let mut resp = api::StateResponse {
            id: req.id,
            exec_id: req.exec_id,
            bundle: state.bundle.to_string_lossy().to_string(),
            pid: state.pid,
            stdin: state.stdio.stdin,
            stdout: state.stdio.stdout,
            stderr: state.stdio.stderr,
            terminal: state.stdio.terminal,
            ..Default::default()
        };
        let status = match state.status {
            ProcessStatus::Created => Status::CREATED,
            ProcessStatus::Running => Status::RUNNING,
            ProcessStatus::Stopped {
                exit_code,
                exited_at,
            } => {
                resp.exit_status = exit_code;
                resp.exited_at = Some(timestamp(exited_at)).into();
                Status::STOPPED
            }
        };
        resp.status = status.into();
        Ok(resp)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let pod = Arc::clone(&self.pod);
        let deleted = to_completion(
            "Delete",
            async move { pod.delete(&req.id, &req.exec_id).await },
        )
        .await?;
        Ok(api::DeleteResponse {
            pid: deleted.pid,
            exit_status: deleted.exit_code,
            exited_at: Some(timestamp(deleted.exited_at)).into(),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let processes = self
            .pod
            .pids(&req.id)
            .await?
            .into_iter()
            .map(|pid| api::ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        let pod = Arc::clone(&self.pod);
        to_completion("Kill", async move {
            pod.kill(&req.id, &req.exec_id, req.signal, req.all).await
        })
        .await?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        let stdio = StdioPaths {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };
        let spec = req
            .spec
            .into_option()
            .map(|any| any.value)
            .unwrap_or_default();
        let pod = Arc::clone(&self.pod);
        to_completion("Exec", async move {
            pod.exec(&req.id, &req.exec_id, stdio, spec).await
        })
        .await?;
        Ok(Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<Empty> {
        self.pod
            .resize_pty(&req.id, &req.exec_id, req.height, req.width)
            .await?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        if req.stdin {
            let pod = Arc::clone(&self.pod);
            to_completion("CloseIO", async move {
                pod.close_stdin(&req.id, &req.exec_id).await
            })
            .await?;
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        let resources = req
            .resources
            .into_option()
            .map(|any| any.value)
            .unwrap_or_default();
        let pod = Arc::clone(&self.pod);
        to_completion(
            "Update",
            async move { pod.update(&req.id, resources).await },
        )
        .await?;
        Ok(Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let (exit_status, exited_at) = self.pod.wait(&req.id, &req.exec_id).await?;
        Ok(api::WaitResponse {
            exit_status,
            exited_at: Some(timestamp(exited_at)).into(),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let s = self.pod.stats(&req.id).await?;
        Ok(api::StatsResponse {
            stats: Some(stats::to_any(&s)).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.pod.vm_pid().await,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<Empty> {
        let (pod, exit) = (Arc::clone(&self.pod), Arc::clone(&self.exit));
        to_completion("Shutdown", async move {
            // containerd asks after each delete; the shim lives while the pod has tasks.
            if !pod.is_empty().await {
                return Ok(());
            }
            if pod.leftover_execs().await > 0 {
                // Execs a dead VM ended with their container: containerd deletes them
                // right after the container (and asks again), but the shim never lingers
                // on one whose Delete does not come.
                tokio::spawn(async move {
                    tokio::time::sleep(LEFTOVER_EXEC_GRACE).await;
                    pod.shutdown().await;
                    exit.signal();
                });
                return Ok(());
            }
            pod.shutdown().await;
            exit.signal();
            Ok(())
        })
        .await?;
        Ok(Empty::new())
    }
}

/// Runs a call's work on a task of its own and waits for its answer. When containerd's
/// connection closes mid-call, ttrpc drops the handler's future at whatever await it is
/// in; the work here goes on to the end (only the answer is lost, as when containerd
/// dies just after a reply), so no step of a delete or create is left half done.
async fn to_completion<T: Send + 'static>(
    call: &'static str,
    work: impl Future<Output = Result<T, ShimError>> + Send + 'static,
) -> TtrpcResult<T> {
    match tokio::spawn(work).await {
        Ok(answer) => Ok(answer?),
        Err(e) => Err(ShimError::CallAborted {
            call,
            panicked: e.is_panic(),
        }
        .into()),
    }
}
