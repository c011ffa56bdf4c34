//! `spry upgrade`: swap one container of a running pod to a new image through CRI, the
//! way that keeps downtime short and can go back:
//! pull (old container serving) → create the new container from the old one's config
//! (a Spry pod hot-plugs its rootfs into the running VM) → stop the old one → start the
//! new one → wait until it is ready. If it exits or is not ready in time, it is stopped
//! and removed and the old image is started again (rollback).
//!
//! Works for any CRI runtime (runc pods too); the pod, its IP, volumes and other
//! containers stay. On a lazy-pulling snapshotter the new image is warmed after the pull
//! (`warm.rs`); a Spry container's layer image is built before the stop (`layers.rs`).
//! `plan.rs` decides, `ready.rs` probes, this file drives.

mod layers;
mod plan;
mod ready;
mod warm;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use spry_proto::cri::ContainerConfig;

use crate::cri::{CriClient, CriError};
pub use layers::{LayerPrebuild, PrebuildError};
pub use ready::{NotReady, Readiness};
pub use warm::{Warm, WarmError};

/// What to upgrade and how to tell it worked.
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    /// A ready pod's id, unique id prefix (4+ characters) or name.
    pub pod: String,
    pub namespace: Option<String>,
    pub container: String,
    pub image: String,
    pub probe: Probe,
    /// How long the new container (and a rollback) may take to become ready.
    pub timeout: Duration,
    /// How long a stopped container gets between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Say what would happen; change nothing.
    pub dry_run: bool,
    /// Warm the new image after the pull when the container is on a lazy snapshotter.
    pub warm: Option<Warm>,
    /// Build a Spry container's layer image before the stop.
    pub layers: Option<LayerPrebuild>,
}

/// The readiness check asked for on the command line.
#[derive(Debug, Clone)]
pub enum Probe {
    Running,
    Tcp(u16),
    Log(regex::Regex),
}

/// Why an upgrade did not happen, with the exit code `spry upgrade` reports.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("no ready pod {pod:?} (give its id, an id prefix or its name; see `crictl pods`)")]
    UnknownPod { pod: String },
    #[error("{pod:?} names several pods ({}): give the id or --namespace", matches.join(", "))]
    AmbiguousPod { pod: String, matches: Vec<String> },
    #[error("pod {pod} runs no container {container:?} (running: {})", running.join(", "))]
    UnknownContainer {
        pod: String,
        container: String,
        running: Vec<String>,
    },
    #[error("container {container:?} of pod {pod} is kubelet's: change its image in the pod spec (kubectl set image), kubelet swaps it in the same sandbox")]
    KubeletManaged { pod: String, container: String },
    #[error("the pod has no IP for --ready-tcp (a host-network or network-less pod?)")]
    NoPodIp,
    #[error("cannot pull {image}; nothing was changed")]
    Pull {
        image: String,
        #[source]
        source: CriError,
    },
    #[error("{step} failed; nothing was changed")]
    BeforeStop {
        step: &'static str,
        #[source]
        source: CriError,
    },
    #[error("the new container ({image}) failed: {cause}; rolled back: {old_image} runs again as container {restored}")]
    RolledBack {
        image: String,
        cause: String,
        old_image: String,
        restored: String,
    },
    #[error("the new container ({image}) failed: {cause}; the rollback to {old_image} failed too: {rollback}. The pod lacks container {container:?}: create it again")]
    RollbackFailed {
        image: String,
        cause: String,
        old_image: String,
        rollback: String,
        container: String,
    },
    #[error("CRI {step} failed")]
    Cri {
        step: &'static str,
        #[source]
        source: CriError,
    },
}

impl UpgradeError {
    /// `spry upgrade`'s exit code: 2 bad input, 3 the image cannot be had (nothing
    /// changed), 4 rolled back (the old image serves again), 5 the rollback failed too,
    /// 1 any other runtime failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::UnknownPod { .. }
            | Self::AmbiguousPod { .. }
            | Self::UnknownContainer { .. }
            | Self::KubeletManaged { .. }
            | Self::NoPodIp => 2,
            Self::Pull { .. } => 3,
            Self::RolledBack { .. } => 4,
            Self::RollbackFailed { .. } => 5,
            Self::BeforeStop { .. } | Self::Cri { .. } => 1,
        }
    }
}

/// What a finished upgrade did, phase by phase.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub old_container: String,
    pub new_container: String,
    pub phases: Vec<(&'static str, Duration)>,
    /// From stopping the old container to the new one being ready.
    pub downtime: Duration,
}

