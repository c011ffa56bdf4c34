//! The record of what a guest build was made from, and its cache key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bump whenever the builder would produce different bytes from the same
/// inputs (layout, module list format, vmlinux extraction...).
pub const BUILDER_VERSION: u32 = 1;

/// `manifest.json` next to the built files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub builder_version: u32,
    /// The cache key the output directory is named after.
    pub cache_key: String,
    /// `uname -r` of the guest kernel.
    pub kernel_release: String,
    pub kernel_package: String,
    pub kernel_version: String,
    pub kernel_deb_sha256: String,
    pub agent_sha256: String,
    /// Module paths in load order (relative to `/lib/modules/<release>/`).
    pub modules: Vec<String>,
    /// sha256 of every output file, by file name.
    pub files: BTreeMap<String, String>,
}

/// The inputs that determine a guest build's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKeyInputs<'a> {
    pub kernel_deb_sha256: &'a str,
    pub agent_sha256: &'a str,
    /// The requested module names, in the requested order.
    pub modules: &'a [String],
    pub builder_version: u32,
}

/// sha256 over the inputs, each on its own labelled line so that no two
/// different input sets can serialize the same way.
pub fn cache_key(inputs: &CacheKeyInputs<'_>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"spry-guest-assets\n");
    hasher.update(format!("builder {}\n", inputs.builder_version));
    hasher.update(format!("kernel-deb {}\n", inputs.kernel_deb_sha256));
    hasher.update(format!("agent {}\n", inputs.agent_sha256));
    for module in inputs.modules {
        hasher.update(format!("module {module}\n"));
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_modules() -> Vec<String> {
        vec!["erofs".to_owned(), "overlay".to_owned()]
    }

    #[test]
    fn every_input_changes_the_key() {
        let modules = base_modules();
        let base = CacheKeyInputs {
            kernel_deb_sha256: "aa",
            agent_sha256: "bb",
            modules: &modules,
            builder_version: BUILDER_VERSION,
        };
        let key = cache_key(&base);
        assert_eq!(key, cache_key(&base.clone()), "the key is a pure function");
        assert_eq!(key.len(), 64);
        assert_ne!(
            key,
            cache_key(&CacheKeyInputs {
                kernel_deb_sha256: "ab",
                ..base.clone()
            })
        );
        assert_ne!(
            key,
            cache_key(&CacheKeyInputs {
                agent_sha256: "bc",
                ..base.clone()
            })
        );
        assert_ne!(
            key,
            cache_key(&CacheKeyInputs {
                builder_version: BUILDER_VERSION + 1,
                ..base.clone()
            })
        );
        let reordered = vec!["overlay".to_owned(), "erofs".to_owned()];
        assert_ne!(
            key,
            cache_key(&CacheKeyInputs {
                modules: &reordered,
                ..base.clone()
            })
        );
        // Field boundaries cannot be shifted to collide.
        let merged = vec!["erofsoverlay".to_owned()];
        assert_ne!(
            key,
            cache_key(&CacheKeyInputs {
                modules: &merged,
                ..base
            })
        );
    }

    #[test]
    fn manifest_rejects_unknown_fields() {
        let manifest = Manifest {
            builder_version: 1,
            cache_key: "k".into(),
            kernel_release: "r".into(),
            kernel_package: "p".into(),
            kernel_version: "v".into(),
            kernel_deb_sha256: "d".into(),
            agent_sha256: "a".into(),
            modules: vec![],
            files: BTreeMap::new(),
        };
        let mut json: serde_json::Value = serde_json::to_value(&manifest).unwrap();
        assert_eq!(
            serde_json::from_value::<Manifest>(json.clone()).unwrap(),
            manifest
        );
        json["surprise"] = serde_json::Value::Bool(true);
        assert!(serde_json::from_value::<Manifest>(json).is_err());
    }
}
