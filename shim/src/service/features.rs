//! What the shim tells containerd about the runtime when asked with `-info` (before any
//! shim instance exists): its name and version, and the OCI features of what runs the
//! containers, the guest's libcontainer as far as Spry's path carries them. CRI reads the
//! mount options: `rro` among them is how it learns that recursive read-only volumes work
//! (it refuses them otherwise). Nothing else is claimed: no Linux section ("unknown"), so
//! CRI does not take user namespaces or idmapped mounts as supported.

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};
use oci_spec::runtime::FeaturesBuilder;

/// containerd's type URL for runtime-spec's `features.Features` (JSON in an Any).
const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// The oldest runtime-spec version the agent takes (what containerd 2.x writes is newer).
const OCI_VERSION_MIN: &str = "1.0.0";

/// Errors in describing the runtime.
#[derive(Debug, thiserror::Error)]
pub enum FeaturesError {
    #[error("cannot build the runtime features")]
    Build { source: oci_spec::OciSpecError },
    #[error("cannot encode the runtime features as JSON")]
    Encode { source: serde_json::Error },
}

/// The answer to `containerd-shim-spry-v2 -info`.
pub fn runtime_info(runtime_id: &str) -> Result<RuntimeInfo, FeaturesError> {
    let features = FeaturesBuilder::default()
        .oci_version_min(OCI_VERSION_MIN)
        .oci_version_max(oci_spec::runtime::VERSION)
        .mount_options(
            spry_proto::GUEST_MOUNT_OPTIONS
                .iter()
                .map(|o| o.to_string())
                .collect::<Vec<_>>(),
        )
        .build()
        .map_err(|source| FeaturesError::Build { source })?;
    let value = serde_json::to_vec(&features).map_err(|source| FeaturesError::Encode { source })?;
    Ok(RuntimeInfo {
        name: runtime_id.to_string(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }),
        features: MessageField::some(Any {
            type_url: FEATURES_TYPE_URL.to_string(),
            value,
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_reads_recursive_read_only_mounts_from_the_features() {
        let info = runtime_info("io.containerd.spry.v2").unwrap();
        assert_eq!(info.name, "io.containerd.spry.v2");
        let any = info.features.as_ref().unwrap();
        assert_eq!(any.type_url, FEATURES_TYPE_URL);
        // The JSON shape runtime-spec's features.Features has (camelCase keys).
        let json: serde_json::Value = serde_json::from_slice(&any.value).unwrap();
        let options = json["mountOptions"].as_array().unwrap();
        assert!(options.iter().any(|o| o == "rro"));
        assert!(options.iter().any(|o| o == "rslave"));
        assert!(!options.iter().any(|o| o == "rshared"));
        assert_eq!(json["ociVersionMin"], "1.0.0");
        assert!(json.get("linux").is_none_or(|l| l.is_null()), "{json}");
    }
}
