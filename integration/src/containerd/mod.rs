//! A private containerd 2.x: own root, state, socket, config, CNI network and registry hosts, its log in a
//! file. Dropping it removes every pod, stops containerd, kills leftover shims of this instance, unmounts
//! everything under its directories, deletes its bridge and removes the directories.

use crate::containerd_config::{self, ConfigInputs};
use crate::crictl::Crictl;
use crate::instance_dirs::{make_temp_dir, InstanceDirs, KeptRecord};
use crate::leak::{LeakCheck, LeakScope};
use crate::stale::{self, InstanceId};
use crate::{paths, require, system};
use anyhow::{bail, Context, Result};
use std::env;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod kept;
mod options;

pub use options::ContainerdOptions;

pub struct Containerd {
    opts: ContainerdOptions,
    binary: PathBuf,
    crictl_bin: PathBuf,
    /// On disk: root (images, snapshots), config, CNI, certs.d, logs, test scratch files;
    /// and on tmpfs, a short path: socket and state.
    dirs: InstanceDirs,
    marker: String,
    bridge: String,
    daemon: Option<Daemon>,
    cleaned: bool,
}

/// The containerd process: ours, or one an earlier process left running and we adopted.
enum Daemon {
    Child(Child),
    Adopted(i32),
}

impl Containerd {
    pub fn start(opts: ContainerdOptions) -> Result<Self> {
        require::require_root()?;
        let binary =
            require::require_tool(&opts.binary.clone().unwrap_or_else(paths::containerd_bin))?;
        let crictl_bin = require::require_tool(&paths::crictl_bin())?;
        let cni_bin_dir = paths::cni_bin_dir();
        for plugin in ["bridge", "host-local", "portmap", "loopback"] {
            require::require_tool(&cni_bin_dir.join(plugin))?;
        }
        let Some(sandbox_image) = opts.sandbox_image.clone() else {
            bail!("ContainerdOptions needs a sandbox image: call .registry(&registry) or .sandbox_image(..)");
        };
        stale::sweep();
        // Unique per instance: directory names, marker, bridge name and subnet all derive from it.
        let id = InstanceId::fresh(&opts.name);
        let tag = id.tag;
        let dirs = match &opts.fixed_dirs {
            Some((dir, run)) => {
                if let Some(record) = KeptRecord::read(run)? {
                    bail!(
                        "{} holds a running instance (containerd pid {}): stop it first",
                        run.display(),
                        record.pid
                    );
                }
                InstanceDirs::fixed(dir, run)?
            }
            None => InstanceDirs::Temp {
                dir: make_temp_dir(&paths::harness_dir(), &id)?,
                run: make_temp_dir(&paths::harness_run_dir(), &id)?,
            },
        };
        let subnet = format!("10.{}.{}.0/24", 200 + (tag >> 8) % 50, tag & 0xff);
        let subnet6 = opts
            .dual_stack
            .then(|| format!("fd53:7072:{:x}::/64", tag & 0xffff));
        let mut containerd = Containerd {
            marker: id.marker(),
            bridge: id.bridge(),
            opts,
            binary,
            crictl_bin,
            dirs,
            daemon: None,
            cleaned: false,
        };
        containerd.write_files(&sandbox_image, &cni_bin_dir, &subnet, subnet6.as_deref())?;
        containerd.spawn()?;
        Ok(containerd)
    }

    fn write_files(
        &self,
        sandbox_image: &str,
        cni_bin_dir: &Path,
        subnet: &str,
        subnet6: Option<&str>,
    ) -> Result<()> {
        for d in [
            self.root_dir(),
            self.state_dir(),
            self.cni_conf_dir(),
            self.certs_dir(),
            self.scratch_dir(),
        ] {
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let conflist = containerd_config::cni_conflist(
            &crate::portmap_rules::network_of_bridge(&self.bridge),
            &self.bridge,
            subnet,
            subnet6,
            self.opts.main_cni_plugin.as_ref(),
            &self.dirs.dir().join("cni-ipam"),
        );
        write(
            &self.cni_conf_dir().join("10-spry-it.conflist"),
            &serde_json::to_string_pretty(&conflist)?,
        )?;
        for (host, addr) in &self.opts.registries {
            let host_dir = self.certs_dir().join(host);
            fs::create_dir_all(&host_dir)
                .with_context(|| format!("creating {}", host_dir.display()))?;
            write(
                &host_dir.join("hosts.toml"),
                &containerd_config::registry_hosts_toml(addr),
            )?;
        }
        let inputs = ConfigInputs {
            root: self.root_dir(),
            state: self.state_dir(),
            socket: self.socket(),
            cni_conf_dir: self.cni_conf_dir(),
            cni_bin_dir: cni_bin_dir.to_path_buf(),
            certs_dir: self.certs_dir(),
            sandbox_image: sandbox_image.to_string(),
            snapshotter: self.opts.snapshotter.clone(),
            log_level: self.opts.log_level.clone(),
        };
        write(
            &self.config_path(),
            &containerd_config::render_config(&inputs, &self.opts.extra_toml)?,
        )?;
        // crictl reads /etc/crictl.yaml unless given a config: an empty one keeps host settings out.
        write(&self.crictl_config_path(), "")?;
        Ok(())
    }

    fn spawn(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("opening {}", self.log_path().display()))?;
        let mut path = self.opts.path_prepend.clone();
        path.push(paths::deps_bin_dir());
        path.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
        let (marker_key, marker_value) = self.marker.split_once('=').expect("marker is KEY=VALUE");
        let child = Command::new(&self.binary)
            .arg("--config")
            .arg(self.config_path())
            .env(
                "PATH",
                env::join_paths(path).context("building PATH for containerd")?,
            )
            .env(marker_key, marker_value)
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating log file handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.daemon = Some(Daemon::Child(child));
        self.wait_ready()
    }

