//! Turns the host's OCI JSON into what libcontainer runs in the guest, and checks early what
//! would otherwise surface only as a failed exec (missing binary, missing cwd).

use std::path::{Component, Path, PathBuf};

use crate::volumes::{GuestDevice, ResolvedVolume};
use oci_spec::runtime::{
    Linux, LinuxDeviceType, LinuxNamespace, LinuxNamespaceType, Mount, MountBuilder, Process,
    RootBuilder, Spec,
};

/// Errors in a container spec or process.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("the OCI JSON is not valid")]
    Parse { source: serde_json::Error },
    #[error("id {id:?} is not valid: use 1-128 letters, digits, '_', '-' or '.', not starting with '.' or '-'")]
    InvalidId { id: String },
    #[error("the spec has no process")]
    NoProcess,
    #[error("the spec has no linux section")]
    NoLinux,
    #[error("the process has no arguments")]
    NoArgs,
    #[error("executable {name:?} was not found in the container (PATH {search_path:?})")]
    ExecutableNotFound { name: String, search_path: String },
    #[error("{path} in the container is not an executable file")]
    NotExecutable { path: PathBuf },
    #[error("working directory {cwd} does not exist in the container")]
    CwdMissing { cwd: PathBuf },
    #[error("working directory {cwd} is not an absolute path")]
    CwdRelative { cwd: PathBuf },
    #[error("joining an existing user namespace ({path}) is not supported in the guest")]
    UserNamespacePath { path: PathBuf },
    #[error("failed to build the spec")]
    Build { source: oci_spec::OciSpecError },
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Accepts ids that are safe as a single path component.
pub fn validate_id(id: &str) -> Result<(), SpecError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with(['.', '-'])
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::InvalidId { id: id.to_string() })
    }
}

/// What the guest needs to know besides the spec itself.
pub struct GuestSettings<'a> {
    pub rootfs: &'a Path,
    pub readonly_rootfs: bool,
    pub terminal: bool,
    /// Relative cgroup path of the container inside the guest hierarchy.
    pub cgroups_path: &'a Path,
    /// The pod's resolv.conf, bind-mounted when the spec does not mount one.
    pub resolv_conf: Option<&'a Path>,
    /// Files copied from the host, bind-mounted at their destination:
    /// (destination in the container, file in the guest, read-only).
    pub files: &'a [(PathBuf, PathBuf, bool)],
    /// The pod's volumes, bind-mounted at their destination.
    pub volumes: &'a [ResolvedVolume],
    /// Host block devices plugged into the VM: the spec's entries get the guest's numbers.
    pub devices: &'a [GuestDevice],
}

/// Parses config.json and adapts it to the guest:
/// - root.path is the rootfs the agent mounted;
/// - process.terminal follows the requested stdio;
/// - cgroupsPath is the agent's (host cgroup paths mean nothing in the guest);
/// - the VM is the pod: the network namespace and the IPC, UTS and PID namespaces the host
///   asks to join by path (the pause container's) are the VM's own; mount/cgroup with a
///   path get a fresh namespace, since the host's namespace files do not exist in the
///   guest. Joining a user namespace is refused.
pub fn prepare_container_spec(
    json: &[u8],
    settings: &GuestSettings<'_>,
) -> Result<Spec, SpecError> {
    let mut spec: Spec =
        serde_json::from_slice(json).map_err(|source| SpecError::Parse { source })?;
    // Read-only when the pod asks (CRI's readOnlyRootFilesystem) or when the rootfs has
    // no writable layer.
    let asked_readonly = spec
        .root()
        .as_ref()
        .and_then(|root| root.readonly())
        .unwrap_or(false);
    let root = RootBuilder::default()
        .path(settings.rootfs)
        .readonly(settings.readonly_rootfs || asked_readonly)
        .build()
        .map_err(|source| SpecError::Build { source })?;
    spec.set_root(Some(root));
    let process = spec.process_mut().as_mut().ok_or(SpecError::NoProcess)?;
    process.set_terminal(Some(settings.terminal));
    if process.args().as_ref().is_none_or(|args| args.is_empty()) {
        return Err(SpecError::NoArgs);
    }
    let linux = spec.linux_mut().as_mut().ok_or(SpecError::NoLinux)?;
    linux.set_cgroups_path(Some(settings.cgroups_path.to_path_buf()));
    let propagation = linux
        .rootfs_propagation()
        .as_deref()
        .map(rootfs_propagation_for_libcontainer);
    linux.set_rootfs_propagation(propagation);
    let namespaces = guest_namespaces(linux.namespaces().as_deref().unwrap_or_default())?;
    linux.set_namespaces(Some(namespaces));
    renumber_devices(linux, settings.devices);
    for (destination, source, readonly) in settings.files {
        let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
        if *readonly {
            options.push("ro".to_string());
        }
        add_bind_mount(&mut spec, destination, source, options)?;
    }
    for volume in settings.volumes {
        add_bind_mount(
            &mut spec,
            &volume.destination,
            &volume.source,
            volume.options.clone(),
        )?;
    }
    if let Some(resolv) = settings.resolv_conf {
        add_resolv_conf(&mut spec, resolv)?;
    }
    Ok(spec)
}

