//! The Go-built crictl, pointed at one containerd socket, with typed helpers. Every failure carries the
//! command line, exit status and crictl's stderr.

use crate::system;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Crictl {
    bin: PathBuf,
    endpoint: String,
    /// An empty config file: keeps the host's /etc/crictl.yaml out of our runs.
    config_file: PathBuf,
    /// crictl's per-RPC timeout.
    timeout: Duration,
}

/// Result of running a command in a container.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    /// The command's exit code when the exec itself worked; otherwise crictl's own exit code.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Crictl {
    pub fn new(bin: &Path, socket: &Path, config_file: &Path) -> Self {
        Crictl {
            bin: bin.to_path_buf(),
            endpoint: format!("unix://{}", socket.display()),
            config_file: config_file.to_path_buf(),
            timeout: Duration::from_secs(120),
        }
    }

    /// Per-RPC timeout (default 120 s: pods are VMs under TCG here, and slow).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// crictl with its connection flags and `args`, for a caller that runs it itself (a
    /// long-running `port-forward`).
    pub fn command<S: AsRef<str>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.config_file)
            .arg("--runtime-endpoint")
            .arg(&self.endpoint)
            .arg("--image-endpoint")
            .arg(&self.endpoint)
            .arg("--timeout")
            .arg(format!("{}s", self.timeout.as_secs().max(1)))
            .args(args.iter().map(|a| a.as_ref()))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs crictl with `input` on its stdin (e.g. `attach -i`), whatever the exit status.
    pub fn output_with_stdin<S: AsRef<str>>(&self, args: &[S], input: &[u8]) -> Result<Output> {
        use std::io::Write;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(input)?;
        drop(stdin);
        Ok(child.wait_with_output()?)
    }

    /// Runs crictl on a pseudo-terminal (through util-linux `script`), as a person typing
    /// `crictl exec -it` would; `input` is typed into it. Returns the terminal's output.
    pub fn output_in_terminal<S: AsRef<str>>(&self, args: &[S], input: &[u8]) -> Result<Output> {
        use std::io::Write;
        let cmd = self.command(args);
        let quote =
            |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', "'\\''"));
        let line = std::iter::once(quote(cmd.get_program()))
            .chain(cmd.get_args().map(quote))
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = Command::new("script")
            .args(["-q", "-e", "-c", &line, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning script (util-linux)")?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(input)?;
        // Keep the terminal open until the command is done with it.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(30));
            drop(stdin);
        });
        Ok(child.wait_with_output()?)
    }

    /// Runs crictl with `args` and returns the raw output, whatever the exit status.
    pub fn output<S: AsRef<str>>(&self, args: &[S]) -> Result<Output> {
        self.command(args)
            .output()
            .with_context(|| format!("spawning {}", self.bin.display()))
    }

    /// Runs crictl; fails (with stderr) unless it exits 0. Returns trimmed stdout.
    pub fn run<S: AsRef<str>>(&self, args: &[S]) -> Result<String> {
        let out = self.output(args)?;
        if !out.status.success() {
            bail!(
                "`crictl {}` failed ({}): {}{}",
                args.iter()
                    .map(|a| a.as_ref())
                    .collect::<Vec<_>>()
                    .join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                stdout_hint(&out.stdout),
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn run_json<S: AsRef<str>>(&self, args: &[S]) -> Result<Value> {
        let text = self.run(args)?;
        serde_json::from_str(&text).with_context(|| format!("parsing crictl JSON output: {text}"))
    }

    /// `crictl runp [--runtime HANDLER] POD.json` → pod id.
    pub fn runp(&self, pod_config: &Path, runtime: Option<&str>) -> Result<String> {
        let mut args = vec!["runp".to_string()];
        if let Some(handler) = runtime {
            args.push(format!("--runtime={handler}"));
        }
        args.push(pod_config.display().to_string());
        self.run(&args)
    }

    /// `crictl create POD CTR.json POD.json` → container id (the image must already be pulled).
    pub fn create(
        &self,
        pod_id: &str,
        container_config: &Path,
        pod_config: &Path,
    ) -> Result<String> {
        self.run(&[
            "create",
            pod_id,
            &container_config.display().to_string(),
            &pod_config.display().to_string(),
        ])
    }

    pub fn start(&self, container_id: &str) -> Result<()> {
        self.run(&["start", container_id]).map(drop)
    }

    /// Streaming exec (`crictl exec ID ARGV...`); a non-zero `code` is returned, not an error.
    pub fn exec<S: AsRef<str>>(&self, container_id: &str, argv: &[S]) -> Result<ExecOutput> {
        let mut args = vec!["exec".to_string(), container_id.to_string()];
        args.extend(argv.iter().map(|a| a.as_ref().to_string()));
        let mut out = self.exec_output(&args)?;
        // Streaming exec makes crictl exit 1 whatever the command's code; the code is only in client-go's
        // stream error text. `exec_sync` gets it from the CRI response instead.
        if let Some(code) = stream_exit_code(&out.stderr) {
            out.code = code;
        }
        Ok(out)
    }

    /// ExecSync (`crictl exec --sync --timeout SECS ID ARGV...`).
    pub fn exec_sync<S: AsRef<str>>(
        &self,
        container_id: &str,
        argv: &[S],
        timeout: Duration,
    ) -> Result<ExecOutput> {
        let mut args = vec![
            "exec".to_string(),
            "--sync".to_string(),
            format!("--timeout={}", timeout.as_secs()),
            container_id.to_string(),
        ];
        args.extend(argv.iter().map(|a| a.as_ref().to_string()));
        self.exec_output(&args)
    }

    /// ExecSync that must exit 0 (60 s limit): its stdout, trimmed.
    pub fn exec_ok<S: AsRef<str> + std::fmt::Debug>(
        &self,
        container_id: &str,
        argv: &[S],
    ) -> Result<String> {
        let out = self.exec_sync(container_id, argv, Duration::from_secs(60))?;
        anyhow::ensure!(out.code == 0, "{argv:?}: {} {}", out.stdout, out.stderr);
        Ok(out.stdout.trim().to_owned())
    }

    fn exec_output(&self, args: &[String]) -> Result<ExecOutput> {
        let out = self.output(args)?;
        Ok(ExecOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Container logs: stdout then stderr streams as crictl prints them.
    pub fn logs(&self, container_id: &str) -> Result<String> {
        let out = self.output(&["logs", container_id])?;
        if !out.status.success() {
            bail!(
                "`crictl logs {container_id}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Waits until the container's log holds `needle`, asking `crictl logs` every `poll`.
    /// A container's first output comes 100-300 ms after its create, so a bench timing it
    /// needs a poll far shorter than [`system::wait_for`]'s 100 ms, which would round the
    /// figure up to its own interval whenever the first ask comes too early.
    pub fn wait_for_log(
        &self,
        container_id: &str,
        needle: &str,
        poll: Duration,
        timeout: Duration,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        loop {
            if self.logs(container_id).is_ok_and(|l| l.contains(needle)) {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                bail!("container {container_id} did not log {needle:?} within {timeout:?}");
            }
            std::thread::sleep(poll);
        }
    }

    /// `crictl inspect -o json ID` (container status + info).
    pub fn inspect(&self, container_id: &str) -> Result<Value> {
        self.run_json(&["inspect", "-o", "json", container_id])
    }

    pub fn inspectp(&self, pod_id: &str) -> Result<Value> {
        self.run_json(&["inspectp", "-o", "json", pod_id])
    }

    pub fn inspecti(&self, image: &str) -> Result<Value> {
        self.run_json(&["inspecti", "-o", "json", image])
    }

    /// The container's CRI state, e.g. `CONTAINER_RUNNING`, `CONTAINER_EXITED`.
    pub fn container_state(&self, container_id: &str) -> Result<String> {
        let v = self.inspect(container_id)?;
        v["status"]["state"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no status.state in crictl inspect output: {v}"))
    }

    /// Polls until the container reaches `state`; returns its last `inspect` output.
    pub fn wait_container_state(
        &self,
        container_id: &str,
        state: &str,
        timeout: Duration,
    ) -> Result<Value> {
        let mut last = Value::Null;
        let found = system::wait_for(timeout, || {
            last = self.inspect(container_id)?;
            Ok((last["status"]["state"] == state).then(|| last.clone()))
        })?;
        found.with_context(|| {
            format!(
                "container {container_id} did not reach {state} within {timeout:?}; last status: {}",
                last["status"]
            )
        })
    }

    /// Stops a container, giving it `timeout_s` seconds before SIGKILL.
    pub fn stop(&self, container_id: &str, timeout_s: u32) -> Result<()> {
        self.run(&["stop", "--timeout", &timeout_s.to_string(), container_id])
            .map(drop)
    }

    pub fn rm(&self, container_id: &str) -> Result<()> {
        self.run(&["rm", container_id]).map(drop)
    }

    pub fn stopp(&self, pod_id: &str) -> Result<()> {
        self.run(&["stopp", pod_id]).map(drop)
    }

    pub fn rmp(&self, pod_id: &str) -> Result<()> {
        self.run(&["rmp", pod_id]).map(drop)
    }

    /// Stops and removes every pod (and so every container) of this containerd.
    pub fn rmp_all_force(&self) -> Result<()> {
        self.run(&["rmp", "--all", "--force"]).map(drop)
    }

    /// Pulls `image`; returns the image reference crictl reports.
    pub fn pull(&self, image: &str) -> Result<String> {
        self.run(&["pull", image])
    }

    /// Containers (`all` includes exited ones), as crictl's JSON `containers` array.
    pub fn ps(&self, all: bool) -> Result<Vec<Value>> {
        let mut args = vec!["ps", "-o", "json"];
        if all {
            args.push("--all");
        }
        list_field(self.run_json(&args)?, "containers")
    }

    pub fn pods(&self) -> Result<Vec<Value>> {
        list_field(self.run_json(&["pods", "-o", "json"])?, "items")
    }

    pub fn images(&self) -> Result<Vec<Value>> {
        list_field(self.run_json(&["images", "-o", "json"])?, "images")
    }

    /// `crictl stats -o json --id ID` → that container's stats object.
    pub fn stats(&self, container_id: &str) -> Result<Value> {
        let v = self.run_json(&["stats", "-o", "json", "--id", container_id])?;
        list_field(v, "stats")?
            .into_iter()
            .next()
            .with_context(|| format!("crictl stats returned no entry for {container_id}"))
    }

    /// The container's writable layer usage in bytes as CRI reports it (0 when absent).
    pub fn writable_layer_bytes(&self, container_id: &str) -> Result<u64> {
        let stats = self.stats(container_id)?;
        let used = &stats["writableLayer"]["usedBytes"]["value"];
        Ok(used
            .as_str()
            .and_then(|v| v.parse().ok())
            .or_else(|| used.as_u64())
            .unwrap_or(0))
    }

    /// `crictl info` (runtime status + CRI config), parsed.
    pub fn info(&self) -> Result<Value> {
        self.run_json(&["info", "-o", "json"])
    }

    pub fn version(&self) -> Result<String> {
        self.run(&["version"])
    }
}

/// client-go's `CodeExitError` text: "command terminated with exit code N".
fn stream_exit_code(stderr: &str) -> Option<i32> {
    const MARKER: &str = "command terminated with exit code ";
    let tail = &stderr[stderr.rfind(MARKER)? + MARKER.len()..];
    tail.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn list_field(v: Value, field: &str) -> Result<Vec<Value>> {
    match &v[field] {
        Value::Array(items) => Ok(items.clone()),
        // crictl omits empty lists entirely.
        Value::Null => Ok(Vec::new()),
        other => bail!("crictl JSON field {field} is not a list: {other}"),
    }
}

fn stdout_hint(stdout: &[u8]) -> String {
    let s = String::from_utf8_lossy(stdout);
    let s = s.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(" (stdout: {s})")
    }
}

/// A running `crictl port-forward POD LOCAL:REMOTE` on a free local port; stopped on drop.
pub struct PortForward {
    child: std::process::Child,
    pub local_port: u16,
}

impl Crictl {
    /// Starts `crictl port-forward` to the pod's `remote` port and waits until it listens.
    pub fn port_forward(&self, pod: &str, remote: u16) -> Result<PortForward> {
        let local_port = crate::registry::free_port()?;
        let child = self
            .command(&["port-forward", pod, &format!("{local_port}:{remote}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning crictl port-forward")?;
        let forward = PortForward { child, local_port };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", local_port)).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("crictl port-forward to {pod}:{remote} never listened on {local_port}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(forward)
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_command_and_stderr() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("crictl");
        std::fs::write(&fake, "#!/bin/sh\necho \"boom: $*\" >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = Crictl::new(&fake, Path::new("/x.sock"), Path::new("/dev/null"));
        let err = c.run(&["version"]).unwrap_err().to_string();
        assert!(err.contains("`crictl version` failed"), "{err}");
        assert!(
            err.contains("boom: --config /dev/null --runtime-endpoint unix:///x.sock"),
            "{err}"
        );
        let exec = c.exec("id", &["true"]).unwrap();
        assert_eq!(exec.code, 3);
    }

    #[test]
    fn stream_exit_code_is_parsed_from_crictl_stderr() {
        let stderr = "time=\"x\" level=fatal msg=\"execing command in container abc: command terminated with exit code 3\"\n";
        assert_eq!(stream_exit_code(stderr), Some(3));
        assert_eq!(stream_exit_code("some other failure"), None);
    }

    #[test]
    fn list_field_accepts_missing_lists() {
        assert!(list_field(serde_json::json!({}), "items")
            .unwrap()
            .is_empty());
        assert_eq!(
            list_field(serde_json::json!({"items": [1]}), "items")
                .unwrap()
                .len(),
            1
        );
        assert!(list_field(serde_json::json!({"items": 1}), "items").is_err());
    }
}
