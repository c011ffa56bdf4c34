//! Spawning QEMU from one long-lived thread.
//!
//! QEMU gets PR_SET_PDEATHSIG so that it dies with the shim; but the kernel
//! sends that signal when the *thread* that forked exits, not the process.
//! Forking from whatever thread polls the future could tie a healthy VM to a
//! short-lived thread (tokio retires idle blocking-pool threads after 10 s).
//! This thread lives as long as the process.

use std::io;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

struct SpawnRequest {
    command: Command,
    /// The caller's runtime: the child is registered with its process driver.
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<io::Result<Child>>,
}

fn spawner() -> io::Result<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<Option<mpsc::Sender<SpawnRequest>>>> = OnceLock::new();
    let slot = SPAWNER.get_or_init(|| Mutex::new(None));
    let mut slot = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(sender) = slot.as_ref() {
        return Ok(sender.clone());
    }
    let (sender, requests) = mpsc::channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name("spry-vm-spawner".into())
        .spawn(move || {
            for mut request in requests {
                let _runtime = request.runtime.enter();
                let _ = request.reply.send(request.command.spawn());
            }
        })?;
    *slot = Some(sender.clone());
    Ok(sender)
}

/// Spawns `command` on the spawner thread and returns the child, registered
/// with the current tokio runtime.
pub async fn spawn(command: Command) -> io::Result<Child> {
    let gone = || io::Error::other("the VM spawner thread is gone");
    let (reply, child) = oneshot::channel();
    let request = SpawnRequest {
        command,
        runtime: tokio::runtime::Handle::current(),
        reply,
    };
    spawner()?.send(request).map_err(|_| gone())?;
    child.await.map_err(|_| gone())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn children_are_forked_by_the_spawner_thread_and_awaitable() {
        let mut command = Command::new("sh");
        command.args(["-c", "exit 7"]);
        let mut child = spawn(command).await.unwrap();
        assert_eq!(child.wait().await.unwrap().code(), Some(7));

        let missing = spawn(Command::new("/nonexistent/binary")).await;
        assert_eq!(missing.unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn the_spawner_outlives_short_lived_runtimes_and_threads() {
        for _ in 0..2 {
            std::thread::spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let child = spawn(Command::new("true")).await.unwrap();
                    assert!(child.wait_with_output().await.unwrap().status.success());
                });
            })
            .join()
            .unwrap();
        }
    }
}
