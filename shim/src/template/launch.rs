//! Starting a pod's sandbox from a template, falling back to a cold boot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{build_template, Template, TemplateError, TemplatePolicy, TemplateStore};
use crate::agent_client::AgentError;
use crate::error_chain;
use crate::rootfs::RootfsShare;
use crate::sandbox::{BootedVm, Sandbox, SandboxError, SandboxIdentity};
use crate::vm::{GuestMemory, Hypervisor, VmConfig};

/// How long a restored VM's agent may take to answer before the restore counts as failed.
/// It answers in tens of milliseconds; a slow answer means a broken guest, and a cold boot
/// is the better bet.
const RESTORE_AGENT_TIMEOUT: Duration = Duration::from_secs(15);

/// What a pod's sandbox is started from.
pub struct LaunchRequest {
    pub hypervisor: Arc<dyn Hypervisor>,
    pub store: TemplateStore,
    pub policy: TemplatePolicy,
    pub vm_config: VmConfig,
    pub identity: SandboxIdentity,
    pub boot_timeout: Duration,
}

/// A started sandbox and how it was started.
pub struct Launch {
    pub sandbox: Sandbox,
    /// True when restored from a template.
    pub restored: bool,
    /// A template rebuild started because the template was bad. The pod should abort it if
    /// it shuts down first (an aborted build leaves nothing behind).
    pub rebuild: Option<JoinHandle<()>>,
}

