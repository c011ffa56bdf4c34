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
async fn a_failed_setup_undoes_the_ones_before_it() {
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
        ["setup disks", "setup net", "teardown disks"]
    );
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
