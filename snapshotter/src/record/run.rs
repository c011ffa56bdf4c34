//! Running one workload in private namespaces under a fanotify mount watch.

use std::collections::HashSet;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use nix::mount::{mount, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};

use super::residency::{device_readahead_kib, evict, read_ranges};
use super::{OpenOrder, RecordError, RecordOptions, Recording, StopReason};
use crate::sys::{set_child_setup, ChildSetup, MountWatch};

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The process to record, as an image config describes it.
#[derive(Debug, Clone)]
pub struct Workload {
    pub argv: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// Working directory inside the root (created if missing).
    pub cwd: String,
    /// `user[:group]`, by name or number; empty for root.
    pub user: String,
}

/// Records `workload` run chrooted into `root` (an unpacked image). Runs on a
/// thread of its own, because entering namespaces changes the calling thread
/// for good; blocks until the recording ends.
pub fn record_rootfs(
    root: &Path,
    workload: &Workload,
    opts: &RecordOptions,
    image_files: Option<HashSet<String>>,
) -> Result<Recording, RecordError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(RecordError::NotRoot);
    }
    let root = root.canonicalize().map_err(|source| RecordError::Dir {
        path: root.to_path_buf(),
        source,
    })?;
    let workload = workload.clone();
    let opts = opts.clone();
    // With the image's file list, what the workload reads can be told by the page cache.
    let stayed_cached = image_files.as_ref().map(|files| evict(&root, files));
    let thread_root = root.clone();
    let mut recording = std::thread::Builder::new()
        .name("spry-record".into())
        .spawn(move || record_on_this_thread(&thread_root, &workload, &opts, image_files))
        .map_err(|source| RecordError::ThreadSpawn { source })?
        .join()
        .map_err(|_| RecordError::Thread)??;
    recording.reads = read_ranges(&root, &recording.files);
    recording.stayed_cached = stayed_cached;
    recording.readahead_kib = device_readahead_kib(&root);
    Ok(recording)
}

fn record_on_this_thread(
    root: &Path,
    workload: &Workload,
    opts: &RecordOptions,
    image_files: Option<HashSet<String>>,
) -> Result<Recording, RecordError> {
    let (uid, gid) = resolve_user(root, &workload.user)?;
    // New mount namespace for this thread (and the workload it spawns), new
    // PID namespace for the workload: killing its PID 1 ends everything.
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID)
        .map_err(|source| RecordError::Unshare { source })?;
    let mount_err = |source_path: &Path, target: &Path| {
        let (source_path, target) = (source_path.to_path_buf(), target.to_path_buf());
        move |source| RecordError::Mount {
            source_path,
            target,
            source,
        }
    };
    let slash = Path::new("/");
    mount(
        None::<&str>,
        slash,
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(mount_err(slash, slash))?;
    // The bind mount is what fanotify watches: only the workload's opens
    // through its root reach it.
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(mount_err(root, root))?;
    for dir in ["dev", "proc"] {
        let path = root.join(dir);
        if path.symlink_metadata().is_err() {
            let _ = std::fs::create_dir(&path);
        }
    }
    let dev = root.join("dev");
    if dev.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        let host_dev = Path::new("/dev");
        mount(
            Some(host_dev),
            &dev,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(mount_err(host_dev, &dev))?;
    }
    let watch = MountWatch::new(root).map_err(|source| RecordError::Watch {
        path: root.to_path_buf(),
        source,
    })?;
    let mut child = spawn(root, workload, uid, gid)?;
    let mut order = OpenOrder::new(root, image_files);
    let result = watch_until_stop(&watch, &mut child, opts, &mut order);
    let _ = child.kill();
    let _ = child.wait();
    // Opens up to the stop are queued by now; take them too.
    let drained = drain(&watch, &mut order);
    let stop = result?;
    drained?;
    Ok(Recording {
        files: order.into_paths(),
        stop,
        reads: Default::default(),
        stayed_cached: None,
        readahead_kib: None,
    })
}

