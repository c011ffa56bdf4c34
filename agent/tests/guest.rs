//! The agent as PID 1 of a real VM (QEMU; TCG works): init, module loading, the virtio-serial
//! channel, SCSI disk rootfs (erofs + overlay), cgroup v2 limits and OOM reporting, Shutdown.
//!
//! Part of the test command (boots a VM, ~1 min under TCG). It boots the guest that
//! `scripts/build-guest.sh` built (kernel + initramfs with the static agent as /init):
//! `SPRY_GUEST_KERNEL` / `SPRY_GUEST_INITRAMFS` name the files, else `SPRY_GUEST_DIR`
//! (set by scripts/test.sh), else `build/guest/current` of this checkout.
//! Needs root, qemu-system-x86_64 and mkfs.erofs; fails loudly without them.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{container_req, ctx, process_ref, spec, stdio};
use spry_proto::agent::*;
use spry_proto::agent_ttrpc::AgentClient;
use spry_shim::vm::{
    AccelChoice, AgentEndpoint, Hypervisor, QemuHypervisor, ScsiAddr, Vm, VmConfig,
};

/// `name` from the environment, else `file` of the built guest (see the header).
fn guest_file(name: &str, file: &str) -> PathBuf {
    let path = std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("SPRY_GUEST_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest/current")
                })
                .join(file)
        });
    assert!(
        path.exists(),
        "{} does not exist: run scripts/build-guest.sh (or set {name})",
        path.display()
    );
    path
}

struct Guest {
    vm: Box<dyn Vm>,
    /// Where the rootfs disk sits on the guest's SCSI bus.
    rootfs: ScsiAddr,
    client: AgentClient,
    _dir: tempfile::TempDir,
}

impl Guest {
    fn console(&self) -> String {
        std::fs::read_to_string(self.vm.console_log()).unwrap_or_default()
    }