    /// Ready when CRI answers `crictl version` (containerd logs "containerd successfully booted" earlier).
    fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        let crictl = self.crictl().with_timeout(Duration::from_secs(5));
        let mut last_err = None;
        while started.elapsed() < self.opts.start_timeout {
            if let Some(Daemon::Child(child)) = self.daemon.as_mut() {
                if let Some(status) = child.try_wait().context("checking containerd")? {
                    bail!(
                        "containerd exited ({status}) during start-up; log:\n{}",
                        self.log_tail(40)
                    );
                }
            }
            if self.socket().exists() {
                match crictl.version() {
                    Ok(_) => return Ok(()),
                    Err(e) => last_err = Some(e),
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "containerd did not answer CRI within {:?} (last error: {}); log:\n{}",
            self.opts.start_timeout,
            last_err
                .map(|e| format!("{e:#}"))
                .unwrap_or_else(|| "socket never appeared".into()),
            self.log_tail(40)
        )
    }

    /// Stops the containerd process (SIGTERM, then SIGKILL after 10 s). Shims and pods keep running.
    pub fn stop(&mut self) -> Result<()> {
        match self.daemon.take() {
            Some(Daemon::Child(mut child)) => {
                system::terminate_child(&mut child, Duration::from_secs(10))?
            }
            Some(Daemon::Adopted(pid)) => system::terminate_pid(pid, Duration::from_secs(10)),
            None => {}
        }
        Ok(())
    }

    /// Restarts containerd with the same root, state, socket and config ("containerd restart" tests).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    pub fn is_running(&mut self) -> bool {
        match self.daemon.as_mut() {
            Some(Daemon::Child(c)) => matches!(c.try_wait(), Ok(None)),
            Some(Daemon::Adopted(pid)) => system::process_alive(*pid),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self.daemon.as_ref()? {
            Daemon::Child(c) => Some(c.id()),
            Daemon::Adopted(pid) => u32::try_from(*pid).ok(),
        }
    }

    pub fn crictl(&self) -> Crictl {
        Crictl::new(&self.crictl_bin, &self.socket(), &self.crictl_config_path())
    }

    /// Runs the Go-built `ctr` against this instance in the `k8s.io` namespace; returns stdout.
    pub fn ctr<S: AsRef<str>>(&self, args: &[S]) -> Result<String> {
        let ctr = require::require_tool(&self.binary.with_file_name("ctr"))?;
        system::run_checked(
            Command::new(ctr)
                .arg("--address")
                .arg(self.socket())
                .args(["--namespace", "k8s.io"])
                .args(args.iter().map(|a| a.as_ref())),
        )
    }

    /// A leak check scoped to this instance (its marker env var and directories).
    pub fn leak_check(&self) -> Result<LeakCheck> {
        LeakCheck::capture(self.leak_scope())
    }

    pub fn leak_scope(&self) -> LeakScope {
        LeakScope::host_wide()
            .marker(&self.marker)
            .path(self.dirs.dir())
            .path(self.dirs.run())
            .sandbox_cgroups_of(&self.log_path())
    }

    /// The live shims of this instance (they inherit its marker).
    pub fn shims(&self) -> Result<Vec<system::ProcessInfo>> {
        Ok(system::processes()?
            .into_iter()
            .filter(|p| p.name().starts_with("containerd-shim") && p.environ_contains(&self.marker))
            .collect())
    }

    /// SIGKILLs the shim serving `pod` (a sandbox id), as a crash would; its pid.
    pub fn kill_shim_of(&self, pod: &str) -> Result<i32> {
        let shim = self
            .shims()?
            .into_iter()
            .find(|p| p.cmdline_contains(pod))
            .with_context(|| format!("no shim for pod {pod}"))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shim.pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        Ok(shim.pid)
    }

    /// The QEMUs of this instance's pods. They inherit its marker; their command lines name
    /// no state path (a jailed QEMU gets fds).
    pub fn qemus(&self) -> Result<Vec<system::ProcessInfo>> {
        Ok(system::processes()?
            .into_iter()
            .filter(|p| p.name().starts_with("qemu-system") && p.environ_contains(&self.marker))
            .collect())
    }

    /// `SPRY_IT_INSTANCE=...`: set on containerd and inherited by its shims.
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// Scratch space for the test's own files (pod/container JSON, logs); removed with the instance.
    pub fn dir(&self) -> PathBuf {
        self.dirs.dir().join("scratch")
    }

    fn scratch_dir(&self) -> PathBuf {
        self.dir()
    }

    pub fn socket(&self) -> PathBuf {
        self.dirs.run().join("containerd.sock")
    }

    pub fn root_dir(&self) -> PathBuf {
        self.dirs.dir().join("root")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dirs.run().join("state")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dirs.dir().join("config.toml")
    }

    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dirs.dir().join("cni/net.d")
    }

