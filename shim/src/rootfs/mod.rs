//! Getting a container rootfs into the VM.
