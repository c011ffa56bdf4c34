//! `WWW-Authenticate` headers as a registry sends them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spry_snapshotter::registry::auth::{
    credentials_allowed, parse_challenge, url_origin, Challenge,
};

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(Challenge::Bearer { realm, .. }) = parse_challenge(header) {
        let _ = url_origin(&realm);
        let _ = credentials_allowed(&realm, "http://127.0.0.1:5000/v2/");
    }
});
