//! What the sandbox gets ready for its next container while the VM idles (today: the
//! empty disk for its writable layer, `rootfs/next_writable.rs`).
//!
//! Not right away: a container just started is at its most latency-bound (its first exec
//! pages in and, under TCG, translates its program), and the guest's probe of a new disk
//! would take the one vCPU from it. A container's create (the guest busy until its start,
//! which schedules anew), a later start, or the sandbox's end calls it off.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::resources::RootfsDisks;
use crate::vm::Vm;

/// How long the VM is left alone after a container's start first.
pub const IDLE_BEFORE_PREPARING: Duration = Duration::from_millis(100);

/// Schedules the preparation; only the latest scheduled one runs.
#[derive(Debug, Default)]
pub struct IdlePreparation {
    generation: Arc<AtomicU64>,
}

impl IdlePreparation {
    /// Prepares `rootfs`'s next disks in `vm` after [`IDLE_BEFORE_PREPARING`], unless
    /// something is scheduled or cancelled meanwhile.
    pub fn schedule(&self, vm: Arc<dyn Vm>, rootfs: Arc<RootfsDisks>) {
        let generation = Arc::clone(&self.generation);
        let mine = generation.fetch_add(1, Ordering::SeqCst) + 1;
        let prepare = async move {
            tokio::time::sleep(IDLE_BEFORE_PREPARING).await;
            if generation.load(Ordering::SeqCst) == mine && vm.is_running() {
                rootfs.prepare_next(vm.as_ref()).await;
            }
        };
        tokio::spawn(prepare.in_current_span());
    }

    /// Nothing scheduled so far runs.
    pub fn cancel(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::ErofsBlockShare;
    use crate::vm::test_vm::TestVm;

    fn empty_disks(vm: &TestVm) -> usize {
        let plugged = vm.plugged.lock().unwrap();
        plugged
            .iter()
            .filter(|p| p.1.as_os_str().is_empty())
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_latest_schedule_runs_and_only_after_the_idle_time() {
        let dir = tempfile::tempdir().unwrap();
        let vm = Arc::new(TestVm::default());
        let rootfs = Arc::new(RootfsDisks::new(Box::new(ErofsBlockShare::new(dir.path()))));
        let prep = IdlePreparation::default();
        prep.schedule(vm.clone(), rootfs.clone());
        tokio::time::sleep(IDLE_BEFORE_PREPARING / 2).await;
        // A container started meanwhile: the VM is busy again, the wait starts over.
        prep.schedule(vm.clone(), rootfs.clone());
        tokio::time::sleep(IDLE_BEFORE_PREPARING * 3 / 4).await;
        assert_eq!(empty_disks(&vm), 0, "prepared before the VM idled");
        tokio::time::sleep(IDLE_BEFORE_PREPARING).await;
        assert_eq!(empty_disks(&vm), 1);

        // The sandbox's end: nothing scheduled runs (a fresh VM, which has no empty disk).
        let vm = Arc::new(TestVm::default());
        let rootfs = Arc::new(RootfsDisks::new(Box::new(ErofsBlockShare::new(dir.path()))));
        prep.schedule(vm.clone(), rootfs.clone());
        prep.cancel();
        tokio::time::sleep(IDLE_BEFORE_PREPARING * 2).await;
        assert_eq!(empty_disks(&vm), 0, "ran after cancel");
    }
}
