//! Spry's host side: the microVM layer, the agent client, rootfs sharing and the CLI.

pub mod agent_client;
pub mod assets;
pub mod cli;
pub mod config;
pub mod install;
pub mod log_filter;
pub mod rootfs;
pub mod sandbox;
pub mod service;
pub mod sys;
pub mod template;
pub mod vm;

/// An error and all its sources on one line ("a: b: c"): what a person needs when only
/// the top message would be shown (containerd, the CLI's stderr).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
