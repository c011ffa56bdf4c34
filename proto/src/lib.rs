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
