//! Runs libcontainer operations in a short-lived helper process (`spry-agent` re-executed).
//!
//! Why a separate process: libcontainer clones its intermediate and init processes from the
//! calling process with raw `clone`, which does not run glibc's fork handlers. Doing that from
//! the multi-threaded agent could leave a lock (malloc arena, stderr, tracing) held forever in
//! the child. libcontainer also `waitpid`s its intermediate process and runs hooks with
//! `std::process`, which would race with the agent's reaper. The helper is single-threaded, owns
//! those children, and stays alive until the agent has registered the container process's pid
//! with the reaper, so the process is reparented to the agent only afterwards.
//!
//! Protocol over a `SOCK_SEQPACKET` pair that is the helper's stdin: the helper says it is
//! ready, the agent sends one JSON [`HelperRequest`] with the stdio descriptors attached
//! (`SCM_RIGHTS`), the helper answers with one JSON [`HelperReply`], then waits for the agent
//! to close its end and exits. A helper whose agent end closes before any request (a spare
//! no longer needed) exits quietly.

//!
//! One file per side: `protocol.rs` (the messages both sides speak), `client.rs` (the
//! agent's side), `child.rs` (the helper process's side), `pool.rs` (starting helpers and
//! the spares).

mod child;
mod client;
mod pool;
mod protocol;

pub use child::helper_main;
pub use client::{run, HelperDone};
pub use pool::prepare_spares;
pub use protocol::{FailureKind, HelperError, HelperReply, HelperRequest, HELPER_SUBCOMMAND};
