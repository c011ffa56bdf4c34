//! Spry's in-guest agent: PID 1 of the pod VM. It serves the `spry.agent.v1.Agent` ttrpc API
//! (see `proto/agent.proto`) and runs the pod's containers with youki's libcontainer.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod channel;
pub mod container;
pub mod init;
pub mod network;
pub mod reaper;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod storage;
mod sys;
pub mod volumes;

/// An error and its causes on one line ("a: b: c"), each said once.
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
