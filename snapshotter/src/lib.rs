//! Spry's lazy-pulling snapshotter: a containerd proxy snapshotter that
//! mounts eStargz layers over FUSE and fetches their contents on demand.

pub mod cache;
pub mod config;
pub mod convert;
pub mod erofs;
pub mod estargz;
pub mod fs;
pub mod layer;
mod private;
pub mod record;
pub mod registry;
pub mod service;
mod sys;
#[cfg(test)]
mod testutil;
pub mod warm;
