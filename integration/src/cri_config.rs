//! Builders for the pod sandbox and container JSON configs that `crictl runp` / `crictl create` read.
//! Anything the builders don't cover can be set with `patch` (a JSON merge onto the generated config).

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static UID_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh pod uid: unique across processes and calls.
fn unique_uid(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{name}-{}-{nanos}-{}",
        std::process::id(),
        UID_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A `PodSandboxConfig` (CRI v1) as JSON.
#[derive(Debug, Clone)]
pub struct PodConfig {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub attempt: u32,
    pub hostname: Option<String>,
    /// Where container logs go; `write_to` defaults it to `<dir>/logs/<name>`.
    pub log_directory: Option<PathBuf>,
    pub labels: Map<String, Value>,
    pub annotations: Map<String, Value>,
    /// Use the host's network namespace instead of a CNI network.
    pub host_network: bool,
    patch: Option<Value>,
}

impl PodConfig {
    pub fn new(name: &str) -> Self {
        PodConfig {
            name: name.to_string(),
            namespace: "default".to_string(),
            uid: unique_uid(name),
            attempt: 0,
            hostname: None,
            log_directory: None,
            labels: Map::new(),
            annotations: Map::new(),
            host_network: false,
            patch: None,
        }
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.to_string();
        self
    }

    pub fn hostname(mut self, hostname: &str) -> Self {
        self.hostname = Some(hostname.to_string());
        self
    }

    pub fn log_directory(mut self, dir: &Path) -> Self {
        self.log_directory = Some(dir.to_path_buf());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.into());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_string(), value.into());
        self
    }

    pub fn host_network(mut self, on: bool) -> Self {
        self.host_network = on;
        self
    }

    /// JSON merged onto the generated config (objects merge recursively, other values replace).
    pub fn patch(mut self, patch: Value) -> Self {
        self.patch = Some(patch);
        self
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "attempt": self.attempt,
            },
            "hostname": self.hostname.clone().unwrap_or_else(|| self.name.clone()),
            "labels": self.labels,
            "annotations": self.annotations,
            "linux": {
                "security_context": {
                    "namespace_options": { "network": if self.host_network { 2 } else { 0 } }
                }
            }
        });
        if let Some(dir) = &self.log_directory {
            v["log_directory"] = json!(dir);
        }
        if let Some(patch) = &self.patch {
            merge_json(&mut v, patch.clone());
        }
        v
    }

    /// Writes `<dir>/pod-<name>.json` (creating the log directory) and returns its path.
    pub fn write_to(&self, dir: &Path) -> Result<PathBuf> {
        let mut cfg = self.clone();
        let log_dir = cfg
            .log_directory
            .get_or_insert_with(|| dir.join("logs").join(&self.name));
        fs::create_dir_all(&*log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        write_json(dir, &format!("pod-{}.json", self.name), &cfg.to_json())
    }
}

/// A `ContainerConfig` (CRI v1) as JSON.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    /// Relative to the pod's log directory; defaults to `<name>.log`.
    pub log_path: Option<String>,
    pub tty: bool,
    pub stdin: bool,
    /// (host path, container path, read-only)
    pub mounts: Vec<(PathBuf, String, bool)>,
    pub labels: Map<String, Value>,
    pub annotations: Map<String, Value>,
    patch: Option<Value>,
}

impl ContainerConfig {
    pub fn new(name: &str, image: &str) -> Self {
        ContainerConfig {
            name: name.to_string(),
            image: image.to_string(),
            command: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            working_dir: None,
            log_path: None,
            tty: false,
            stdin: false,
            mounts: Vec::new(),
            labels: Map::new(),
            annotations: Map::new(),
            patch: None,
        }
    }

    pub fn command<S: AsRef<str>>(mut self, argv: &[S]) -> Self {
        self.command = argv.iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args = args.iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = Some(dir.to_string());
        self
    }

    pub fn log_path(mut self, path: &str) -> Self {
        self.log_path = Some(path.to_string());
        self
    }

    pub fn tty(mut self, on: bool) -> Self {
        self.tty = on;
        self
    }

    pub fn stdin(mut self, on: bool) -> Self {
        self.stdin = on;
        self
    }

    pub fn mount(mut self, host_path: &Path, container_path: &str, readonly: bool) -> Self {
        self.mounts.push((
            host_path.to_path_buf(),
            container_path.to_string(),
            readonly,
        ));
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.into());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_string(), value.into());
        self
    }

    /// JSON merged onto the generated config, e.g. `json!({"linux": {"resources": {"memory_limit_in_bytes": 1<<28}}})`.
    pub fn patch(mut self, patch: Value) -> Self {
        self.patch = Some(patch);
        self
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "metadata": { "name": self.name },
            "image": { "image": self.image },
            "command": self.command,
            "args": self.args,
            "envs": self.env.iter().map(|(k, v)| json!({"key": k, "value": v})).collect::<Vec<_>>(),
            "log_path": self.log_path.clone().unwrap_or_else(|| format!("{}.log", self.name)),
            "tty": self.tty,
            "stdin": self.stdin,
            "mounts": self.mounts.iter().map(|(host, ctr, ro)| json!({
                "host_path": host, "container_path": ctr, "readonly": ro
            })).collect::<Vec<_>>(),
            "labels": self.labels,
            "annotations": self.annotations,
            "linux": {}
        });
        if let Some(dir) = &self.working_dir {
            v["working_dir"] = json!(dir);
        }
        if let Some(patch) = &self.patch {
            merge_json(&mut v, patch.clone());
        }
        v
    }

    /// Writes `<dir>/ctr-<name>.json` and returns its path.
    pub fn write_to(&self, dir: &Path) -> Result<PathBuf> {
        write_json(dir, &format!("ctr-{}.json", self.name), &self.to_json())
    }
}

pub fn write_json(dir: &Path, file_name: &str, value: &Value) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(file_name);
    let text = serde_json::to_string_pretty(value).context("serialising CRI config")?;
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// JSON merge patch semantics, minus deletion: objects merge recursively, other values replace.
pub fn merge_json(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (k, v) in patch {
                merge_json(base.entry(k).or_insert(Value::Null), v);
            }
        }
        (base, patch) => *base = patch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_config_defaults_log_dir_and_unique_uid() {
        let dir = tempfile::tempdir().unwrap();
        let a = PodConfig::new("p").annotation("k", "v");
        let b = PodConfig::new("p");
        assert_ne!(a.uid, b.uid);
        let path = a.write_to(dir.path()).unwrap();
        let v: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(v["metadata"]["name"], "p");
        assert_eq!(v["annotations"]["k"], "v");
        assert_eq!(v["log_directory"], json!(dir.path().join("logs/p")));
        assert!(dir.path().join("logs/p").is_dir());
        assert_eq!(
            v["linux"]["security_context"]["namespace_options"]["network"],
            0
        );
    }

    #[test]
    fn container_config_fields_and_patch() {
        let v = ContainerConfig::new("c", "img")
            .command(&["sh", "-c"])
            .args(&["echo hi"])
            .env("A", "1")
            .patch(json!({"linux": {"resources": {"memory_limit_in_bytes": 1024}}, "tty": true}))
            .to_json();
        assert_eq!(v["command"], json!(["sh", "-c"]));
        assert_eq!(v["envs"][0], json!({"key": "A", "value": "1"}));
        assert_eq!(v["log_path"], "c.log");
        assert_eq!(v["tty"], true);
        assert_eq!(v["linux"]["resources"]["memory_limit_in_bytes"], 1024);
    }
}
