//! The hypervisor layer: a `Hypervisor` trait and its QEMU implementation.
