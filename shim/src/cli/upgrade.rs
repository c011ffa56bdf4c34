//! `spry upgrade`: the command line of `crate::upgrade`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use crate::config::{Config, ConfigError};
use crate::cri::{CriClient, DEFAULT_ENDPOINT};
use crate::rootfs::LayerCache;
use crate::state_dir::StateDir;
use crate::upgrade::{upgrade, LayerPrebuild, Probe, UpgradeError, UpgradeRequest, Warm};

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// The pod: its id, a unique id prefix (4+ characters) or its name.
    #[arg(long)]
    pub pod: String,
    /// The pod's namespace, when its name is not unique.
    #[arg(long)]
    pub namespace: Option<String>,
    /// The container's name in the pod.
    #[arg(long)]
    pub container: String,
    /// The new image.
    #[arg(long)]
    pub image: String,
    /// Ready when the pod's IP answers on this TCP port.
    #[arg(long, conflicts_with = "ready_log")]
    pub ready_tcp: Option<u16>,
    /// Ready when the new container logs a line matching this regular expression.
    #[arg(long)]
    pub ready_log: Option<String>,
    /// How long the new container may take to become ready before the rollback (e.g.
    /// 60s, 2m, 500ms).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// How long the old container gets to stop before it is killed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Print the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// containerd's CRI socket (`unix://` optional).
    #[arg(long, default_value = DEFAULT_ENDPOINT)]
    pub runtime_endpoint: String,
    /// containerd's name of Spry's lazy-pulling snapshotter: when the old container's
    /// rootfs comes from it, the new image's prioritized files are fetched
    /// (`spry-snapshotter warm`) before the old container stops. "" turns warming off.
    #[arg(long, default_value = "spry")]
    pub lazy_snapshotter: String,
    /// spry-snapshotter's config file, for the warm-up (its default when not given).
    #[arg(long)]
    pub snapshotter_config: Option<PathBuf>,
}

/// Why `spry upgrade` failed; `exit_code` is what the process returns.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeCommandError {
    #[error("--ready-log {pattern:?} is not a regular expression")]
    Pattern {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error(transparent)]
    Config(ConfigError),
    #[error(transparent)]
    Connect(crate::cri::CriError),
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
}

impl UpgradeCommandError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Pattern { .. } | Self::Config(_) => 2,
            Self::Connect(_) => 1,
            Self::Upgrade(error) => error.exit_code(),
        }
    }
}

/// Runs `spry upgrade` with Spry's config at `config` (where Spry pods' layer images
/// live), printing each phase on stdout.
pub async fn run_upgrade(config: &Path, args: &UpgradeArgs) -> Result<(), UpgradeCommandError> {
    let config = Config::load(config).map_err(UpgradeCommandError::Config)?;
    let probe = match (&args.ready_tcp, &args.ready_log) {
        (Some(port), _) => Probe::Tcp(*port),
        (None, Some(pattern)) => Probe::Log(regex::Regex::new(pattern).map_err(|source| {
            UpgradeCommandError::Pattern {
                pattern: pattern.clone(),
                source,
            }
        })?),
        (None, None) => Probe::Running,
    };
    let socket = PathBuf::from(
        args.runtime_endpoint
            .strip_prefix("unix://")
            .unwrap_or(&args.runtime_endpoint),
    );
    let cri = CriClient::connect(&socket)
        .await
        .map_err(UpgradeCommandError::Connect)?;
    let request = UpgradeRequest {
        pod: args.pod.clone(),
        namespace: args.namespace.clone(),
        container: args.container.clone(),
        image: args.image.clone(),
        probe,
        timeout: args.timeout,
        grace: args.grace,
        dry_run: args.dry_run,
        warm: Some(warm_with(args)),
        layers: Some(LayerPrebuild {
            cache: LayerCache::new(
                StateDir::new(&config.state_dir).layer_images(),
                config.rootfs.keep_unused_bytes(),
            ),
        }),
    };
    upgrade(&cri, &request, &mut |line| println!("{line}")).await?;
    Ok(())
}

/// `spry-snapshotter [--config FILE] warm IMAGE`.
fn warm_with(args: &UpgradeArgs) -> Warm {
    let mut warm_args = Vec::new();
    if let Some(config) = &args.snapshotter_config {
        warm_args.push("--config".into());
        warm_args.push(config.into());
    }
    warm_args.push("warm".into());
    Warm {
        snapshotter: args.lazy_snapshotter.clone(),
        program: super::snapshotter_program(),
        args: warm_args,
    }
}

/// `90s`, `2m`, `500ms`, `1h`, or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 60s, 2m or 500ms"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?}: the unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl_flags() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
