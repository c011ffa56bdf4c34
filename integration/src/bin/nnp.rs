//! `nnp`: the stand-in for Kubernetes' `e2e-test-images/nonewprivs` (critest's NoNewPrivs
//! specs), built static into the critest images (scripts/lib/critest-images.sh) and
//! installed setuid root. It prints `Effective uid: N` as upstream's does: 0 when the
//! setuid bit took effect, the caller's uid when `no_new_privs` stopped it.
//!
//! Standard library only, so that rustc alone builds it into one small static binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    let status = match std::fs::read_to_string("/proc/self/status") {
        Ok(status) => status,
        Err(e) => {
            eprintln!("nnp: cannot read /proc/self/status: {e}");
            return ExitCode::FAILURE;
        }
    };
    // "Uid:\treal\teffective\tsaved\tfilesystem"
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1));
    match effective {
        Some(uid) => {
            println!("Effective uid: {uid}");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("nnp: no Uid line in /proc/self/status");
            ExitCode::FAILURE
        }
    }
}