/// Starts the sandbox: from the template when the policy allows and one is (or can be made)
/// usable, else cold. A bad template never fails the pod: it boots cold, one warning says
/// why, and the template is rebuilt in the background.
pub async fn start_sandbox(
    request: LaunchRequest,
    make_share: &(dyn Fn() -> Box<dyn RootfsShare> + Send + Sync),
) -> Result<Launch, SandboxError> {
    if request.policy == TemplatePolicy::Off {
        let sandbox = cold(&request, make_share).await?;
        return Ok(Launch {
            sandbox,
            restored: false,
            rebuild: None,
        });
    }
    let key = match request
        .hypervisor
        .snapshot_fingerprint(&request.vm_config)
        .await
    {
        Ok(key) => key,
        Err(source) => {
            // Typically a missing kernel: the cold boot reports it with the file's name.
            info!(error = %error_chain(&source), "no template for this VM; booting cold");
            let sandbox = cold(&request, make_share).await?;
            return Ok(Launch {
                sandbox,
                restored: false,
                rebuild: None,
            });
        }
    };
    let template = match find_or_build(&request, &key).await {
        Ok(Some(template)) => template,
        Ok(None) => {
            let sandbox = cold(&request, make_share).await?;
            return Ok(Launch {
                sandbox,
                restored: false,
                rebuild: None,
            });
        }
        Err(damaged) => {
            warn!(
                error = %error_chain(&damaged),
                "VM template unusable; booting this pod cold and rebuilding the template in the background"
            );
            // Gone now, so that a pod starting before the rebuild is done builds it
            // instead of tripping over it again.
            if let Err(e) = request.store.remove(&key) {
                info!(error = %error_chain(&e), "cannot remove the damaged template");
            }
            let rebuild = spawn_rebuild(&request, key);
            let sandbox = cold(&request, make_share).await?;
            return Ok(Launch {
                sandbox,
                restored: false,
                rebuild: Some(rebuild),
            });
        }
    };

    let started = Instant::now();
    let clone_config = clone_of(&template, &request.vm_config);
    let restored = Sandbox::start(
        request.hypervisor.as_ref(),
        clone_config,
        request.identity.clone(),
        make_share(),
        RESTORE_AGENT_TIMEOUT,
    )
    .await;
    match restored {
        Ok(sandbox) => {
            request.store.clear_slow_restores(&key);
            info!(
                template = %template.dir.display(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "sandbox restored from template"
            );
            Ok(Launch {
                sandbox,
                restored: true,
                rebuild: None,
            })
        }
        Err(error) => match blame(&error) {
            Blame::Request => Err(error),
            Blame::Load if request.store.note_slow_restore(&key) < MAX_SLOW_RESTORES => {
                warn!(
                    error = %error_chain(&error),
                    "the restored VM did not answer in time (a busy node?); booting this pod cold and keeping the template"
                );
                let sandbox = cold(&request, make_share).await?;
                Ok(Launch {
                    sandbox,
                    restored: false,
                    rebuild: None,
                })
            }
            Blame::Load | Blame::Template => {
                warn!(
                    template = %template.dir.display(),
                    error = %error_chain(&error),
                    "restoring from the VM template failed; booting this pod cold and rebuilding the template in the background"
                );
                discard(&request.store, &template);
                let rebuild = spawn_rebuild(&request, key);
                let sandbox = cold(&request, make_share).await?;
                Ok(Launch {
                    sandbox,
                    restored: false,
                    rebuild: Some(rebuild),
                })
            }
        },
    }
}

/// `base` restored from `template`.
fn clone_of(template: &Template, base: &VmConfig) -> VmConfig {
    VmConfig {
        memory: GuestMemory::PrivateFile {
            path: template.memory_path(),
        },
        restore: Some(template.state_path()),
        ..base.clone()
    }
}

/// A VM restored from the template of `request`'s VM (built first when there is none),
/// given to no pod yet: what the warm pool keeps (`crate::pool`). `Ok(None)`: no usable
/// template, so nothing to keep (pods themselves still boot cold and rebuild it).
pub async fn restore_unattached(request: &LaunchRequest) -> Result<Option<BootedVm>, SandboxError> {
    if request.policy == TemplatePolicy::Off {
        return Ok(None);
    }
    let Ok(key) = request
        .hypervisor
        .snapshot_fingerprint(&request.vm_config)
        .await
    else {
        return Ok(None);
    };
    let Ok(Some(template)) = find_or_build(request, &key).await else {
        return Ok(None);
    };
    BootedVm::boot(
        request.hypervisor.as_ref(),
        clone_of(&template, &request.vm_config),
        RESTORE_AGENT_TIMEOUT,
    )
    .await
    .map(Some)
}

/// Clones of one template that did not answer in time, in a row, before it is taken
/// for damaged rather than the node for busy.
const MAX_SLOW_RESTORES: u32 = 3;

/// Whose fault a failed restore is, which decides what happens to the template.
#[derive(Debug, PartialEq, Eq)]
enum Blame {
    /// The pod's own request (the guest refused its identity, a host resource of the pod
    /// failed): a cold boot would fail the same way, and the template is fine.
    Request,
    /// The clone ran but did not answer in time: a loaded node, most likely. Boot cold
    /// this once; rebuilding would only add load.
    Load,
    /// QEMU refused the template or the clone died: discard and rebuild it.
    Template,
}

fn blame(error: &SandboxError) -> Blame {
    match error {
        SandboxError::Agent {
            source: AgentError::Status { .. },
            ..
        }
        | SandboxError::Resource(_)
        | SandboxError::Volume(_) => Blame::Request,
        SandboxError::Agent {
            source: AgentError::Timeout { .. },
            ..
        } => Blame::Load,
        SandboxError::StartVm { .. }
        | SandboxError::DiedDuringBoot { .. }
        | SandboxError::Agent { .. }
        | SandboxError::Container { .. }
        | SandboxError::ContainerExists { .. }
        | SandboxError::Rootfs(_)
        | SandboxError::StopVm { .. } => Blame::Template,
    }
}

async fn cold(
    request: &LaunchRequest,
    make_share: &(dyn Fn() -> Box<dyn RootfsShare> + Send + Sync),
) -> Result<Sandbox, SandboxError> {
    Sandbox::start(
        request.hypervisor.as_ref(),
        request.vm_config.clone(),
        request.identity.clone(),
        make_share(),
        request.boot_timeout,
    )
    .await
}

/// The usable template for `key`, built now when there is none. `Ok(None)`: boot cold
/// without a warning (building failed recently, already reported). `Err`: the template is
/// damaged.
async fn find_or_build(
    request: &LaunchRequest,
    key: &str,
) -> Result<Option<Template>, TemplateError> {
    match request.store.get(key) {
        Ok(Some(template)) => return Ok(Some(template)),
        Ok(None) => {}
        Err(damaged) => return Err(damaged),
    }
    if let Some(failure) = request.store.recent_failure(key) {
        info!(%failure, "the VM template failed to build recently; booting cold");
        return Ok(None);
    }
    info!("no VM template for this VM yet; building it");
    match build_template(
        request.hypervisor.as_ref(),
        &request.store,
        &request.vm_config,
        key,
        request.boot_timeout,
    )
    .await
    {
        Ok(template) => Ok(Some(template)),
        Err(error) => {
            warn!(error = %error_chain(&error), "cannot build the VM template; booting cold");
            Ok(None)
        }
    }
}

/// Removes a template that failed to restore, unless a rebuild already replaced it.
fn discard(store: &TemplateStore, template: &Template) {
    if let Ok(Some(current)) = store.get(&template.manifest.key) {
        if current.manifest.created_unix_s != template.manifest.created_unix_s {
            return;
        }
    }
    if let Err(e) = store.remove(&template.manifest.key) {
        info!(error = %error_chain(&e), "cannot remove the failed template");
    }
}

fn spawn_rebuild(request: &LaunchRequest, key: String) -> JoinHandle<()> {
    let hypervisor = Arc::clone(&request.hypervisor);
    let store = request.store.clone();
    let base = request.vm_config.clone();
    let boot_timeout = request.boot_timeout;
    tokio::spawn(async move {
        match build_template(hypervisor.as_ref(), &store, &base, &key, boot_timeout).await {
            Ok(template) => info!(dir = %template.dir.display(), "VM template rebuilt"),
            Err(e) => info!(error = %error_chain(&e), "VM template rebuild failed"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_of_the_template_itself_discard_it() {
        let refused = SandboxError::Agent {
            id: "p".into(),
            source: AgentError::Status {
                method: "CreateSandbox",
                code: ttrpc::Code::INVALID_ARGUMENT,
                message: "bad hostname".into(),
            },
        };
        assert_eq!(blame(&refused), Blame::Request);
        let slow = SandboxError::Agent {
            id: "p".into(),
            source: AgentError::Timeout {
                timeout: Duration::from_secs(10),
            },
        };
        assert_eq!(blame(&slow), Blame::Load);
        let died = SandboxError::DiedDuringBoot {
            id: "p".into(),
            exit: "exit 1".into(),
            console_tail: String::new(),
        };
        assert_eq!(blame(&died), Blame::Template);
    }
}