    async fn boot(rootfs_image: &Path) -> Guest {
        harness::require_root();
        let kernel = guest_file("SPRY_GUEST_KERNEL", "vmlinux");
        let initramfs = guest_file("SPRY_GUEST_INITRAMFS", "initramfs.img");
        let dir = tempfile::Builder::new()
            .prefix("spry-guest-")
            .tempdir_in("/tmp")
            .unwrap();
        // The shim's own hypervisor layer: the guest boots on the machine pods get, jailed
        // the same way, and gets its rootfs disk hot-plugged as a pod's are.
        let config = VmConfig {
            id: "agent-guest-test".into(),
            state_dir: dir.path().join("vm"),
            kernel,
            initramfs,
            memory_mib: 512,
            accel: AccelChoice::Tcg,
            extra_cmdline: vec!["spry.log=info".into()],
            ..Default::default()
        };
        let vm = QemuHypervisor::new(dir.path())
            .start(config)
            .await
            .expect("QEMU must start");
        let rootfs = vm
            .hotplug_disk(rootfs_image, true)
            .await
            .expect("the rootfs disk must plug");
        let AgentEndpoint::VirtioSerial {
            socket: agent_socket,
        } = vm.agent_endpoint()
        else {
            panic!("the test guest talks virtio-serial")
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let client = loop {
            assert!(Instant::now() < deadline, "no agent socket");
            if agent_socket.exists() {
                if let Ok(client) =
                    ttrpc::r#async::Client::connect(&format!("unix://{}", agent_socket.display()))
                        .await
                {
                    break AgentClient::new(client);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let guest = Guest {
            vm,
            rootfs,
            client,
            _dir: dir,
        };
        let mut check = CheckRequest::new();
        check.protocol_version = ProtocolVersion::PROTOCOL_VERSION_CURRENT as u32;
        // The agent answers once it is up; the first calls may time out while the VM boots.
        loop {
            let timed = ttrpc::context::with_timeout(Duration::from_secs(5).as_nanos() as i64);
            match guest.client.check(timed, &check).await {
                Ok(reply) => {
                    assert!(!reply.kernel_release.is_empty());
                    break;
                }
                Err(err) => assert!(
                    Instant::now() < deadline,
                    "agent did not answer: {err:?}\n{}",
                    guest.console()
                ),
            }
        }
        guest
    }

    async fn create(&self, id: &str, spec: serde_json::Value) {
        let mut req = CreateContainerRequest::new();
        req.container_id = id.into();
        req.oci_spec_json = serde_json::to_vec(&spec).unwrap();
        let mut disk = ScsiDisk::new();
        disk.target = self.rootfs.target;
        disk.lun = self.rootfs.lun;
        let mut layer = Storage::new();
        layer.set_scsi(disk);
        layer.fstype = "erofs".into();
        let mut rootfs = Rootfs::new();
        rootfs.layers.push(layer);
        rootfs.writable = true;
        req.rootfs = Some(rootfs).into();
        req.stdio = Some(stdio(false, false)).into();
        if let Err(err) = self.client.create_container(ctx(), &req).await {
            panic!("create {id}: {err:?}\n{}", self.console());
        }
    }

    async fn stdout(&self, id: &str) -> String {
        let mut out = Vec::new();
        loop {
            let mut req = ReadStreamRequest::new();
            req.process = Some(process_ref(id, "")).into();
            let reply = self.client.read_stdout(ctx(), &req).await.unwrap();
            if reply.eof {
                return String::from_utf8(out).unwrap();
            }
            out.extend(reply.data);
        }
    }
}

fn busybox_erofs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for sub in ["bin", "proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "echo", "cat", "hostname", "sleep", "head", "true"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let image = dir.join("rootfs.erofs");
    let status = Command::new("mkfs.erofs")
        .arg(&image)
        .arg(&root)
        .stdout(Stdio::null())
        .status()
        .expect("mkfs.erofs is required (apt-get install erofs-utils)");
    assert!(status.success());
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_containers_as_pid1_of_a_vm() {
    let images = tempfile::tempdir().unwrap();
    let image = busybox_erofs(images.path());
    let started = Instant::now();
    let mut guest = Guest::boot(&image).await;
    eprintln!("boot to first Check: {:?}", started.elapsed());
    let console = guest.console();
    assert!(!console.contains("module not loaded"), "{console}");

    let mut sandbox = CreateSandboxRequest::new();
    sandbox.sandbox_id = "pod-vm".into();
    sandbox.hostname = "vm-pod".into();
    sandbox.entropy = vec![42u8; 32];
    sandbox.clock_unix_nanos = harness_now();
    sandbox.dns_nameservers = vec!["10.96.0.10".into()];
    guest.client.create_sandbox(ctx(), &sandbox).await.unwrap();

    let mut spec1 = spec(&[
        "sh",
        "-c",
        "echo pid=$$ $(hostname); cat /etc/resolv.conf; echo x > /written; cat /written; exit 7",
    ]);
    spec1["process"]["cwd"] = serde_json::json!("/");
    let started = Instant::now();
    guest.create("c1", spec1).await;
    guest
        .client
        .start_container(ctx(), &container_req("c1"))
        .await
        .unwrap();
    assert_eq!(
        guest.stdout("c1").await,
        "pid=1 spec-host\nnameserver 10.96.0.10\nx\n"
    );
    let status = guest
        .client
        .wait_process(ctx(), &process_ref("c1", ""))
        .await
        .unwrap();
    assert_eq!(status.exit_code, 7);
    eprintln!(
        "create + start + output + exit (SCSI erofs + overlay): {:?}",
        started.elapsed()
    );
    guest
        .client
        .remove_container(ctx(), &container_req("c1"))
        .await
        .unwrap();

    // A memory limit is enforced and the OOM kill is reported both ways.
    let mut spec2 = spec(&[
        "sh",
        "-c",
        "echo start; x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done",
    ]);
    spec2["linux"]["resources"] =
        serde_json::json!({"memory": {"limit": 32 * 1024 * 1024, "swap": 32 * 1024 * 1024}});
    guest.create("oom", spec2).await;
    let oom_event = tokio::spawn({
        let client = guest.client.clone();
        async move { client.get_oom_event(ctx(), &Empty::new()).await }
    });
    guest
        .client
        .start_container(ctx(), &container_req("oom"))
        .await
        .unwrap();
    let status = guest
        .client
        .wait_process(ctx(), &process_ref("oom", ""))
        .await
        .unwrap();
    assert_eq!(
        (status.exit_code, status.oom_killed),
        (137, true),
        "{}",
        guest.console()
    );
    let event = tokio::time::timeout(Duration::from_secs(5), oom_event)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.container_id, "oom");
    let stats = guest
        .client
        .stats_container(ctx(), &container_req("oom"))
        .await
        .unwrap();
    assert_eq!(stats.memory_limit_bytes, 32 * 1024 * 1024);
    assert!(stats.oom_kills >= 1);
    guest
        .client
        .remove_container(ctx(), &container_req("oom"))
        .await
        .unwrap();

    // Limits can change while it runs; exec and signals work in the VM too.
    guest.create("upd", spec(&["sleep", "1000"])).await;
    guest
        .client
        .start_container(ctx(), &container_req("upd"))
        .await
        .unwrap();
    let mut update = UpdateContainerRequest::new();
    update.container_id = "upd".into();
    update.resources_json = serde_json::to_vec(&serde_json::json!({
        "memory": {"limit": 64 * 1024 * 1024}, "pids": {"limit": 50}
    }))
    .unwrap();
    guest.client.update_container(ctx(), &update).await.unwrap();
    let stats = guest
        .client
        .stats_container(ctx(), &container_req("upd"))
        .await
        .unwrap();
    assert_eq!(
        (stats.memory_limit_bytes, stats.pids_limit),
        (64 * 1024 * 1024, 50)
    );
    assert!(
        stats.pids_current >= 1 && stats.memory_usage_bytes > 0,
        "{stats:?}"
    );
    let pids = guest
        .client
        .list_processes(ctx(), &container_req("upd"))
        .await
        .unwrap()
        .pids;
    assert_eq!(pids.len(), 1, "{pids:?}");
    let mut exec = ExecProcessRequest::new();
    exec.process = Some(process_ref("upd", "e1")).into();
    exec.oci_process_json = serde_json::to_vec(&harness::process_json(&[
        "sh",
        "-c",
        "echo in-vm $(cat /proc/1/cmdline | head -c 5)",
    ]))
    .unwrap();
    exec.stdio = Some(stdio(false, false)).into();
    guest.client.exec_process(ctx(), &exec).await.unwrap();
    let mut out = Vec::new();
    loop {
        let mut req = ReadStreamRequest::new();
        req.process = Some(process_ref("upd", "e1")).into();
        let reply = guest.client.read_stdout(ctx(), &req).await.unwrap();
        if reply.eof {
            break;
        }
        out.extend(reply.data);
    }
    assert_eq!(String::from_utf8(out).unwrap(), "in-vm sleep\n");
    assert_eq!(
        guest
            .client
            .wait_process(ctx(), &process_ref("upd", "e1"))
            .await
            .unwrap()
            .exit_code,
        0
    );
    let mut kill = SignalProcessRequest::new();
    kill.process = Some(process_ref("upd", "")).into();
    kill.signal = 9;
    kill.all = true;
    guest.client.signal_process(ctx(), &kill).await.unwrap();
    let status = guest
        .client
        .wait_process(ctx(), &process_ref("upd", ""))
        .await
        .unwrap();
    assert_eq!((status.exit_code, status.oom_killed), (137, false));
    guest
        .client
        .remove_container(ctx(), &container_req("upd"))
        .await
        .unwrap();

    // The host side can go away and come back (a restarted shim): the agent takes the new
    // connection on the same port.
    let AgentEndpoint::VirtioSerial { socket } = guest.vm.agent_endpoint() else {
        panic!("the test guest talks virtio-serial")
    };
    let address = format!("unix://{}", socket.display());
    let mut check = CheckRequest::new();
    check.protocol_version = ProtocolVersion::PROTOCOL_VERSION_CURRENT as u32;
    let reconnect = Instant::now();
    loop {
        // Dropping the old client closes its connection to QEMU's chardev.
        guest.client = AgentClient::new(ttrpc::r#async::Client::connect(&address).await.unwrap());
        let timed = ttrpc::context::with_timeout(Duration::from_secs(2).as_nanos() as i64);
        match guest.client.check(timed, &check).await {
            Ok(_) => break,
            Err(err) => assert!(
                reconnect.elapsed() < Duration::from_secs(30),
                "no answer after reconnecting: {err:?}\n{}",
                guest.console()
            ),
        }
    }
    eprintln!("reconnected in {:?}", reconnect.elapsed());

    // Shutdown powers the VM off: QEMU exits.
    let _ = guest.client.shutdown(ctx(), &Empty::new()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(exit) = guest.vm.exit_watch().borrow().clone() {
            assert_eq!(exit.code, Some(0), "QEMU exited with {exit}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the VM did not power off:\n{}",
            guest.console()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn harness_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

impl Drop for Guest {
    fn drop(&mut self) {
        // Dropping the VM kills QEMU; the console says what the guest was doing.
        if self.vm.is_running() {
            eprintln!("guest console:\n{}", self.console());
        }
    }
}
