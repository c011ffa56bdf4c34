//! Image references, as they arrive in containerd's labels and on the command line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spry_snapshotter::registry::Reference;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Reference::parse(text) {
        assert!(!r.host.is_empty());
        assert!(!r.repository.is_empty());
        let _ = r.object();
    }
});
