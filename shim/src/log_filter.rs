//! The shim's log filter from its config. Subscribers live in binaries, so the binary
//! installs a hook that swaps its subscriber's filter, and the library applies the config's
//! `log_level` once it knows which config a pod runs with (the default file at start, the
//! runtime handler's own at sandbox creation). `SPRY_LOG` in the environment wins.

use std::sync::OnceLock;

/// Replaces the subscriber's filter; false if `filter` is not a valid filter.
pub type Reload = Box<dyn Fn(&str) -> bool + Send + Sync>;

static RELOAD: OnceLock<Reload> = OnceLock::new();

/// Called once by the binary that owns the subscriber.
pub fn install(reload: Reload) {
    let _ = RELOAD.set(reload);
}

/// Makes `filter` (a config's `log_level`) the log filter, unless `SPRY_LOG` is set.
pub fn apply_config_level(filter: &str) {
    if let Some(reload) = RELOAD.get() {
        apply(filter, std::env::var_os("SPRY_LOG").is_some(), reload);
    }
}

fn apply(filter: &str, overridden_by_env: bool, reload: &Reload) {
    if overridden_by_env {
        return;
    }
    if !reload(filter) {
        // Config validation parses the filter, so this is a filter the subscriber refused.
        tracing::warn!(
            filter,
            "cannot apply the config's log_level; keeping the current filter"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn the_config_level_applies_unless_the_environment_sets_one() {
        let applied = Arc::new(Mutex::new(Vec::new()));
        let reload: Reload = {
            let applied = Arc::clone(&applied);
            Box::new(move |f: &str| {
                applied.lock().unwrap().push(f.to_string());
                true
            })
        };
        apply("debug", false, &reload);
        apply("trace", true, &reload);
        assert_eq!(*applied.lock().unwrap(), vec!["debug".to_string()]);
    }
}