/// containerd (as runc accepts) writes `rslave`/`rshared` for a volume with HostToContainer
/// or Bidirectional propagation; libcontainer knows only the spec's `slave`/`shared`/
/// `private`/`unbindable` and fails the whole rootfs on the others. It applies the root's
/// propagation recursively anyway, so the recursive names mean the plain ones.
fn rootfs_propagation_for_libcontainer(propagation: &str) -> String {
    match propagation {
        "rslave" => "slave",
        "rshared" => "shared",
        "rprivate" => "private",
        "runbindable" => "unbindable",
        other => other,
    }
    .to_string()
}

fn guest_namespaces(requested: &[LinuxNamespace]) -> Result<Vec<LinuxNamespace>, SpecError> {
    let mut kept = Vec::new();
    for namespace in requested {
        let typ = namespace.typ();
        match (typ, namespace.path()) {
            // The VM is the pod: joining the pod's network, IPC, UTS or PID namespace
            // (CRI passes the pause container's by path) means sharing the VM's. For PID,
            // the agent then plays pause's part as init, so the container's process is not
            // a namespace init and SIGTERM works on it as it does under runc.
            (LinuxNamespaceType::Network, _)
            | (LinuxNamespaceType::Ipc, Some(_))
            | (LinuxNamespaceType::Uts, Some(_))
            | (LinuxNamespaceType::Pid, Some(_)) => continue,
            (LinuxNamespaceType::User, Some(path)) => {
                return Err(SpecError::UserNamespacePath { path: path.clone() })
            }
            (_, Some(path)) => {
                tracing::debug!(namespace = %typ, path = %path.display(), "creating a fresh namespace instead of joining a host one");
            }
            (_, None) => {}
        }
        let mut fresh = namespace.clone();
        fresh.set_path(None);
        if !kept.iter().any(|k: &LinuxNamespace| k.typ() == typ) {
            kept.push(fresh);
        }
    }
    if !kept.iter().any(|k| k.typ() == LinuxNamespaceType::Mount) {
        let mut mount = LinuxNamespace::default();
        mount.set_typ(LinuxNamespaceType::Mount);
        kept.push(mount);
    }
    Ok(kept)
}

/// Gives each plugged block device's spec entry, and the device cgroup rules naming its
/// host numbers, the guest disk's numbers (the host's mean another device, or none, here).
fn renumber_devices(linux: &mut Linux, devices: &[GuestDevice]) {
    if devices.is_empty() {
        return;
    }
    if let Some(entries) = linux.devices_mut() {
        for entry in entries.iter_mut() {
            let plugged = devices.iter().find(|d| {
                entry.typ() == LinuxDeviceType::B
                    && entry.path() == &d.path
                    && (entry.major(), entry.minor()) == (d.host.0 as i64, d.host.1 as i64)
            });
            if let Some(device) = plugged {
                entry.set_major(device.guest.0 as i64);
                entry.set_minor(device.guest.1 as i64);
            }
        }
    }
    let rules = linux
        .resources_mut()
        .as_mut()
        .and_then(|r| r.devices_mut().as_mut());
    for rule in rules.into_iter().flatten() {
        let host = (rule.major(), rule.minor());
        let plugged = devices.iter().find(|d| {
            rule.typ() == Some(LinuxDeviceType::B)
                && host == (Some(d.host.0 as i64), Some(d.host.1 as i64))
        });
        if let Some(device) = plugged {
            rule.set_major(Some(device.guest.0 as i64));
            rule.set_minor(Some(device.guest.1 as i64));
        }
    }
}