fn spawn(root: &Path, workload: &Workload, uid: u32, gid: u32) -> Result<Child, RecordError> {
    let program = workload.argv[0].clone();
    let spawn_err = |source| RecordError::Spawn {
        program: program.clone(),
        root: root.to_path_buf(),
        source,
    };
    let cstring = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| spawn_err(std::io::ErrorKind::InvalidInput.into()))
    };
    let mut cwd_and_parents = Vec::new();
    let mut cwd = String::new();
    for part in workload.cwd.split('/').filter(|p| !p.is_empty()) {
        cwd.push('/');
        cwd.push_str(part);
        cwd_and_parents.push(cstring(cwd.as_bytes())?);
    }
    let setup = ChildSetup {
        root: cstring(root.as_os_str().as_bytes())?,
        cwd_and_parents,
        uid,
        gid,
    };
    let mut cmd = Command::new(&workload.argv[0]);
    cmd.args(&workload.argv[1..])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let has_path = workload.env.iter().any(|e| e.starts_with("PATH="));
    let default_path = (!has_path).then_some(DEFAULT_PATH);
    for entry in workload.env.iter().map(String::as_str).chain(default_path) {
        if let Some((key, value)) = entry.split_once('=') {
            cmd.env(key, value);
        }
    }
    set_child_setup(&mut cmd, setup);
    cmd.spawn().map_err(spawn_err)
}

/// Collects events until the workload prints the `until_line`, exits, or
/// the timeout passes. Its stdout is copied to stderr.
fn watch_until_stop(
    watch: &MountWatch,
    child: &mut Child,
    opts: &RecordOptions,
    order: &mut OpenOrder,
) -> Result<StopReason, RecordError> {
    let deadline = Instant::now() + opts.timeout;
    let mut stdout = child.stdout.take();
    let mut pending = Vec::<u8>::new();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(StopReason::Exited(status));
        }
        if Instant::now() >= deadline {
            return Ok(StopReason::Timeout);
        }
        let mut fds = vec![PollFd::new(watch.as_fd(), PollFlags::POLLIN)];
        if let Some(out) = &stdout {
            fds.push(PollFd::new(out.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(RecordError::Events { source: e.into() }),
        }
        let out_ready = fds.get(1).is_some_and(|fd| {
            fd.revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP))
        });
        drop(fds);
        drain(watch, order)?;
        if !out_ready {
            continue;
        }
        let Some(out) = stdout.as_mut() else {
            continue;
        };
        let mut buf = [0u8; 8192];
        let n = out
            .read(&mut buf)
            .map_err(|source| RecordError::Output { source })?;
        if n == 0 {
            stdout = None;
            continue;
        }
        let _ = std::io::stderr().write_all(&buf[..n]);
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]).into_owned();
            if opts
                .until_line
                .as_ref()
                .is_some_and(|re| re.is_match(&line))
            {
                // Every open before the line was printed is queued already.
                drain(watch, order)?;
                return Ok(StopReason::Line(line));
            }
        }
    }
}

fn drain(watch: &MountWatch, order: &mut OpenOrder) -> Result<(), RecordError> {
    let mut paths = Vec::new();
    loop {
        let (events, overflow) = watch
            .read_paths(&mut paths)
            .map_err(|source| RecordError::Events { source })?;
        if overflow {
            return Err(RecordError::Overflow);
        }
        for path in paths.drain(..) {
            order.push(&path);
        }
        if events == 0 {
            return Ok(());
        }
    }
}

/// `user[:group]` (names or numbers) as uid and gid, names looked up in the
/// root's /etc/passwd and /etc/group.
fn resolve_user(root: &Path, spec: &str) -> Result<(u32, u32), RecordError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    let entry = |name: &str| {
        passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() > 3 && (f[0] == name || f[2] == name))
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
        })
    };
    let (uid, mut gid) = match user {
        "" => (0, 0),
        u => match (u.parse::<u32>(), entry(u)) {
            (_, Some(ids)) => ids,
            (Ok(uid), None) => (uid, 0),
            (Err(_), None) => {
                return Err(RecordError::User {
                    user: spec.into(),
                    file: "/etc/passwd",
                })
            }
        },
    };
    if let Some(g) = group.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => std::fs::read_to_string(root.join("etc/group"))
                .unwrap_or_default()
                .lines()
                .find_map(|line| {
                    let f: Vec<&str> = line.split(':').collect();
                    (f.len() > 2 && f[0] == g)
                        .then(|| f[2].parse().ok())
                        .flatten()
                })
                .ok_or_else(|| RecordError::User {
                    user: spec.into(),
                    file: "/etc/group",
                })?,
        };
    }
    Ok((uid, gid))
}
