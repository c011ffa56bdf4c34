//! Warming a lazily pulled image before the old container stops.
//!
//! On a lazy-pulling snapshotter, CRI's PullImage fetches only each layer's table of
//! contents; the files come when the new container first reads them, which would be
//! after the stop, inside the downtime. So when the old container's rootfs comes from
//! the lazy snapshotter, the new image's prioritized files (its prefetch list) are
//! fetched into the node's chunk cache first (`spry-snapshotter warm IMAGE`), while the
//! old container still serves. A warm-up that fails is said and skipped: the container
//! then fetches on demand, as without it.

use std::ffi::OsString;
use std::path::PathBuf;

use tokio::process::Command;

/// How to warm an image, and when.
#[derive(Debug, Clone)]
pub struct Warm {
    /// containerd's name of the lazy-pulling snapshotter: the warm-up runs when the old
    /// container's rootfs comes from it.
    pub snapshotter: String,
    /// The warming command; the image reference is appended as its last argument.
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// Failure to warm an image (never fatal to the upgrade).
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("cannot run {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} exited with {status}: {stderr}")]
    Failed {
        program: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

impl Warm {
    /// Whether a container on `snapshotter` gets the warm-up.
    pub fn applies_to(&self, snapshotter: Option<&str>) -> bool {
        !self.snapshotter.is_empty() && snapshotter == Some(self.snapshotter.as_str())
    }

    /// Runs the warming command for `image`.
    pub async fn run(&self, image: &str) -> Result<(), WarmError> {
        let output = Command::new(&self.program)
            .args(&self.args)
            .arg(image)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| WarmError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        // The last lines say why; progress lines before them do not.
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        Err(WarmError::Failed {
            program: self.program.clone(),
            status: output.status,
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warm(program: &str, args: &[&str]) -> Warm {
        Warm {
            snapshotter: "spry".into(),
            program: program.into(),
            args: args.iter().map(OsString::from).collect(),
        }
    }

    #[test]
    fn only_containers_on_the_lazy_snapshotter_are_warmed() {
        let w = warm("true", &[]);
        assert!(w.applies_to(Some("spry")));
        assert!(!w.applies_to(Some("overlayfs")));
        assert!(!w.applies_to(None));
        let off = Warm {
            snapshotter: String::new(),
            ..w
        };
        assert!(!off.applies_to(Some("")));
    }

    #[tokio::test]
    async fn the_image_is_the_last_argument_and_a_failure_says_why() {
        let ok = warm("sh", &["-c", "test \"$0\" = reg/app:2"]);
        ok.run("reg/app:2").await.unwrap();
        let failing = warm(
            "sh",
            &[
                "-c",
                "echo progress >&2; echo \"no such image $0\" >&2; exit 3",
            ],
        );
        let err = failing.run("reg/app:9").await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("no such image reg/app:9") && text.contains("3"),
            "{text}"
        );
        let missing = warm("/nonexistent/spry-snapshotter", &[]);
        assert!(matches!(
            missing.run("x").await,
            Err(WarmError::Spawn { .. })
        ));
    }
}
