//! The real agent on the host, as root: containers on a busybox rootfs through the ttrpc API.
//! Run: `cargo test -p spry-agent --test host` (as root).

mod harness;

use harness::*;
use spry_proto::agent::*;
use ttrpc::Code;

fn code(result: ttrpc::Result<Empty>) -> (Code, String) {
    match result {
        Err(ttrpc::Error::RpcStatus(status)) => (status.code(), status.message().to_string()),
        other => panic!("expected an error status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_a_container_and_reports_output_and_exit_code() {
    let agent = Agent::start().await;
    // A container that needs the pod (here CRI's /etc/hosts) needs the sandbox first.
    let hosts = GuestFile {
        destination: "/etc/hosts".into(),
        content: b"127.0.0.1 localhost\n".to_vec(),
        ..Default::default()
    };
    let (c, _) = code(
        agent
            .create_with_files("early", spec(&["true"]), stdio(false, false), vec![hosts])
            .await,
    );
    assert_eq!(c, Code::UNAVAILABLE);
    // One that asks nothing of a pod may run before (the warm pool's warm-up).
    agent
        .create("warm-up", spec(&["true"]), stdio(false, false))
        .await
        .unwrap();
    agent.start_container("warm-up").await;
    assert_eq!(agent.wait("warm-up", "").await.exit_code, 0);
    agent.remove("warm-up").await.unwrap();
    agent.create_sandbox().await;

    agent
        .create(
            "c1",
            spec(&["sh", "-c", "echo hi; echo oops >&2; exit 3"]),
            stdio(false, false),
        )
        .await
        .unwrap();
    agent.start_container("c1").await;
    assert_eq!(agent.read_all("c1", "", false).await, "hi\n");
    assert_eq!(agent.read_all("c1", "", true).await, "oops\n");
    let status = agent.wait("c1", "").await;
    assert_eq!(
        (status.exit_code, status.signal, status.oom_killed),
        (3, 0, false)
    );
    assert!(status.exited_at_unix_nanos > 0);
    // A second wait returns the same status.
    assert_eq!(agent.wait("c1", "").await.exit_code, 3);
    agent.remove("c1").await.unwrap();
    let (c, _) = code(agent.remove("c1").await);
    assert_eq!(c, Code::NOT_FOUND);
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_sees_its_namespaces_hostname_env_cwd_and_dns() {
    let agent = Agent::start().await;
    agent.create_sandbox().await;
    let mut spec = spec(&["sh", "-c", "echo pid=$$; hostname; echo foo=$FOO; pwd; cat /etc/resolv.conf; id -u; grep NoNewPrivs /proc/self/status; ignored=$(grep SigIgn /proc/self/status | cut -f2); echo ignored-standard-signals=$(( 0x$ignored & 0x7fffffff ))"]);
    spec["process"]["env"] = serde_json::json!(["PATH=/bin", "FOO=bar baz"]);
    spec["process"]["cwd"] = serde_json::json!("/work");
    agent.create("c2", spec, stdio(false, false)).await.unwrap();
    agent.start_container("c2").await;
    let out = agent.read_all("c2", "", false).await;
    assert_eq!(
        out,
        "pid=1\nspec-host\nfoo=bar baz\n/work\nnameserver 10.0.0.10\nsearch default.svc.cluster.local\n0\nNoNewPrivs:\t1\nignored-standard-signals=0\n"
    );
    assert_eq!(agent.wait("c2", "").await.exit_code, 0);
    agent.remove("c2").await.unwrap();
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_exec_signals_and_states() {
    let agent = Agent::start().await;
    agent.create_sandbox().await;
    agent
        .create(
            "c3",
            spec(&["sh", "-c", "read line; echo got:$line; exec sleep 1000"]),
            stdio(false, true),
        )
        .await
        .unwrap();
    // Created but not started: it cannot be removed.
    let (c, _) = code(agent.remove("c3").await);
    assert_eq!(c, Code::FAILED_PRECONDITION);
    agent.start_container("c3").await;
    agent.write_stdin("c3", "", b"hello world\n").await;
    let mut close = ProcessRef::new();
    close.container_id = "c3".into();
    agent.client.close_stdin(ctx(), &close).await.unwrap();
    agent.read_until("c3", "", "got:hello world\n").await;

    // An exec: its own stdio and exit code.
    let exec = |args: &[&str]| {
        let mut req = ExecProcessRequest::new();
        req.oci_process_json = serde_json::to_vec(&process_json(args)).unwrap();
        req.stdio = Some(stdio(false, false)).into();
        req
    };
    let mut req = exec(&[
        "sh",
        "-c",
        "echo exec-out; echo sleep-pid=$(pidof sleep); exit 5",
    ]);
    req.process = Some(process_ref("c3", "e1")).into();
    agent.client.exec_process(ctx(), &req).await.unwrap();
    assert_eq!(
        agent.read_all("c3", "e1", false).await,
        "exec-out\nsleep-pid=1\n"
    );
    assert_eq!(agent.wait("c3", "e1").await.exit_code, 5);
    let (c, _) = code(agent.client.exec_process(ctx(), &req).await);
    assert_eq!(c, Code::ALREADY_EXISTS);

    // SIGTERM to a process without a handler (not the namespace's init): 128 + 15.
    let mut req = exec(&["sleep", "1000"]);
    req.process = Some(process_ref("c3", "sleeper")).into();
    agent.client.exec_process(ctx(), &req).await.unwrap();
    let pids = agent
        .client
        .list_processes(ctx(), &container_req("c3"))
        .await
        .unwrap()
        .pids;
    assert_eq!(pids.len(), 2, "init and the sleeper: {pids:?}");
    agent
        .signal("c3", "sleeper", libc::SIGTERM, false)
        .await
        .unwrap();
    let status = agent.wait("c3", "sleeper").await;
    assert_eq!((status.exit_code, status.signal), (143, 15));
    let (c, _) = code(agent.signal("c3", "sleeper", libc::SIGTERM, false).await);
    assert_eq!(c, Code::NOT_FOUND, "signalling an exited process");

    // A missing binary or cwd is refused up front, naming the problem.
    let mut req = exec(&["no-such-binary"]);
    req.process = Some(process_ref("c3", "bad")).into();
    let (c, message) = code(agent.client.exec_process(ctx(), &req).await);
    assert_eq!(c, Code::INVALID_ARGUMENT);
    assert!(message.contains("no-such-binary"), "{message}");

    let stats = agent
        .client
        .stats_container(ctx(), &container_req("c3"))
        .await
        .unwrap();
    assert!(stats.timestamp_nanos > 0);

    // Running: cannot be removed. SIGKILL to all, then it can.
    let (c, _) = code(agent.remove("c3").await);
    assert_eq!(c, Code::FAILED_PRECONDITION);
    agent.signal("c3", "", libc::SIGKILL, true).await.unwrap();
    let status = agent.wait("c3", "").await;
    assert_eq!((status.exit_code, status.signal), (137, 9));
    agent.remove("c3").await.unwrap();
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_has_a_size_that_can_change() {
    let agent = Agent::start().await;
    agent.create_sandbox().await;
    agent
        .create(
            "tty",
            spec(&["sh", "-c", "tty; stty size; read x; stty size"]),
            stdio(true, true),
        )
        .await
        .unwrap();
    agent.start_container("tty").await;
    let out = agent.read_until("tty", "", "40 100").await;
    assert!(out.contains("/dev/pts/0"), "{out:?}");
    let mut resize = ResizeTtyRequest::new();
    resize.process = Some(process_ref("tty", "")).into();
    resize.rows = 50;
    resize.cols = 120;
    agent.client.resize_tty(ctx(), &resize).await.unwrap();
    agent.write_stdin("tty", "", b"\n").await;
    let out = agent.read_all("tty", "", false).await;
    assert!(out.contains("50 120"), "{out:?}");
    assert_eq!(agent.wait("tty", "").await.exit_code, 0);
    // A terminal has no separate stderr.
    assert_eq!(agent.read_all("tty", "", true).await, "");
    agent.remove("tty").await.unwrap();
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_warm_up_is_refused_once_the_pod_owns_the_network() {
    let agent = Agent::start().await;
    // On a host the NICs are not the agent's: a warm-up before the pod changes nothing.
    agent
        .client
        .warm_network(ctx(), &Empty::new())
        .await
        .unwrap();
    agent.create_sandbox().await;
    let (c, message) = code(agent.client.warm_network(ctx(), &Empty::new()).await);
    assert_eq!(c, Code::FAILED_PRECONDITION);
    assert!(message.contains("sandbox exists"), "{message}");
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_leave_nothing_behind() {
    let agent = Agent::start().await;
    agent.create_sandbox().await;
    let mut bad_ns = spec(&["true"]);
    bad_ns["linux"]["namespaces"] = serde_json::json!([{"type": "bogus"}]);
    let (c, message) = code(agent.create("b1", bad_ns, stdio(false, false)).await);
    assert_eq!(c, Code::INVALID_ARGUMENT);
    assert!(message.contains("bogus"), "{message}");

    let (c, message) = code(
        agent
            .create("b2", spec(&["/bin/nope"]), stdio(false, false))
            .await,
    );
    assert_eq!(c, Code::INVALID_ARGUMENT);
    assert!(message.contains("/bin/nope"), "{message}");

    let mut bad_cwd = spec(&["true"]);
    bad_cwd["process"]["cwd"] = serde_json::json!("/does/not/exist");
    let (c, message) = code(agent.create("b3", bad_cwd, stdio(false, false)).await);
    assert_eq!(c, Code::INVALID_ARGUMENT);
    assert!(message.contains("/does/not/exist"), "{message}");

    let (c, _) = code(
        agent
            .create("../evil", spec(&["true"]), stdio(false, false))
            .await,
    );
    assert_eq!(c, Code::INVALID_ARGUMENT);

    agent
        .create("dup", spec(&["true"]), stdio(false, false))
        .await
        .unwrap();
    let (c, _) = code(
        agent
            .create("dup", spec(&["true"]), stdio(false, false))
            .await,
    );
    assert_eq!(c, Code::ALREADY_EXISTS);
    let (c, _) = code(
        agent
            .client
            .start_container(ctx(), &container_req("nope"))
            .await,
    );
    assert_eq!(c, Code::NOT_FOUND);

    // DestroySandbox kills and removes whatever is left.
    agent
        .client
        .destroy_sandbox(ctx(), &Empty::new())
        .await
        .unwrap();
    let (c, _) = code(agent.remove("dup").await);
    assert_eq!(c, Code::NOT_FOUND);
    agent.finish().await;
}

/// Needs the cgroup v2 memory controller. The guest VM has it; a host whose memory
/// controller is bound to cgroup v1 does not, so this is opt-in: `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the cgroup v2 memory controller (run in the guest or on a cgroup v2 host)"]
async fn a_memory_limit_is_enforced_and_the_oom_kill_reported() {
    let agent = Agent::start().await;
    assert!(
        available_controllers(&agent.cgroup_dir).contains("memory"),
        "the cgroup v2 memory controller is not available here"
    );
    agent.create_sandbox().await;
    let mut spec = spec(&["sh", "-c", "echo start; x=a; while true; do x=$x$x; done"]);
    spec["linux"]["resources"] =
        serde_json::json!({"memory": {"limit": 16 * 1024 * 1024, "swap": 16 * 1024 * 1024}});
    agent
        .create("oom", spec, stdio(false, false))
        .await
        .unwrap();
    let oom = tokio::spawn({
        let client = agent.client.clone();
        async move { client.get_oom_event(ctx(), &Empty::new()).await }
    });
    agent.start_container("oom").await;
    let status = agent.wait("oom", "").await;
    assert_eq!((status.exit_code, status.oom_killed), (137, true));
    assert_eq!(oom.await.unwrap().unwrap().container_id, "oom");
    let stats = agent
        .client
        .stats_container(ctx(), &container_req("oom"))
        .await
        .unwrap();
    assert_eq!(stats.memory_limit_bytes, 16 * 1024 * 1024);
    assert!(stats.oom_kills >= 1);
    agent.remove("oom").await.unwrap();
    agent.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seccomp_rlimits_and_capabilities_come_from_the_spec() {
    let agent = Agent::start().await;
    agent.create_sandbox().await;
    let mut spec = spec(&[
        "sh",
        "-c",
        "ulimit -n; mkdir /blocked 2>&1; grep CapBnd /proc/self/status; echo end",
    ]);
    spec["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    spec["process"]["rlimits"] =
        serde_json::json!([{"type": "RLIMIT_NOFILE", "hard": 321, "soft": 123}]);
    spec["process"]["capabilities"] = serde_json::json!({
        "bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]
    });
    agent
        .create("sec", spec, stdio(false, false))
        .await
        .unwrap();
    agent.start_container("sec").await;
    let out = agent.read_all("sec", "", false).await;
    // CAP_KILL is capability 5: bit 0x20.
    assert_eq!(
        out,
        "123\nmkdir: can't create directory '/blocked': Operation not permitted\nCapBnd:\t0000000000000020\nend\n"
    );
    assert_eq!(agent.wait("sec", "").await.exit_code, 0);
    agent.remove("sec").await.unwrap();
    agent.finish().await;
}

/// Idle container helpers the agent keeps ready: (pid, nice value).
fn spare_helpers(agent_pid: i32) -> Vec<(i32, i64)> {
    // Children are listed per thread that started them.
    let mut children = String::new();
    for task in std::fs::read_dir(format!("/proc/{agent_pid}/task"))
        .unwrap()
        .flatten()
    {
        children += &std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        children.push(' ');
    }
    let mut helpers = Vec::new();
    for pid in children
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains("container-helper") {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the parenthesised name; nice is field 19 of the whole line.
        let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        if let Some(nice) = after_name
            .split_whitespace()
            .nth(16)
            .and_then(|n| n.parse().ok())
        {
            helpers.push((pid, nice));
        }
    }
    helpers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spare_helpers_are_refilled_at_idle_priority_and_containers_do_not_inherit_it() {
    let agent = Agent::start().await;
    agent.create_sandbox().await;
    assert_eq!(
        spare_helpers(agent.pid()).len(),
        2,
        "two spare helpers after start-up"
    );
    let nice_of_container = "cut -d' ' -f19 /proc/self/stat";
    for round in 0..3 {
        let id = format!("n{round}");
        agent
            .create(
                &id,
                spec(&["sh", "-c", nice_of_container]),
                stdio(false, false),
            )
            .await
            .unwrap();
        agent.start_container(&id).await;
        assert_eq!(agent.read_all(&id, "", false).await, "0\n", "round {round}");
        assert_eq!(agent.wait(&id, "").await.exit_code, 0);
        agent.remove(&id).await.unwrap();
        // Refills run at nice 19 and are quick on the host. The listing also shows helpers
        // still serving or leaving (at nice 0) for a moment, so wait for the settled state
        // rather than the first moment two helpers are seen.
        let started = std::time::Instant::now();
        let spares = loop {
            let spares = spare_helpers(agent.pid());
            let settled = spares.len() == 2 && spares.iter().any(|(_, nice)| *nice == 19);
            if settled || started.elapsed() > std::time::Duration::from_secs(10) {
                break spares;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(spares.len(), 2, "spares refilled after round {round}");
        // (A spare started at boot, at normal priority, may still be among them.)
        assert!(
            spares.iter().any(|(_, nice)| *nice == 19),
            "refilled spares run at idle priority: {spares:?}"
        );
    }
    // Spares that died are replaced by a fresh helper, not reported as a failure.
    for (pid, _) in spare_helpers(agent.pid()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    agent
        .create("after-kill", spec(&["true"]), stdio(false, false))
        .await
        .unwrap();
    agent.start_container("after-kill").await;
    assert_eq!(agent.wait("after-kill", "").await.exit_code, 0);
    agent.remove("after-kill").await.unwrap();
    agent.finish().await;
}

/// A hostile image puts symlinks where the spec mounts things: each resolves inside the
/// container's root (as if the root were `/`), so nothing outside it is created or mounted
/// over, whatever the symlink names; a link that leads nowhere inside the root fails the
/// create. A link that stays inside works. The agent's tree stands in for the VM's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_at_mount_destinations_stay_inside_the_root() {
    let agent = Agent::start().await;
    agent.create_sandbox().await;
    let outside = agent.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let root = agent.dir.path().join("share/busybox");
    // An absolute and a relative link out of the root, to a directory and to a file that
    // does not exist yet (a mount prepared through the link would create them).
    std::os::unix::fs::symlink(&outside, root.join("abs")).unwrap();
    std::os::unix::fs::symlink(
        format!("../../../../../../../..{}", outside.display()),
        root.join("rel"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.join("hosts"), root.join("etc/hosts")).unwrap();
    std::os::unix::fs::symlink("/tmp", root.join("inside")).unwrap();
    for (n, destination) in ["/abs/made", "/rel/made", "/abs"].iter().enumerate() {
        let (c, message) = code(
            agent
                .create(
                    &format!("dir{n}"),
                    tmpfs_at(destination, &["true"]),
                    stdio(false, false),
                )
                .await,
        );
        assert_eq!(c, Code::INTERNAL, "{destination}: {message}");
        assert!(message.contains("rootfs"), "{destination}: {message}");
        assert!(
            !outside.join("made").exists(),
            "{destination} made a dir outside the root"
        );
    }
    let hosts = GuestFile {
        destination: "/etc/hosts".into(),
        content: b"127.0.0.1 localhost\n".to_vec(),
        ..Default::default()
    };
    let (c, message) = code(
        agent
            .create_with_files("file", spec(&["true"]), stdio(false, false), vec![hosts])
            .await,
    );
    assert_eq!(c, Code::INTERNAL, "{message}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "made outside the root"
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", agent.pid())).unwrap();
    let leaked: Vec<&str> = mountinfo
        .lines()
        .filter(|m| m.contains("outside"))
        .collect();
    assert!(leaked.is_empty(), "mounts outside the root: {leaked:?}");

    let probe = ["sh", "-c", "grep -q ' /tmp/made tmpfs ' /proc/mounts"];
    agent
        .create(
            "inside",
            tmpfs_at("/inside/made", &probe),
            stdio(false, false),
        )
        .await
        .unwrap();
    agent.start_container("inside").await;
    assert_eq!(
        agent.wait("inside", "").await.exit_code,
        0,
        "no tmpfs at /tmp/made"
    );
    agent.remove("inside").await.unwrap();
    agent.finish().await;
}

/// `spec(args)` with a tmpfs mounted at `destination` too.
fn tmpfs_at(destination: &str, args: &[&str]) -> serde_json::Value {
    let mut spec = spec(args);
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(
            {"destination": destination, "type": "tmpfs", "source": "tmpfs"}
        ));
    spec
}
