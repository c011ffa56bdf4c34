//! Guest assets: the pinned kernel and the agent initramfs.