/// Runs the upgrade, telling `say` each step as it ends.
pub async fn upgrade(
    cri: &CriClient,
    request: &UpgradeRequest,
    say: &mut dyn FnMut(String),
) -> Result<Report, UpgradeError> {
    let cri_step = |step| move |source| UpgradeError::Cri { step, source };
    let started = Instant::now();
    let pods = cri
        .list_pod_sandboxes()
        .await
        .map_err(cri_step("ListPodSandbox"))?;
    let pod = plan::find_pod(&pods, &request.pod, request.namespace.as_deref())?.clone();
    let (pod_status, sandbox) = cri
        .pod_sandbox(&pod.id)
        .await
        .map_err(cri_step("PodSandboxStatus"))?;
    let containers = cri
        .list_containers(&pod.id)
        .await
        .map_err(cri_step("ListContainers"))?;
    let old = plan::find_container(&containers, &pod.id, &request.container)?.clone();
    if plan::kubelet_managed(&old) {
        return Err(UpgradeError::KubeletManaged {
            pod: pod.id.clone(),
            container: request.container.clone(),
        });
    }
    let old_details = cri
        .container(&old.id)
        .await
        .map_err(cri_step("ContainerStatus"))?;
    let old_config = old_details.config;
    let warm = request
        .warm
        .as_ref()
        .filter(|w| w.applies_to(old_details.snapshotter.as_deref()));
    let attempt = plan::next_attempt(&containers, &request.container);
    let new_config = plan::successor(&old_config, &request.image, attempt);
    let readiness = |config: &ContainerConfig| -> Result<Readiness, UpgradeError> {
        Ok(match &request.probe {
            Probe::Running => Readiness::Running,
            Probe::Tcp(port) => {
                let ip = pod_status
                    .network
                    .ip
                    .parse()
                    .map_err(|_| UpgradeError::NoPodIp)?;
                Readiness::Tcp { ip, port: *port }
            }
            Probe::Log(pattern) => Readiness::Log {
                pattern: pattern.clone(),
                file: PathBuf::from(&sandbox.log_directory).join(&config.log_path),
            },
        })
    };
    let ready_new = readiness(&new_config)?;
    let old_image = old_config.image.image.clone();
    say(format!(
        "pod {} ({}), container {:?} {} (attempt {}): {} -> {} as attempt {attempt}, ready when {ready_new}",
        pod.id,
        pod.metadata.name,
        request.container,
        short(&old.id),
        old.metadata.attempt,
        old_image,
        request.image,
    ));
    let mut report = Report {
        old_container: old.id.clone(),
        ..Default::default()
    };
    let phase =
        |report: &mut Report, name: &'static str, since: Instant, say: &mut dyn FnMut(String)| {
            let took = since.elapsed();
            report.phases.push((name, took));
            say(format!("{name:<8} {:>8.3} s", took.as_secs_f64()));
        };
    phase(&mut report, "resolve", started, say);
    if let Some(warm) = warm {
        say(format!(
            "snapshotter {}: the new image is warmed (its prioritized files fetched) before the stop",
            warm.snapshotter
        ));
    }
    if request.dry_run {
        say("dry run: nothing changed".to_owned());
        return Ok(report);
    }

    // While the old container keeps serving.
    let pulling = Instant::now();
    let present = cri
        .image_id(&request.image)
        .await
        .map_err(|source| UpgradeError::Pull {
            image: request.image.clone(),
            source,
        })?;
    if present.is_none() {
        cri.pull_image(&request.image, &sandbox)
            .await
            .map_err(|source| UpgradeError::Pull {
                image: request.image.clone(),
                source,
            })?;
    }
    phase(&mut report, "pull", pulling, say);
    if let Some(warm) = warm {
        let warming = Instant::now();
        if let Err(error) = warm.run(&request.image).await {
            say(format!(
                "warm-up failed ({}); the new container fetches its files on demand",
                crate::error_chain(&error)
            ));
        }
        phase(&mut report, "warm", warming, say);
    }
    let creating = Instant::now();
    let new_id = cri
        .create_container(&pod.id, &new_config, &sandbox)
        .await
        .map_err(|source| UpgradeError::BeforeStop {
            step: "creating the new container",
            source,
        })?;
    report.new_container = new_id.clone();
    phase(&mut report, "create", creating, say);
    let layer_image = match &request.layers {
        Some(prebuild) => prebuild_layers(cri, prebuild, &new_id, &mut report, say).await,
        None => None,
    };

    // Downtime from here.
    let stopping = Instant::now();
    if let Err(source) = cri.stop_container(&old.id, request.grace).await {
        // The old one may still serve: the new one goes, nothing else changed.
        let _ = cri.remove_container(&new_id).await;
        return Err(UpgradeError::BeforeStop {
            step: "stopping the old container",
            source,
        });
    }
    phase(&mut report, "stop", stopping, say);
    let starting = Instant::now();
    let started_new = cri.start_container(&new_id).await;
    // The shim holds the image now (or the start failed): ours is no longer needed.
    if let Some(image) = layer_image {
        image.release();
    }
    let outcome = match started_new {
        Ok(()) => {
            phase(&mut report, "start", starting, say);
            let waiting = Instant::now();
            let ready = ready::wait_ready(cri, &new_id, &ready_new, request.timeout).await;
            if ready.is_ok() {
                phase(&mut report, "ready", waiting, say);
            }
            ready.map(drop).map_err(|e| e.to_string())
        }
        Err(error) => Err(format!("it could not start: {error}")),
    };
    match outcome {
        Ok(()) => {
            report.downtime = stopping.elapsed();
            say(format!(
                "upgraded: container {} runs {}; downtime {:.3} s, total {:.3} s",
                short(&new_id),
                request.image,
                report.downtime.as_secs_f64(),
                started.elapsed().as_secs_f64()
            ));
            Ok(report)
        }
        Err(cause) => {
            say(format!(
                "the new container failed: {cause}; rolling back to {old_image}"
            ));
            let rolling = Instant::now();
            let restored = roll_back(
                cri,
                &pod.id,
                &new_id,
                &old_config,
                attempt + 1,
                &sandbox,
                request,
                &readiness,
            )
            .await;
            match restored {
                Ok(restored) => {
                    phase(&mut report, "rollback", rolling, say);
                    Err(UpgradeError::RolledBack {
                        image: request.image.clone(),
                        cause,
                        old_image,
                        restored,
                    })
                }
                Err(rollback) => Err(UpgradeError::RollbackFailed {
                    image: request.image.clone(),
                    cause,
                    old_image,
                    rollback,
                    container: request.container.clone(),
                }),
            }
        }
    }
}