    pub fn certs_dir(&self) -> PathBuf {
        self.dirs.dir().join("certs.d")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dirs.dir().join("containerd.log")
    }

    fn crictl_config_path(&self) -> PathBuf {
        self.dirs.dir().join("crictl.yaml")
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The host's IPv4 address on the pod network (the pods' default gateway), once a pod
    /// has made CNI create the bridge.
    pub fn pod_gateway(&self) -> Result<String> {
        let out = system::run_checked(Command::new("ip").args([
            "-j",
            "-4",
            "addr",
            "show",
            "dev",
            &self.bridge,
        ]))?;
        let links: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("parsing `ip -j addr` output {out:?}"))?;
        links[0]["addr_info"][0]["local"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("bridge {} has no IPv4 address: {out}", self.bridge))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Full teardown (what Drop does), reporting every step that failed.
    pub fn cleanup(&mut self) -> Result<()> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        let mut problems = Vec::new();
        if self.is_running() {
            // Pods first, so their shims exit on their own and release mounts/netns/VMs.
            if let Err(e) = self.crictl().rmp_all_force() {
                problems.push(format!("removing pods: {e:#}"));
            }
        }
        if let Err(e) = self.stop() {
            problems.push(format!("stopping containerd: {e:#}"));
        }
        match self.kill_leftover_shims() {
            Ok(killed) if !killed.is_empty() => {
                problems.push(format!("had to kill leftover shims: {killed:?}"))
            }
            Ok(_) => {}
            Err(e) => problems.push(format!("finding leftover shims: {e:#}")),
        }
        for dir in [self.dirs.run().to_path_buf(), self.dirs.dir().to_path_buf()] {
            if let Err(e) = system::unmount_under(&dir) {
                problems.push(format!("unmounting under {}: {e:#}", dir.display()));
            }
        }
        if let Err(e) = self.archive_log() {
            problems.push(format!("archiving the containerd log: {e:#}"));
        }
        // What CNI DEL did not get to (a pod whose containerd was killed).
        let network = crate::portmap_rules::network_of_bridge(&self.bridge);
        if let Err(e) = crate::portmap_rules::remove_portmap_rules(&network) {
            problems.push(format!("removing the hostPort rules of {network}: {e:#}"));
        }
        if Path::new("/sys/class/net").join(&self.bridge).exists() {
            if let Err(e) =
                system::run_checked(Command::new("ip").args(["link", "del", &self.bridge]))
            {
                problems.push(format!("deleting bridge {}: {e:#}", self.bridge));
            }
        }
        for dir in [self.dirs.run(), self.dirs.dir()] {
            if let Err(e) = fs::remove_dir_all(dir) {
                problems.push(format!("removing {}: {e}", dir.display()));
            }
        }
        if !problems.is_empty() {
            bail!("containerd teardown: {}", problems.join("; "));
        }
        Ok(())
    }

    /// Copies containerd's log to `paths::log_archive_dir()/<instance id>.log` before the dirs go.
    fn archive_log(&self) -> Result<PathBuf> {
        let archive = paths::log_archive_dir();
        fs::create_dir_all(&archive).with_context(|| format!("creating {}", archive.display()))?;
        // The instance id: unique per instance, also for fixed dirs.
        let name = self
            .marker
            .split_once('=')
            .map_or("containerd", |(_, id)| id);
        let dest = archive.join(format!("{name}.log"));
        fs::copy(self.log_path(), &dest)
            .with_context(|| format!("copying the log to {}", dest.display()))?;
        Ok(dest)
    }

    /// Shims of this instance still alive after containerd stopped: SIGTERM, then SIGKILL.
    fn kill_leftover_shims(&self) -> Result<Vec<String>> {
        let socket = self.socket().to_string_lossy().into_owned();
        let mut killed = Vec::new();
        for p in system::processes()? {
            let ours = p.environ_contains(&self.marker) || p.cmdline_contains(&socket);
            if ours && p.name().starts_with("containerd-shim") {
                system::terminate_pid(p.pid, Duration::from_secs(5));
                killed.push(p.describe());
            }
        }
        Ok(killed)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "spry-integration: test panicked; containerd log tail:\n{}",
                self.log_tail(30)
            );
        }
        // Read before cleanup removes the file.
        let log_tail = self.log_tail(20);
        if let Err(e) = self.cleanup() {
            eprintln!("spry-integration: {e:#}\ncontainerd log tail:\n{log_tail}");
        }
    }
}

fn write(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}
