//! Runs the real agent (`spry-agent serve`) as root in a private mount and UTS namespace,
//! with a busybox rootfs, and talks to it with the generated client.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spry_proto::agent::*;
use spry_proto::agent_ttrpc::AgentClient;
use ttrpc::context;

pub struct Agent {
    pub client: AgentClient,
    pub dir: tempfile::TempDir,
    pub run_dir: PathBuf,
    pub cgroup_dir: PathBuf,
    child: Child,
}

/// Fails loudly when the tests cannot do their job.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests run containers and need root (run them as root, e.g. `sudo -E cargo test -p spry-agent --test host`)"
    );
    for tool in ["/bin/busybox", "/usr/bin/unshare"] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is required (apt-get install busybox-static util-linux)"
        );
    }
}

/// The cgroup v2 hierarchy on this host: /sys/fs/cgroup (unified) or /sys/fs/cgroup/unified
/// (hybrid).
fn cgroup2_root() -> PathBuf {
    for candidate in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if Path::new(candidate).join("cgroup.controllers").exists() {
            return candidate.into();
        }
    }
    panic!("no cgroup v2 hierarchy is mounted on this host");
}

/// Controllers the test cgroup can use.
pub fn available_controllers(cgroup_dir: &Path) -> String {
    std::fs::read_to_string(cgroup_dir.join("cgroup.controllers")).unwrap_or_default()
}

