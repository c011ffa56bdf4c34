//! The microVM foundation end to end: real QEMU, real guest kernel, the real agent,
//! real containers on a busybox rootfs. Needs root (see scripts/test.sh).

mod vm_support;

use std::time::{Duration, Instant};

use spry_proto::agent as pb;
use spry_shim::agent_client::{AgentClient, OutputStream, ProcessId};
use spry_shim::cli::{container_spec, ProcessOptions};
use spry_shim::rootfs::RootfsSource;
use spry_shim::sandbox::{PodVm, Sandbox, SandboxError};
use vm_support::*;

fn opts(args: &[&str]) -> ProcessOptions {
    ProcessOptions {
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn read_all(agent: AgentClient, process: ProcessId, stream: OutputStream) -> String {
    let mut out = Vec::new();
    while let Some(data) = agent.read_output(&process, stream, 65536).await.unwrap() {
        out.extend(data);
    }
    String::from_utf8_lossy(&out).to_string()
}

/// Creates and starts a container; returns its output collectors.
async fn start(
    sandbox: &Sandbox,
    id: &str,
    opts: &ProcessOptions,
    rootfs: &std::path::Path,
    stdin: bool,
) -> (
    tokio::task::JoinHandle<String>,
    tokio::task::JoinHandle<String>,
) {
    let stdio = pb::StdioConfig {
        terminal: opts.terminal,
        stdin,
        rows: 24,
        cols: 80,
        ..Default::default()
    };
    sandbox
        .create_container(
            id,
            &container_spec(opts),
            &RootfsSource::Directory(rootfs.to_path_buf()),
            stdio,
            Default::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("create {id}: {}", chain(&e)));
    let agent = sandbox.agent().clone();
    let out = tokio::spawn(read_all(
        agent.clone(),
        ProcessId::init(id),
        OutputStream::Stdout,
    ));
    let err = tokio::spawn(if opts.terminal {
        // With a tty, stderr is merged into the terminal stream.
        Box::pin(async { String::new() })
            as std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>
    } else {
        Box::pin(read_all(agent, ProcessId::init(id), OutputStream::Stderr))
    });
    sandbox
        .start_container(id)
        .await
        .unwrap_or_else(|e| panic!("start {id}: {}", chain(&e)));
    (out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_identity_exec_signals_and_stdin() {
    let area = TestArea::new();
    let rootfs = busybox_rootfs();
    let sandbox = area.sandbox("ident").await;

    // The container is PID 1 of its own pid namespace; hostname, env and cwd come
    // from the spec; uname shows the guest kernel, not the host's.
    let mut o = opts(&[
        "sh",
        "-c",
        "echo pid=$$; hostname; echo foo=$FOO; pwd; uname -r",
    ]);
    o.env = vec!["FOO=bar".into()];
    o.cwd = Some("/tmp".into());
    o.hostname = Some("box".into());
    let (out, _err) = start(&sandbox, "c1", &o, rootfs.path(), false).await;
    let status = sandbox
        .agent()
        .wait_process(&ProcessId::init("c1"))
        .await
        .unwrap();
    let out = out.await.unwrap();
    assert_eq!(status.exit_code, 0, "output: {out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        &lines[..4],
        &["pid=1", "box", "foo=bar", "/tmp"],
        "output: {out}"
    );
    let host_release = nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .to_string();
    assert_eq!(
        lines[4],
        sandbox.agent().info.kernel_release,
        "output: {out}"
    );
    assert_ne!(lines[4], host_release, "uname -r shows the host kernel");
    sandbox.remove_container("c1").await.unwrap();

    // A long-running container: exec into it, SIGTERM an exec'd process, pipe stdin.
    let (_out, _err) = start(
        &sandbox,
        "c2",
        &opts(&["sleep", "1000"]),
        rootfs.path(),
        false,
    )
    .await;
    let agent = sandbox.agent().clone();
    let process_json = |args: &[&str]| {
        let mut p = container_spec(&opts(args)).process().clone().unwrap();
        p.set_terminal(Some(false));
        serde_json::to_vec(&p).unwrap()
    };
    let stdio = |stdin: bool| pb::StdioConfig {
        stdin,
        ..Default::default()
    };

    let exec = ProcessId::exec("c2", "e1");
    agent
        .exec_process(
            &exec,
            process_json(&["sh", "-c", "echo from-exec; ls /proc | grep -c '^[0-9]'"]),
            stdio(false),
        )
        .await
        .unwrap();
    let out = tokio::spawn(read_all(agent.clone(), exec.clone(), OutputStream::Stdout));
    assert_eq!(agent.wait_process(&exec).await.unwrap().exit_code, 0);
    let out = out.await.unwrap();
    assert!(out.starts_with("from-exec\n"), "exec output: {out}");

    let sleeper = ProcessId::exec("c2", "e2");
    agent
        .exec_process(&sleeper, process_json(&["sleep", "1000"]), stdio(false))
        .await
        .unwrap();
    agent
        .signal_process(&sleeper, libc::SIGTERM as u32, false)
        .await
        .unwrap();
    let status = agent.wait_process(&sleeper).await.unwrap();
    assert_eq!(
        (status.exit_code, status.signal),
        (143, libc::SIGTERM as u32)
    );

    let cat = ProcessId::exec("c2", "e3");
    agent
        .exec_process(&cat, process_json(&["sh", "-c", "tr a-z A-Z"]), stdio(true))
        .await
        .unwrap();
    let out = tokio::spawn(read_all(agent.clone(), cat.clone(), OutputStream::Stdout));
    agent
        .write_stdin(&cat, b"piped through\n".to_vec())
        .await
        .unwrap();
    agent.close_stdin(&cat).await.unwrap();
    assert_eq!(agent.wait_process(&cat).await.unwrap().exit_code, 0);
    assert_eq!(out.await.unwrap(), "PIPED THROUGH\n");

    // Kill the container's init (PID 1 of its namespace ignores SIGTERM without a
    // handler, as in runc), then remove it.
    agent
        .signal_process(&ProcessId::init("c2"), libc::SIGKILL as u32, true)
        .await
        .unwrap();
    let status = agent.wait_process(&ProcessId::init("c2")).await.unwrap();
    assert_eq!(status.exit_code, 137);
    sandbox.remove_container("c2").await.unwrap();

    sandbox.shutdown(SHORT).await.unwrap();
    area.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tty_and_memory_limit() {
    let area = TestArea::new();
    let rootfs = busybox_rootfs();
    let sandbox = area.sandbox("ttymem").await;

    let mut o = opts(&[
        "sh",
        "-c",
        "test -t 0 && test -t 1 && echo is-a-tty; stty size",
    ]);
    o.terminal = true;
    let (out, _) = start(&sandbox, "tty", &o, rootfs.path(), true).await;
    let status = sandbox
        .agent()
        .wait_process(&ProcessId::init("tty"))
        .await
        .unwrap();
    let out = out.await.unwrap();
    assert_eq!(status.exit_code, 0, "output: {out}");
    assert!(out.contains("is-a-tty"), "output: {out}");
    assert!(out.contains("24 80"), "tty size not applied: {out}");
    sandbox.remove_container("tty").await.unwrap();

    // 64 MiB buffer under a 32 MiB limit: the kernel OOM-kills it, and the agent says so.
    let mut o = opts(&["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]);
    o.memory_limit = Some(32 << 20);
    let oom_events = tokio::spawn({
        let agent = sandbox.agent().clone();
        async move { agent.next_oom_event().await }
    });
    let (_out, _err) = start(&sandbox, "hog", &o, rootfs.path(), false).await;
    let status = sandbox
        .agent()
        .wait_process(&ProcessId::init("hog"))
        .await
        .unwrap();
    assert_eq!(status.exit_code, 137, "{status:?}");
    assert!(status.oom_killed, "exit not reported as OOM: {status:?}");
    let event = tokio::time::timeout(SHORT, oom_events)
        .await
        .expect("no OOM event")
        .unwrap()
        .unwrap();
    assert_eq!(event, "hog");
    sandbox.remove_container("hog").await.unwrap();

    sandbox.shutdown(SHORT).await.unwrap();
    area.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_and_qemu_death_is_reported_within_a_second() {
    let area = TestArea::new();
    let rootfs = busybox_rootfs();
    let (a, b) = tokio::join!(area.sandbox("vm-a"), area.sandbox("vm-b"));
    for sandbox in [&a, &b] {
        let _ = start(
            sandbox,
            "sleeper",
            &opts(&["sleep", "1000"]),
            rootfs.path(),
            false,
        )
        .await;
    }

    let wait = tokio::spawn({
        let agent = a.agent().clone();
        async move { agent.wait_process(&ProcessId::init("sleeper")).await }
    });
    let mut exit = a.exit_watch();
    let killed_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.vm().pid() as i32),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(1), exit.wait_for(|e| e.is_some()))
        .await
        .expect("VM death not reported within 1 s")
        .unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(1), wait)
        .await
        .expect("wait did not fail within 1 s")
        .unwrap();
    assert!(
        waited.is_err(),
        "a dead VM's container cannot have exited normally: {waited:?}"
    );
    assert!(killed_at.elapsed() < Duration::from_secs(2));

    // The other VM is unaffected.
    let agent = b.agent();
    let exec = ProcessId::exec("sleeper", "still-alive");
    let mut p = container_spec(&opts(&["echo", "alive"]))
        .process()
        .clone()
        .unwrap();
    p.set_terminal(Some(false));
    agent
        .exec_process(&exec, serde_json::to_vec(&p).unwrap(), Default::default())
        .await
        .unwrap();
    let out = read_all(agent.clone(), exec.clone(), OutputStream::Stdout).await;
    assert_eq!(out, "alive\n");

    a.shutdown(SHORT).await.unwrap();
    b.shutdown(SHORT).await.unwrap();
    area.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_get_clear_errors() {
    let area = TestArea::new();
    let rootfs = busybox_rootfs();
    let sandbox = area.sandbox("bad").await;
    let source = RootfsSource::Directory(rootfs.path().to_path_buf());

    // A binary that does not exist: the error names it, at create or at start.
    let spec = container_spec(&opts(&["/no/such/binary"]));
    let err = match sandbox
        .create_container(
            "nobin",
            &spec,
            &source,
            Default::default(),
            Default::default(),
        )
        .await
    {
        Err(e) => chain(&e),
        Ok(()) => chain(
            &sandbox
                .start_container("nobin")
                .await
                .expect_err("a missing binary started"),
        ),
    };
    assert!(
        err.contains("/no/such/binary"),
        "error does not name the binary: {err}"
    );
    let _ = sandbox.remove_container("nobin").await;

    // An unknown namespace type: INVALID_ARGUMENT naming it.
    let mut spec_json = serde_json::to_value(container_spec(&opts(&["true"]))).unwrap();
    spec_json["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "bogus"}));
    let req = pb::CreateContainerRequest {
        container_id: "badns".into(),
        oci_spec_json: serde_json::to_vec(&spec_json).unwrap(),
        rootfs: Some(pb::Rootfs::default()).into(),
        ..Default::default()
    };
    let err = sandbox
        .agent()
        .create_container(req)
        .await
        .expect_err("unknown namespace accepted");
    assert_eq!(err.code(), Some(ttrpc::Code::INVALID_ARGUMENT), "{err}");
    assert!(
        err.to_string().contains("bogus"),
        "error does not name the namespace: {err}"
    );

    // A rootfs directory that does not exist: refused before anything reaches the VM.
    let missing = RootfsSource::Directory("/no/such/rootfs".into());
    let err = sandbox
        .create_container(
            "norootfs",
            &spec,
            &missing,
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap_err();
    assert!(chain(&err).contains("/no/such/rootfs"), "{}", chain(&err));

    sandbox.shutdown(SHORT).await.unwrap();
    area.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_kernel_or_initramfs_is_named_and_leaves_nothing() {
    let area = TestArea::new();
    for (field, path) in [
        ("kernel", "/no/such/vmlinux"),
        ("initramfs", "/no/such/initramfs.img"),
    ] {
        let mut config = area.vm_config(field);
        match field {
            "kernel" => config.kernel = path.into(),
            _ => config.initramfs = path.into(),
        }
        let hypervisor = spry_shim::vm::QemuHypervisor::new(shared_state_root());
        let share =
            spry_shim::rootfs::ErofsBlockShare::new(area.dir.path().join("rootfs").join(field));
        let started = tokio::time::timeout(
            SHORT,
            Sandbox::start(
                &hypervisor,
                config,
                Default::default(),
                Box::new(share),
                SHORT,
            ),
        )
        .await
        .expect("a missing file must fail fast, not hang");
        let err = match started {
            Err(e @ SandboxError::StartVm { .. }) => chain(&e),
            Err(e) => panic!("wrong error for a missing {field}: {}", chain(&e)),
            Ok(_) => panic!("a VM started without its {field}"),
        };
        assert!(err.contains(path), "error does not name {path}: {err}");
    }
    area.assert_no_leaks();
}
