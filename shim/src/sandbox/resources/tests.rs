use std::sync::Mutex;

use super::*;
use crate::vm::test_vm::TestVm;

type Log = Arc<Mutex<Vec<String>>>;

struct Step {
    name: &'static str,
    fail_setup: bool,
    fail_teardown: bool,
    log: Log,
}

fn step(name: &'static str, log: &Log) -> Arc<dyn PodResource> {
    Arc::new(Step {
        name,
        fail_setup: false,
        fail_teardown: false,
        log: Arc::clone(log),
    })
}

fn failure() -> ResourceError {
    RootfsError::NotADirectory {
        path: "/nowhere".into(),
    }
    .into()
}

#[async_trait]
impl PodResource for Step {
    fn name(&self) -> &'static str {
        self.name
    }
    async fn setup(&self, _vm: &dyn Vm) -> Result<(), ResourceError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("setup {}", self.name));
        if self.fail_setup {
            return Err(failure());
        }
        Ok(())
    }
    async fn teardown(&self, _vm: &dyn Vm) -> Result<(), ResourceError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("teardown {}", self.name));
        if self.fail_teardown {
            return Err(failure());
        }
        Ok(())
    }
}

#[tokio::test]
async fn resources_set_up_in_order_and_tear_down_once_in_reverse() {
    let log = Log::default();
    let resources = PodResources::new(vec![
        step("disks", &log),
        step("net", &log),
        step("cgroup", &log),
    ]);
    resources.setup(&TestVm::default()).await.unwrap();
    resources.teardown(&TestVm::default()).await;
    resources.teardown(&TestVm::default()).await;
    assert_eq!(
        *log.lock().unwrap(),
        [
            "setup disks",
            "setup net",
            "setup cgroup",
            "teardown cgroup",
            "teardown net",
            "teardown disks"
        ]
    );
}

#[tokio::test]
async fn a_failed_setup_undoes_every_other_one() {
    let log = Log::default();
    let broken = Arc::new(Step {
        name: "net",
        fail_setup: true,
        fail_teardown: false,
        log: Arc::clone(&log),
    });
    let resources = PodResources::new(vec![step("disks", &log), broken, step("cgroup", &log)]);
    assert!(resources.setup(&TestVm::default()).await.is_err());
    resources.teardown(&TestVm::default()).await;
    assert_eq!(
        *log.lock().unwrap(),
        [
            "setup disks",
            "setup net",
            "setup cgroup",
            "teardown cgroup",
            "teardown disks"
        ]
    );
}

/// Waits in its setup until `peers` setups have started.
struct Meeting(Arc<tokio::sync::Barrier>);

#[async_trait]
impl PodResource for Meeting {
    fn name(&self) -> &'static str {
        "meeting"
    }
    async fn setup(&self, _vm: &dyn Vm) -> Result<(), ResourceError> {
        self.0.wait().await;
        Ok(())
    }
    async fn teardown(&self, _vm: &dyn Vm) -> Result<(), ResourceError> {
        Ok(())
    }
}

#[tokio::test]
async fn setups_run_at_the_same_time() {
    let barrier = Arc::new(tokio::sync::Barrier::new(3));
    let items: Vec<Arc<dyn PodResource>> = (0..3)
        .map(|_| Arc::new(Meeting(Arc::clone(&barrier))) as Arc<dyn PodResource>)
        .collect();
    let resources = PodResources::new(items);
    // One after another, the first would wait forever for the other two.
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        resources.setup(&TestVm::default()),
    )
    .await
    .expect("setups ran one after another")
    .unwrap();
}

#[tokio::test]
async fn a_failed_teardown_does_not_stop_the_others() {
    let log = Log::default();
    let stuck = Arc::new(Step {
        name: "net",
        fail_setup: false,
        fail_teardown: true,
        log: Arc::clone(&log),
    });
    let resources = PodResources::new(vec![step("disks", &log), stuck]);
    resources.setup(&TestVm::default()).await.unwrap();
    resources.teardown(&TestVm::default()).await;
    assert_eq!(
        *log.lock().unwrap(),
        ["setup disks", "setup net", "teardown net", "teardown disks"]
    );
}
