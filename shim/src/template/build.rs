//! Building a template: boot a VM whose RAM is a shared file, wait for its agent, save it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, info_span, warn, Instrument};

use super::store::{state_digest, unix_now, FileStamp, Manifest, MANIFEST_FORMAT};
use super::{Template, TemplateError, TemplateStore};
use crate::sandbox::connect_agent;
use crate::vm::{GuestMemory, Hypervisor, NetNamespace, VmConfig};

/// The agent notices a host hang-up within its 50 ms poll; give it ample time so the saved
/// guest is an agent waiting for a connection, not one mid-way through the last.
const SETTLE_AFTER_DISCONNECT: Duration = Duration::from_millis(300);

/// Removes a build directory unless the build was published.
struct BuildDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Returns the template `key` for VMs like `base`, building it if no one has. Builders
/// queue on the store's lock, so concurrent callers build it once. A failed build is
/// recorded (see [`TemplateStore::recent_failure`]).
pub async fn build_template(
    hypervisor: &dyn Hypervisor,
    store: &TemplateStore,
    base: &VmConfig,
    key: &str,
    boot_timeout: Duration,
) -> Result<Template, TemplateError> {
    let _lock = store.lock().await?;
    if let Ok(Some(template)) = store.get(key) {
        return Ok(template);
    }
    let span = info_span!("template_build", key = &key[..key.len().min(12)]);
    let built = build_locked(hypervisor, store, base, key, boot_timeout)
        .instrument(span)
        .await;
    if let Err(e) = &built {
        store.record_failure(key, &crate::error_chain(e));
    }
    built
}

async fn build_locked(
    hypervisor: &dyn Hypervisor,
    store: &TemplateStore,
    base: &VmConfig,
    key: &str,
    boot_timeout: Duration,
) -> Result<Template, TemplateError> {
    let started = Instant::now();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TemplateError::Io { path, source }
    };
    let mut build_dir = BuildDir {
        path: store.build_dir(key),
        keep: false,
    };
    // A leftover of a builder that died holding the lock.
    let _ = std::fs::remove_dir_all(&build_dir.path);
    std::fs::create_dir_all(&build_dir.path).map_err(io(&build_dir.path))?;

    let id = super::leftovers::build_vm_name(key);
    let vms_dir = base.state_dir.parent().unwrap_or(store.root());
    let state_dir = vms_dir.join(&id);
    let _ = std::fs::remove_dir_all(&state_dir);
    let memory = TemplateStore::memory_file(&build_dir.path);
    let state = TemplateStore::state_file(&build_dir.path);
    let config = VmConfig {
        id: id.clone(),
        state_dir,
        // The template's NICs need taps somewhere; they go nowhere and die with QEMU. A
        // clone's taps are its own pod's.
        netns: NetNamespace::New,
        memory: GuestMemory::SharedFile {
            path: memory.clone(),
        },
        restore: None,
        // Shared by every pod of this config, so in none of their cgroups.
        cgroup: Vec::new(),
        ..base.clone()
    };
    let vm = hypervisor
        .start(config)
        .await
        .map_err(|source| TemplateError::BootVm {
            id: id.clone(),
            source,
        })?;
    let booted = connect_agent(vm.as_ref(), boot_timeout).await;
    let saved = match booted {
        Ok(agent) => {
            drop(agent);
            tokio::time::sleep(SETTLE_AFTER_DISCONNECT).await;
            vm.save_snapshot(&state)
                .await
                .map_err(|source| TemplateError::Save {
                    id: id.clone(),
                    source,
                })
        }
        Err(source) => Err(TemplateError::Agent {
            id: id.clone(),
            source: Box::new(source),
        }),
    };
    let accel = vm.accel();
    // The guest is paused (or broken): no need to wait for it to power off.
    if let Err(e) = vm.stop(Duration::ZERO).await {
        warn!(error = %e, "cannot stop the template VM");
    }
    drop(vm);
    saved?;
    // Built by a jailed QEMU that owned it; from now on no QEMU may write it, and clones'
    // QEMUs (each its own uid, all in the jail group) may read it.
    std::os::unix::fs::chown(&memory, Some(0), Some(base.jail.gid())).map_err(io(&memory))?;
    std::fs::set_permissions(&memory, std::fs::Permissions::from_mode(0o440))
        .map_err(io(&memory))?;

    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        key: key.to_owned(),
        created_unix_s: unix_now(),
        qemu: base.qemu.clone(),
        qemu_version: qemu_version(&base.qemu).await,
        kernel: base.kernel.clone(),
        initramfs: base.initramfs.clone(),
        cpus: base.cpus,
        memory_mib: base.memory_mib,
        accel: accel.to_string(),
        build_ms: started.elapsed().as_millis() as u64,
        memory: FileStamp::of(&memory).map_err(io(&memory))?,
        state: FileStamp::of(&state).map_err(io(&state))?,
        state_sha256: state_digest(&state).map_err(io(&state))?,
    };
    let manifest_path = build_dir.path.join("manifest.json");
    let text =
        serde_json::to_vec_pretty(&manifest).map_err(|source| TemplateError::WriteManifest {
            path: manifest_path.clone(),
            source,
        })?;
    std::fs::write(&manifest_path, text).map_err(io(&manifest_path))?;
    let template = store.publish(key, &build_dir.path)?;
    build_dir.keep = true;
    store.remove_superseded(&template.manifest);
    info!(
        dir = %template.dir.display(),
        %accel,
        build_ms = template.manifest.build_ms,
        "VM template built"
    );
    Ok(template)
}

/// The first line of `qemu --version`, for the manifest (the fingerprint already covers
/// the binary itself).
async fn qemu_version(qemu: &Path) -> String {
    match tokio::process::Command::new(qemu)
        .arg("--version")
        .output()
        .await
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
        Err(e) => format!("unknown ({e})"),
    }
}
