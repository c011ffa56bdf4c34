//! Spry's lazy-pulling snapshotter: a containerd proxy snapshotter that
//! mounts eStargz layers over FUSE and fetches their contents on demand.

pub mod cache;
pub mod convert;
pub mod estargz;
pub mod layer;
pub mod registry;
pub mod fs;
#[cfg(test)]
mod testutil;
mod sys;
pub mod config;
pub mod service;
pub mod warm;