/// Bind-mounts a guest path (a file copied from the host, a volume), replacing whatever the
/// spec mounted there.
fn add_bind_mount(
    spec: &mut Spec,
    destination: &Path,
    source: &Path,
    options: Vec<String>,
) -> Result<(), SpecError> {
    let mounts = spec.mounts_mut().get_or_insert_with(Vec::new);
    mounts.retain(|m| m.destination() != destination);
    let mount: Mount = MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(options)
        .build()
        .map_err(|source| SpecError::Build { source })?;
    mounts.push(mount);
    Ok(())
}

fn add_resolv_conf(spec: &mut Spec, resolv: &Path) -> Result<(), SpecError> {
    let target = Path::new("/etc/resolv.conf");
    let mounts = spec.mounts_mut().get_or_insert_with(Vec::new);
    if mounts.iter().any(|m| m.destination() == target) {
        return Ok(());
    }
    let mount: Mount = MountBuilder::default()
        .destination(target)
        .typ("bind")
        .source(resolv)
        .options(vec![
            "rbind".to_string(),
            "rprivate".to_string(),
            "nosuid".to_string(),
            "nodev".to_string(),
        ])
        .build()
        .map_err(|source| SpecError::Build { source })?;
    mounts.push(mount);
    Ok(())
}

/// Parses an exec's process.json and sets its terminal flag.
pub fn prepare_exec_process(json: &[u8], terminal: bool) -> Result<Process, SpecError> {
    let mut process: Process =
        serde_json::from_slice(json).map_err(|source| SpecError::Parse { source })?;
    process.set_terminal(Some(terminal));
    if process.args().as_ref().is_none_or(|args| args.is_empty()) {
        return Err(SpecError::NoArgs);
    }
    Ok(process)
}

