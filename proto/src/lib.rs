//! Spry's host↔guest agent protocol: generated code only (see `agent.proto`).

#[allow(
    clippy::all,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_mut,
    unused_results
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(
    clippy::all,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_imports,
    unused_mut,
    unused_results
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// containerd's runtime options for non-runc runtimes (the CRI handler's `options` table).
#[allow(
    clippy::all,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_mut,
    unused_results
)]
pub mod runtimeoptions {
    include!(concat!(env!("OUT_DIR"), "/runtimeoptions.rs"));
}

/// The Kubernetes CRI (runtime.v1) messages, for the `spry upgrade` client.
#[cfg(feature = "cri")]
#[allow(
    clippy::all,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_mut,
    unused_results
)]
pub mod cri {
    include!(concat!(env!("OUT_DIR"), "/api.rs"));
}

/// containerd's snapshots service, the mounts call (`spry upgrade` reads a new container's
/// layers before it starts).
#[cfg(feature = "cri")]
#[allow(
    clippy::all,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_mut,
    unused_results
)]
pub mod snapshots {
    include!(concat!(env!("OUT_DIR"), "/snapshots.rs"));
}

/// The OCI mount options a container's mounts may carry in a Spry pod: what the guest's
/// libcontainer applies (the agent's tests check each against it). The shim reports them to
/// containerd as the runtime's features (`-info`), which is how CRI learns that recursive
/// read-only mounts (`rro`) work. Option names only, never data a file system parses.
/// Not `shared`/`rshared`: a mount made in the guest cannot reach the host.
pub const GUEST_MOUNT_OPTIONS: &[&str] = &[
    "defaults",
    "ro",
    "rw",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "sync",
    "async",
    "dirsync",
    "remount",
    "mand",
    "nomand",
    "atime",
    "noatime",
    "diratime",
    "nodiratime",
    "bind",
    "rbind",
    "unbindable",
    "runbindable",
    "private",
    "rprivate",
    "slave",
    "rslave",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "rro",
    "rrw",
    "rnosuid",
    "rsuid",
    "rnodev",
    "rdev",
    "rnoexec",
    "rexec",
    "rnodiratime",
    "rdiratime",
    "rrelatime",
    "rnorelatime",
    "rnoatime",
    "ratime",
    "rstrictatime",
    "rnostrictatime",
    "rnosymfollow",
    "rsymfollow",
];
