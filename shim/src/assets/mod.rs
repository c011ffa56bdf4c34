//! Guest assets: the pinned kernel and the agent initramfs.
//!
//! [`build_guest_assets`] fetches the pinned Debian kernel package, extracts
//! its PVH-bootable `vmlinux`, resolves the kernel modules the guest needs and
//! writes a deterministic initramfs with the agent as `/init`. Outputs live in
//! a directory keyed by the hash of every input, next to a `manifest.json`;
//! `<output_dir>/current` links to the latest build.

mod builder;
pub mod cpio;
pub mod initramfs;
pub mod kernel;
pub mod manifest;
pub mod modules;
pub mod vmlinux;

pub use builder::{
    build_guest_assets, default_output_dir, load_current, AssetsError, GuestAssets,
    GuestAssetsConfig, KernelSource, CURRENT_LINK, INITRAMFS_NAME, MANIFEST_NAME, VMLINUX_NAME,
};
pub use manifest::{Manifest, BUILDER_VERSION};
pub use modules::GUEST_MODULES;