/// Checks that the process's executable and working directory exist in the filesystem seen
/// at `root` (the rootfs, or /proc/<pid>/root of a running container). `mounted` are mount
/// destinations that will hide parts of `root` (their contents cannot be checked).
pub fn check_process(root: &Path, process: &Process, mounted: &[PathBuf]) -> Result<(), SpecError> {
    let cwd = process.cwd();
    if !cwd.is_absolute() {
        return Err(SpecError::CwdRelative { cwd: cwd.clone() });
    }
    let under_mount = |path: &Path| {
        mounted
            .iter()
            .any(|m| m != Path::new("/") && path.starts_with(m))
    };
    if !under_mount(cwd) && !resolve_in_root(root, cwd).is_some_and(|p| p.is_dir()) {
        return Err(SpecError::CwdMissing { cwd: cwd.clone() });
    }
    let args = process.args().as_deref().unwrap_or_default();
    let name = args.first().ok_or(SpecError::NoArgs)?;
    let search_path = process
        .env()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
        .to_string();
    let candidates: Vec<PathBuf> = if name.contains('/') {
        vec![cwd.join(name)]
    } else {
        search_path
            .split(':')
            .filter(|dir| !dir.is_empty())
            .map(|dir| Path::new(dir).join(name))
            .collect()
    };
    for candidate in candidates {
        if under_mount(&candidate) {
            return Ok(());
        }
        if let Some(found) = resolve_in_root(root, &candidate) {
            if is_executable_file(&found) {
                return Ok(());
            }
            if name.contains('/') {
                return Err(SpecError::NotExecutable { path: candidate });
            }
        }
    }
    Err(SpecError::ExecutableNotFound {
        name: name.clone(),
        search_path,
    })
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Resolves `path` as if `root` were `/`, following symlinks (absolute ones relative to
/// `root`) without ever leaving `root`. Returns the host path if it exists.
pub fn resolve_in_root(root: &Path, path: &Path) -> Option<PathBuf> {
    let mut pending: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut links_followed = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let mut host = root.to_path_buf();
        host.extend(&resolved);
        host.push(&name);
        let meta = std::fs::symlink_metadata(&host).ok()?;
        if meta.file_type().is_symlink() {
            links_followed += 1;
            if links_followed > 40 {
                return None;
            }
            let target = std::fs::read_link(&host).ok()?;
            if target.is_absolute() {
                resolved.clear();
            }
            pending.extend(target.components().rev().filter_map(|c| match c {
                Component::Normal(name) => Some(name.to_os_string()),
                Component::ParentDir => Some("..".into()),
                _ => None,
            }));
        } else {
            resolved.push(name);
        }
    }
    let mut host = root.to_path_buf();
    host.extend(&resolved);
    Some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_json(namespaces: &str) -> Vec<u8> {
        format!(
            r#"{{"ociVersion":"1.0.2","process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}}},"root":{{"path":"x"}},
               "linux":{{"namespaces":{namespaces}}}}}"#
        )
        .into_bytes()
    }

    fn settings(root: &Path) -> GuestSettings<'_> {
        GuestSettings {
            rootfs: root,
            readonly_rootfs: false,
            terminal: true,
            cgroups_path: Path::new("/spry/c1"),
            resolv_conf: Some(Path::new("/run/spry/sandbox/resolv.conf")),
            files: &[],
            volumes: &[],
            devices: &[],
        }
    }

    #[test]
    fn a_readonly_root_asked_for_stays_readonly() {
        let dir = tempfile::tempdir().unwrap();
        let asked = String::from_utf8(spec_json("[]")).unwrap().replace(
            r#""root":{"path":"x"}"#,
            r#""root":{"path":"x","readonly":true}"#,
        );
        let spec = prepare_container_spec(asked.as_bytes(), &settings(dir.path())).unwrap();
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        let spec = prepare_container_spec(&spec_json("[]"), &settings(dir.path())).unwrap();
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(false));
        let mut no_writable_layer = settings(dir.path());
        no_writable_layer.readonly_rootfs = true;
        let spec = prepare_container_spec(&spec_json("[]"), &no_writable_layer).unwrap();
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
    }

    #[test]
    fn plugged_block_devices_get_the_guest_numbers_in_entries_and_rules() {
        let json = br#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"x"},
            "linux":{"devices":[{"path":"/dev/xvda","type":"b","major":7,"minor":3},
                                {"path":"/dev/fuse","type":"c","major":10,"minor":229}],
                     "resources":{"devices":[{"allow":false,"access":"rwm"},
                                             {"allow":true,"type":"b","major":7,"minor":3,"access":"rwm"},
                                             {"allow":true,"type":"b","major":7,"minor":4,"access":"r"}]}}}"#;
        let dir = tempfile::tempdir().unwrap();
        let devices = [GuestDevice {
            path: "/dev/xvda".into(),
            host: (7, 3),
            guest: (8, 16),
        }];
        let mut s = settings(dir.path());
        s.devices = &devices;
        let spec = prepare_container_spec(json, &s).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let entries = linux.devices().as_ref().unwrap();
        assert_eq!((entries[0].major(), entries[0].minor()), (8, 16));
        assert_eq!((entries[1].major(), entries[1].minor()), (10, 229));
        let rules = linux
            .resources()
            .as_ref()
            .unwrap()
            .devices()
            .as_ref()
            .unwrap();
        assert_eq!((rules[1].major(), rules[1].minor()), (Some(8), Some(16)));
        // Another host device's rule is left alone, as is the deny-all.
        assert_eq!((rules[2].major(), rules[2].minor()), (Some(7), Some(4)));
        assert_eq!(rules[0].major(), None);
    }

    #[test]
    fn containerds_recursive_rootfs_propagation_reaches_libcontainer_as_the_plain_name() {
        let dir = tempfile::tempdir().unwrap();
        let with = |propagation: &str| {
            String::from_utf8(spec_json("[]")).unwrap().replace(
                r#""linux":{"#,
                &format!(r#""linux":{{"rootfsPropagation":"{propagation}","#),
            )
        };
        for (asked, given) in [
            ("rslave", "slave"),
            ("rshared", "shared"),
            ("rprivate", "private"),
            ("runbindable", "unbindable"),
            ("slave", "slave"),
        ] {
            let spec =
                prepare_container_spec(with(asked).as_bytes(), &settings(dir.path())).unwrap();
            let linux = spec.linux().as_ref().unwrap();
            assert_eq!(
                linux.rootfs_propagation().as_deref(),
                Some(given),
                "{asked}"
            );
        }
        let spec = prepare_container_spec(&spec_json("[]"), &settings(dir.path())).unwrap();
        assert_eq!(spec.linux().as_ref().unwrap().rootfs_propagation(), &None);
    }

    #[test]
    fn every_mount_option_the_shim_reports_is_one_libcontainer_applies() {
        use libcontainer::syscall::linux::{MountOption, MountRecursive};
        let known = MountOption::known_options();
        for option in spry_proto::GUEST_MOUNT_OPTIONS {
            assert!(
                known.iter().any(|k| k == option) || option.parse::<MountRecursive>().is_ok(),
                "{option}"
            );
        }
    }

    #[test]
    fn ids_must_be_single_safe_path_components() {
        assert!(validate_id("abc-1.2_x").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "-x", &"a".repeat(129)] {
            assert!(
                matches!(validate_id(bad), Err(SpecError::InvalidId { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_namespace_types_are_rejected_with_the_name() {
        let err = prepare_container_spec(
            &spec_json(r#"[{"type":"bogus"}]"#),
            &settings(Path::new("/r")),
        )
        .unwrap_err();
        assert!(matches!(err, SpecError::Parse { .. }));
        assert!(std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains("bogus"));
    }

    #[test]
    fn the_vm_is_the_pod_namespace() {
        let json = spec_json(
            r#"[{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1"},
                {"type":"ipc","path":"/proc/9/ns/ipc"},{"type":"uts","path":"/proc/9/ns/uts"},
                {"type":"cgroup","path":"/proc/9/ns/cgroup"}]"#,
        );
        let spec = prepare_container_spec(&json, &settings(Path::new("/r"))).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let types: Vec<_> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| (n.typ(), n.path().clone()))
            .collect();
        assert_eq!(
            types,
            vec![
                (LinuxNamespaceType::Pid, None),
                (LinuxNamespaceType::Cgroup, None),
                (LinuxNamespaceType::Mount, None)
            ]
        );
        assert_eq!(linux.cgroups_path().as_deref(), Some(Path::new("/spry/c1")));
        assert_eq!(spec.root().as_ref().unwrap().path(), Path::new("/r"));
        assert_eq!(spec.process().as_ref().unwrap().terminal(), Some(true));
        let resolv = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/etc/resolv.conf"));
        assert_eq!(
            resolv.unwrap().source().as_deref(),
            Some(Path::new("/run/spry/sandbox/resolv.conf"))
        );
    }

    #[test]
    fn joining_a_user_namespace_is_refused() {
        let json = spec_json(r#"[{"type":"user","path":"/proc/1/ns/user"}]"#);
        assert!(matches!(
            prepare_container_spec(&json, &settings(Path::new("/r"))),
            Err(SpecError::UserNamespacePath { .. })
        ));
    }

    #[test]
    fn executables_resolve_through_symlinks_inside_the_root() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("bin")).unwrap();
        std::fs::create_dir_all(r.join("work")).unwrap();
        std::fs::write(r.join("bin/busybox"), b"").unwrap();
        std::fs::set_permissions(
            r.join("bin/busybox"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        // Absolute link: must resolve inside the root, not on the host.
        symlink("/bin/busybox", r.join("bin/sh")).unwrap();
        std::fs::write(r.join("bin/data"), b"").unwrap();
        let process = |args: &[&str], cwd: &str| -> Process {
            serde_json::from_value(serde_json::json!({"args": args, "cwd": cwd, "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}})).unwrap()
        };
        assert!(check_process(r, &process(&["sh"], "/work"), &[]).is_ok());
        assert!(check_process(r, &process(&["/bin/sh", "-c", "x"], "/"), &[]).is_ok());
        assert!(matches!(
            check_process(r, &process(&["nope"], "/"), &[]),
            Err(SpecError::ExecutableNotFound { ref name, .. }) if name == "nope"
        ));
        assert!(matches!(
            check_process(r, &process(&["/bin/data"], "/"), &[]),
            Err(SpecError::NotExecutable { .. })
        ));
        assert!(matches!(
            check_process(r, &process(&["sh"], "/missing"), &[]),
            Err(SpecError::CwdMissing { .. })
        ));
        // A cwd under a volume mount cannot be checked before the mount exists.
        assert!(check_process(r, &process(&["sh"], "/data/x"), &[PathBuf::from("/data")]).is_ok());
        assert_eq!(
            resolve_in_root(r, Path::new("/bin/../bin/sh")),
            Some(r.join("bin/busybox"))
        );
    }
}
