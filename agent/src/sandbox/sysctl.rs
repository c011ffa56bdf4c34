//! The pod's sysctls (CRI `PodSandboxConfig.linux.sysctls`). Under runc they are set in the
//! pause container's namespaces, which the pod's containers share; here the VM's kernel
//! and its root namespaces are the pod's, so they are set there, before any container.
//! kubelet decides which sysctls a pod may have; the agent checks only that a name is a
//! path under /proc/sys and a value one line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Longest value written (the kernel's own limit for most is a page).
const MAX_VALUE_LEN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("sysctl name {name:?} is not valid (dot- or slash-separated words under /proc/sys)")]
    BadName { name: String },
    #[error("the value of sysctl {name} is not one line of at most {MAX_VALUE_LEN} bytes")]
    BadValue { name: String },
    #[error("failed to set sysctl {name} (writing {path})")]
    Write {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The file under `proc_sys` for sysctl `name`: `net.ipv4.ip_forward` or
/// `net/ipv4/ip_forward`. With slashes, dots stay (an interface named `eth0.100`).
pub fn path_of(proc_sys: &Path, name: &str) -> Result<PathBuf, SysctlError> {
    let bad = || SysctlError::BadName {
        name: name.to_string(),
    };
    let separator = if name.contains('/') { '/' } else { '.' };
    let mut path = proc_sys.to_path_buf();
    for word in name.split(separator) {
        let valid = !word.is_empty()
            && word != "."
            && word != ".."
            && word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+' | ':'));
        if !valid {
            return Err(bad());
        }
        path.push(word);
    }
    Ok(path)
}

/// Checks every sysctl first (a bad one sets none), then writes them under `proc_sys`.
pub fn apply(proc_sys: &Path, sysctls: &HashMap<String, String>) -> Result<(), SysctlError> {
    let mut writes = Vec::with_capacity(sysctls.len());
    for (name, value) in sysctls {
        if value.len() > MAX_VALUE_LEN || value.contains(['\n', '\0']) {
            return Err(SysctlError::BadValue { name: name.clone() });
        }
        writes.push((name, path_of(proc_sys, name)?, value));
    }
    // In name order, so a failure is the same one every time.
    writes.sort();
    for (name, path, value) in writes {
        std::fs::write(&path, value).map_err(|source| SysctlError::Write {
            name: name.clone(),
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_files_under_proc_sys() {
        let root = Path::new("/proc/sys");
        assert_eq!(
            path_of(root, "kernel.shm_rmid_forced").unwrap(),
            Path::new("/proc/sys/kernel/shm_rmid_forced")
        );
        assert_eq!(
            path_of(root, "net/ipv4/conf/eth0.100/forwarding").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
        for bad in [
            "",
            "kernel..x",
            "../etc/passwd",
            "net/../../x",
            "a b",
            "/abs",
            "x.",
        ] {
            assert!(path_of(root, bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_bad_entry_sets_nothing_and_good_ones_are_written() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("fs/mqueue")).unwrap();
        std::fs::create_dir_all(dir.path().join("kernel")).unwrap();
        let mut sysctls = HashMap::from([
            ("fs.mqueue.msg_max".to_string(), "100".to_string()),
            (
                "kernel.shm_rmid_forced".to_string(),
                "1\nkernel.evil=1".to_string(),
            ),
        ]);
        assert!(matches!(
            apply(dir.path(), &sysctls),
            Err(SysctlError::BadValue { .. })
        ));
        assert!(!dir.path().join("fs/mqueue/msg_max").exists());
        sysctls.insert("kernel.shm_rmid_forced".into(), "1".into());
        apply(dir.path(), &sysctls).unwrap();
        let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap();
        assert_eq!(read("fs/mqueue/msg_max"), "100");
        assert_eq!(read("kernel/shm_rmid_forced"), "1");
    }
}
