//! Spry's host side: the microVM layer, the agent client, rootfs sharing and the CLI.

pub mod agent_client;
pub mod assets;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod cri;
pub mod host;
pub mod install;
pub mod log_filter;
pub mod network;
pub mod pool;
pub mod rootfs;
pub mod sandbox;
pub mod service;
pub mod state_dir;
pub mod sys;
pub mod template;
pub mod upgrade;
pub mod vm;
pub mod volumes;

/// An error and all its sources on one line ("a: b: c"): what a person needs when only
/// the top message would be shown (containerd, the CLI's stderr).
/// Each cause is said once (the same behaviour as the agent's and the snapshotter's).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // A cause some message already quotes (`{source}` in its format) is said once.
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