/// Builds the new container's layer image when it is a Spry container; what keeps it
/// from happening is said, and the shim builds it at start instead.
async fn prebuild_layers(
    cri: &CriClient,
    prebuild: &LayerPrebuild,
    new_id: &str,
    report: &mut Report,
    say: &mut dyn FnMut(String),
) -> Option<crate::rootfs::CachedImage> {
    let building = Instant::now();
    let details = match cri.container(new_id).await {
        Ok(details) if prebuild.applies_to(&details) => details,
        Ok(_) => return None,
        Err(error) => {
            say(format!(
                "cannot read the new container ({}); its layer image is built at its start",
                crate::error_chain(&error)
            ));
            return None;
        }
    };
    match prebuild.run(cri, &details).await {
        Ok(None) => {
            say("the snapshotter serves the new image's layers to the VM: nothing to build".into());
            None
        }
        Ok(Some((image, built))) => {
            let took = building.elapsed();
            report.phases.push(("layers", took));
            let how = if built { "built" } else { "found" };
            say(format!(
                "{:<8} {:>8.3} s  (layer image {how}: {})",
                "layers",
                took.as_secs_f64(),
                image.path.display()
            ));
            Some(image)
        }
        Err(error) => {
            say(format!(
                "layer image not built ahead ({}); the new container builds it at its start",
                crate::error_chain(&error)
            ));
            None
        }
    }
}

/// Stops and removes the failed container and runs the old config again (the old
/// container itself cannot be restarted through CRI); returns the new old-image container.
#[allow(clippy::too_many_arguments)]
async fn roll_back(
    cri: &CriClient,
    pod: &str,
    failed: &str,
    old_config: &ContainerConfig,
    attempt: u32,
    sandbox: &spry_proto::cri::PodSandboxConfig,
    request: &UpgradeRequest,
    readiness: &dyn Fn(&ContainerConfig) -> Result<Readiness, UpgradeError>,
) -> Result<String, String> {
    let _ = cri.stop_container(failed, Duration::ZERO).await;
    if let Err(error) = cri.remove_container(failed).await {
        tracing::warn!(%error, container = failed, "cannot remove the failed container");
    }
    let again = plan::successor(old_config, &old_config.image.image, attempt);
    let probe = readiness(&again).map_err(|e| e.to_string())?;
    let id = cri
        .create_container(pod, &again, sandbox)
        .await
        .map_err(|e| format!("creating it: {e}"))?;
    cri.start_container(&id)
        .await
        .map_err(|e| format!("starting it: {e}"))?;
    ready::wait_ready(cri, &id, &probe, request.timeout)
        .await
        .map_err(|e| format!("it {e}"))?;
    Ok(id)
}

fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
}
