//! The node's Spry: `spry install` into the cluster dir, the way a cluster installer runs
//! it, plus the test's handler variants.

use std::process::Command;

use anyhow::{ensure, Context, Result};

use spry_shim::install::snapshotter;

use super::Cluster;
use crate::snapshotter::Snapshotter;
use crate::{paths, spry, system};

impl Cluster {
    /// Runs `spry install` into the cluster dir, the way a cluster installer would; keeps the
    /// RuntimeClass it prints and returns the containerd handler fragment it wrote. With
    /// `lazy_snapshotter`, `--snapshotter` too, and the snapshotter's service is started
    /// from the unit install wrote (there is no systemd here), as systemd would.
    pub(super) fn install_spry(&mut self, lazy_snapshotter: bool) -> Result<String> {
        let guest = spry::guest_dir()?;
        let spry_bin = spry::bin_dir("debug").join("spry");
        let prefix = self.dir.join("spry");
        let config = self.dir.join("spry.toml");
        // Spry's runtime state stays in the cluster dir (so the leak checks can see it).
        let installed_guest = prefix.join("share/spry/guest");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\n[vm]\nkernel = \"{}\"\ninitramfs = \"{}\"\n",
                self.spry_state.display(),
                installed_guest.join("vmlinux").display(),
                installed_guest.join("initramfs.img").display()
            ),
        )?;
        let handler = self.dir.join("containerd-handler.toml");
        let mut install = Command::new(&spry_bin);
        install
            .arg("install")
            .arg("--prefix")
            .arg(&prefix)
            .arg("--guest-dir")
            .arg(&guest)
            .arg("--spry-config")
            .arg(&config)
            .arg("--containerd-config")
            .arg(&handler)
            .arg("--containerd-bin")
            .arg(paths::containerd_bin());
        let snapshotter_dir = self.dir.join("snapshotter");
        let snapshotter_config = self.dir.join("snapshotter.toml");
        let systemd_dir = self.dir.join("systemd");
        if lazy_snapshotter {
            // Like spry.toml: the state in the cluster dir; the rest as install writes it.
            std::fs::create_dir_all(&snapshotter_dir)?;
            std::fs::write(
                &snapshotter_config,
                format!(
                    "{}[lazy]\nvm_images = true\n",
                    Snapshotter::state_config(&snapshotter_dir)
                ),
            )?;
            install
                .arg("--snapshotter")
                .arg("--snapshotter-config")
                .arg(&snapshotter_config)
                .arg("--systemd-dir")
                .arg(&systemd_dir);
        }
        self.runtime_class = system::run_checked(&mut install)?;
        if lazy_snapshotter {
            let unit_path = systemd_dir.join(snapshotter::UNIT_NAME);
            let unit = std::fs::read_to_string(&unit_path)
                .with_context(|| format!("spry install wrote no {}", unit_path.display()))?;
            let command: Vec<String> = snapshotter::exec_start(&unit)
                .context("the snapshotter's unit has no ExecStart")?
                .split_whitespace()
                .map(str::to_string)
                .collect();
            let installed = prefix.join("bin").join(snapshotter::SNAPSHOTTER_BINARY);
            ensure!(
                command[0] == installed.display().to_string(),
                "the unit does not run the installed snapshotter: {command:?}"
            );
            self.snapshotter = Some(Snapshotter::start_command(
                &snapshotter_dir,
                &snapshotter_config,
                command,
            )?);
        }
        std::fs::read_to_string(&handler).with_context(|| format!("reading {}", handler.display()))
    }

    /// Configs, containerd handlers and RuntimeClasses of the Spry variants; returns the
    /// handlers' containerd TOML.
    pub(super) fn add_variants(&mut self, variants: &[(&str, &str)]) -> Result<String> {
        let base_config = std::fs::read_to_string(self.dir.join("spry.toml"))?;
        let installed = self.runtime_class.clone();
        let shim = self.dir.join("spry/bin/containerd-shim-spry-v2");
        let mut toml = String::new();
        for (handler, lines) in variants {
            let config = self.dir.join(format!("spry-{handler}.toml"));
            // Top-level keys go before the base config's tables, tables after them.
            let text = if lines.trim_start().starts_with('[') {
                format!("{base_config}\n{lines}\n")
            } else {
                format!("{lines}\n{base_config}")
            };
            std::fs::write(&config, text)?;
            toml.push_str(&spry::handler_with_config_toml(handler, &shim, &config));
            let class = installed
                .replace("name: spry\n", &format!("name: {handler}\n"))
                .replace("handler: spry\n", &format!("handler: {handler}\n"));
            ensure!(
                class != installed,
                "the installed RuntimeClass does not name `spry`:\n{installed}"
            );
            self.runtime_class.push_str(&format!("---\n{class}"));
        }
        Ok(toml)
    }
}
