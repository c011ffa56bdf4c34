//! `spry template build|ls|rm`: manage the VM templates pods start from.

use std::path::Path;

use clap::{Args, Subcommand};

use crate::config::{Config, ConfigError};
use crate::host::Host;
use crate::template::{build_template, TemplateError};

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Build the template for the configured VM now (pods would build it on first use).
    Build(TemplateBuildArgs),
    /// List templates: key, VM size, accelerator, build time, and whether each is usable.
    Ls,
    /// Remove one template by key (or key prefix), or all of them.
    Rm(TemplateRmArgs),
}

#[derive(Debug, Args)]
pub struct TemplateBuildArgs {
    /// VM memory in MiB (default from the config file).
    #[arg(long)]
    pub memory: Option<u32>,
    /// NICs of the pods it is for: one per veth CNI gives a pod (a template serves only
    /// pods with as many).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=crate::network::MAX_INTERFACES as i64))]
    pub nics: u8,
    /// VM vCPUs (default from the config file).
    #[arg(long)]
    pub cpus: Option<u32>,
}

#[derive(Debug, Args)]
pub struct TemplateRmArgs {
    /// Template key or unique prefix.
    #[arg(required_unless_present = "all")]
    pub key: Option<String>,
    /// Remove every template.
    #[arg(long, conflicts_with = "key")]
    pub all: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateCommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("cannot fingerprint the configured VM")]
    Fingerprint(#[source] crate::vm::VmError),
    #[error("{prefix:?} matches {count} templates; give more of the key")]
    AmbiguousKey { prefix: String, count: usize },
}

pub async fn run_template(
    config_path: &Path,
    command: TemplateCommand,
) -> Result<(), TemplateCommandError> {
    let host = Host::new(Config::load(config_path)?);
    let store = host.templates();
    match command {
        TemplateCommand::Build(args) => {
            let mut base = host.vm_config("template-cli");
            base.cpus = args.cpus.unwrap_or(base.cpus);
            base.memory_mib = args.memory.unwrap_or(base.memory_mib);
            base.nics = (0..usize::from(args.nics))
                .map(crate::network::nic_for)
                .collect();
            let hypervisor = host.hypervisor();
            let key = hypervisor
                .snapshot_fingerprint(&base)
                .await
                .map_err(TemplateCommandError::Fingerprint)?;
            let template =
                build_template(hypervisor.as_ref(), store, &base, &key, host.boot_timeout())
                    .await?;
            println!("{}", template.dir.display());
            Ok(())
        }
        TemplateCommand::Ls => {
            println!("KEY           CPUS  MEMORY   ACCEL  BUILD_MS  STATUS");
            for (dir, checked) in store.list()? {
                let key = dir.file_name().unwrap_or_default().to_string_lossy();
                let short = &key[..key.len().min(12)];
                match checked {
                    Ok(t) => println!(
                        "{short:<12}  {:<4}  {:<7}  {:<5}  {:<8}  ok",
                        t.manifest.cpus,
                        format!("{}M", t.manifest.memory_mib),
                        t.manifest.accel,
                        t.manifest.build_ms
                    ),
                    Err(damage) => {
                        println!("{short:<12}  -     -        -      -         damaged: {damage}")
                    }
                }
            }
            Ok(())
        }
        TemplateCommand::Rm(args) => {
            let _lock = store.lock().await?;
            let keys: Vec<String> = store
                .list()?
                .into_iter()
                .filter_map(|(dir, _)| Some(dir.file_name()?.to_string_lossy().into_owned()))
                .collect();
            let chosen: Vec<&String> = match &args.key {
                Some(prefix) => keys.iter().filter(|k| k.starts_with(prefix)).collect(),
                None => keys.iter().collect(),
            };
            if let Some(prefix) = &args.key {
                match chosen.len() {
                    0 => {
                        return Err(TemplateError::NotFound {
                            key: prefix.clone(),
                            root: store.root().to_path_buf(),
                        }
                        .into())
                    }
                    1 => {}
                    count => {
                        return Err(TemplateCommandError::AmbiguousKey {
                            prefix: prefix.clone(),
                            count,
                        })
                    }
                }
            }
            for key in chosen {
                store.remove(key)?;
                println!("removed {key}");
            }
            Ok(())
        }
    }
}