fn make_busybox_rootfs(root: &Path) {
    for dir in ["bin", "proc", "sys", "dev", "etc", "tmp", "root", "work"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
}

impl Agent {
    pub async fn start() -> Agent {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("spry-agent-test")
            .tempdir()
            .unwrap();
        let share = dir.path().join("share");
        make_busybox_rootfs(&share.join("busybox"));
        let run_dir = dir.path().join("run");
        let socket = dir.path().join("agent.sock");
        let cgroup_dir = cgroup2_root().join(format!(
            "spry-test-{}-{}",
            std::process::id(),
            dir.path().file_name().unwrap().to_string_lossy()
        ));
        std::fs::create_dir(&cgroup_dir).unwrap();
        // The agent sees the test cgroup as /sys/fs/cgroup, so libcontainer's cgroups (and
        // the controllers it enables) stay inside it.
        let script = format!(
            "mount --bind {cg} /sys/fs/cgroup && exec {agent} serve --listen unix://{sock} --shared-dir {share} --run-dir {run} --log debug",
            cg = cgroup_dir.display(),
            agent = env!("CARGO_BIN_EXE_spry-agent"),
            sock = socket.display(),
            share = share.display(),
            run = run_dir.display(),
        );
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let child = Command::new("/usr/bin/unshare")
            .args([
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "/bin/sh",
                "-c",
                &script,
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        // The socket file appears at bind, a moment before the agent listens on it: until
        // then a connection is refused, so try again until the deadline.
        let started = Instant::now();
        let address = format!("unix://{}", socket.display());
        let client = loop {
            let attempt = if socket.exists() {
                Some(ttrpc::r#async::Client::connect(&address).await)
            } else {
                None
            };
            match attempt {
                Some(Ok(client)) => break client,
                Some(Err(err)) if started.elapsed() >= Duration::from_secs(10) => {
                    panic!(
                        "cannot connect to the agent: {err:?}; log:\n{}",
                        read_log(dir.path())
                    )
                }
                None if started.elapsed() >= Duration::from_secs(10) => {
                    panic!("agent did not start; log:\n{}", read_log(dir.path()))
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let client = AgentClient::new(client);
        let mut check = CheckRequest::new();
        check.protocol_version = ProtocolVersion::PROTOCOL_VERSION_CURRENT as u32;
        client.check(ctx(), &check).await.unwrap();
        Agent {
            client,
            dir,
            run_dir,
            cgroup_dir,
            child,
        }
    }

    pub fn log(&self) -> String {
        read_log(self.dir.path())
    }

    /// The agent's pid (unshare and sh exec into it).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub async fn create_sandbox(&self) {
        let mut req = CreateSandboxRequest::new();
        req.sandbox_id = "pod-1".into();
        req.hostname = "pod-host".into();
        req.dns_nameservers = vec!["10.0.0.10".into()];
        req.dns_searches = vec!["default.svc.cluster.local".into()];
        req.entropy = vec![7u8; 64];
        self.client.create_sandbox(ctx(), &req).await.unwrap();
    }

    pub async fn create(
        &self,
        id: &str,
        spec: serde_json::Value,
        stdio: StdioConfig,
    ) -> ttrpc::Result<Empty> {
        self.create_with_files(id, spec, stdio, Vec::new()).await
    }

    /// `create` with CRI's small host files (/etc/hosts and the like) in the request.
    pub async fn create_with_files(
        &self,
        id: &str,
        spec: serde_json::Value,
        stdio: StdioConfig,
        files: Vec<GuestFile>,
    ) -> ttrpc::Result<Empty> {
        let mut req = CreateContainerRequest::new();
        req.files = files;
        req.container_id = id.into();
        req.oci_spec_json = serde_json::to_vec(&spec).unwrap();
        let mut layer = Storage::new();
        layer.set_shared_path("busybox".into());
        let mut rootfs = Rootfs::new();
        rootfs.layers.push(layer);
        rootfs.writable = true;
        req.rootfs = Some(rootfs).into();
        req.stdio = Some(stdio).into();
        self.client.create_container(ctx(), &req).await
    }

    pub async fn start_container(&self, id: &str) {
        self.client
            .start_container(ctx(), &container_req(id))
            .await
            .unwrap();
    }

    pub async fn read_all(&self, id: &str, exec_id: &str, stderr: bool) -> String {
        let mut out = Vec::new();
        loop {
            let mut req = ReadStreamRequest::new();
            req.process = Some(process_ref(id, exec_id)).into();
            req.max_bytes = 7; // small, to exercise chunking
            let reply = if stderr {
                self.client.read_stderr(ctx(), &req).await.unwrap()
            } else {
                self.client.read_stdout(ctx(), &req).await.unwrap()
            };
            if reply.eof {
                assert!(reply.data.is_empty());
                break;
            }
            assert!(!reply.data.is_empty(), "a read returns data or eof");
            out.extend(reply.data);
        }
        String::from_utf8(out).unwrap()
    }

    /// Reads stdout until `needle` shows up (for processes that keep running).
    pub async fn read_until(&self, id: &str, exec_id: &str, needle: &str) -> String {
        let mut out = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !out.contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in output {out:?}");
            let mut req = ReadStreamRequest::new();
            req.process = Some(process_ref(id, exec_id)).into();
            let reply = self.client.read_stdout(ctx(), &req).await.unwrap();
            assert!(!reply.eof, "stream ended before {needle:?}; got {out:?}");
            out.push_str(&String::from_utf8_lossy(&reply.data));
        }
        out
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> ExitStatus {
        self.client
            .wait_process(ctx(), &process_ref(id, exec_id))
            .await
            .unwrap()
    }

    pub async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> ttrpc::Result<Empty> {
        let mut req = SignalProcessRequest::new();
        req.process = Some(process_ref(id, exec_id)).into();
        req.signal = signal as u32;
        req.all = all;
        self.client.signal_process(ctx(), &req).await
    }

    pub async fn remove(&self, id: &str) -> ttrpc::Result<Empty> {
        self.client
            .remove_container(ctx(), &container_req(id))
            .await
    }

    pub async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) {
        let mut req = WriteStdinRequest::new();
        req.process = Some(process_ref(id, exec_id)).into();
        req.data = data.to_vec();
        let mut sent = 0;
        while sent < data.len() {
            req.data = data[sent..].to_vec();
            sent += self.client.write_stdin(ctx(), &req).await.unwrap().written as usize;
        }
    }

    /// Mounts the agent made that are still in place (seen from its mount namespace).
    pub fn agent_mounts(&self) -> Vec<String> {
        let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", self.child.id()))
            .unwrap_or_default();
        let run = self.run_dir.display().to_string();
        mountinfo
            .lines()
            .filter(|l| l.contains(&run))
            .map(str::to_string)
            .collect()
    }

    /// Asserts that nothing of the containers is left, shuts the agent down and removes the
    /// test cgroup.
    pub async fn finish(mut self) {
        assert_eq!(
            self.agent_mounts(),
            Vec::<String>::new(),
            "mounts left behind"
        );
        let leftovers: Vec<_> = std::fs::read_dir(self.run_dir.join("containers"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(
            leftovers.is_empty(),
            "container dirs left behind: {leftovers:?}"
        );
        let state: Vec<_> = std::fs::read_dir(self.run_dir.join("libcontainer"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(
            state.is_empty(),
            "libcontainer state left behind: {state:?}"
        );
        let cgroups: Vec<_> = std::fs::read_dir(self.cgroup_dir.join("spry"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        assert!(cgroups.is_empty(), "cgroups left behind: {cgroups:?}");
        let _ = self.client.shutdown(ctx(), &Empty::new()).await;
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "agent exited with {status}; log:\n{}",
                    self.log()
                );
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "agent did not exit after Shutdown"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        remove_cgroup_tree(&self.cgroup_dir);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // On a failed test: stop the agent and its containers, and drop the test cgroup.
        if self.child.try_wait().ok().flatten().is_none() {
            for pid in cgroup_pids(&self.cgroup_dir) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            std::thread::sleep(Duration::from_millis(200));
            eprintln!("agent log:\n{}", self.log());
        }
        remove_cgroup_tree(&self.cgroup_dir);
    }
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                pids.extend(cgroup_pids(&entry.path()));
            }
        }
    }
    pids
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

pub fn ctx() -> context::Context {
    context::with_timeout(0)
}

pub fn container_req(id: &str) -> ContainerRequest {
    let mut req = ContainerRequest::new();
    req.container_id = id.into();
    req
}

pub fn process_ref(id: &str, exec_id: &str) -> ProcessRef {
    let mut r = ProcessRef::new();
    r.container_id = id.into();
    r.exec_id = exec_id.into();
    r
}

pub fn stdio(terminal: bool, stdin: bool) -> StdioConfig {
    let mut s = StdioConfig::new();
    s.terminal = terminal;
    s.stdin = stdin;
    s.rows = 40;
    s.cols = 100;
    s
}

pub fn process_json(args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {
            "bounding": caps(), "effective": caps(), "permitted": caps()
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true
    })
}

fn caps() -> Vec<&'static str> {
    vec![
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ]
}

/// A config.json like `runc spec` (and containerd) produce.
pub fn spec(args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": process_json(args),
        "root": {"path": "ignored-by-the-agent"},
        "hostname": "spec-host",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-host-only"}
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}
