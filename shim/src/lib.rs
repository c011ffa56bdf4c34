//! Spry's host side: the microVM layer, the agent client, rootfs sharing and the CLI.

pub mod agent_client;
pub mod assets;
pub mod cli;
pub mod config;
pub mod install;
pub mod rootfs;
pub mod sandbox;
pub mod service;
pub mod sys;
pub mod vm;
