//! `spry pool drain`: end the warm pool's spare shims and their VMs (before an upgrade of
//! Spry, a config change, or `spry uninstall`); pods that start later refill it.

use std::path::Path;

use clap::Subcommand;

use crate::config::{Config, ConfigError};
use crate::pool::PoolError;

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Stop every spare shim (and its VM) under the config's state dir.
    Drain,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolCommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Pool(#[from] PoolError),
}

pub async fn run_pool(config_path: &Path, command: PoolCommand) -> Result<(), PoolCommandError> {
    let config = Config::load(config_path)?;
    match command {
        PoolCommand::Drain => {
            let count = crate::pool::drain(&config.state_dir).await?;
            println!("stopped {count} spare shim(s)");
        }
    }
    Ok(())
}
