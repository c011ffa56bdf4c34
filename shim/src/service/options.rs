//! The runtime handler's options, as containerd's CRI plugin sends them.
//!
//! For runtimes other than runc, CRI turns a handler's `options` table into
//! `runtimeoptions.v1.Options`: `ConfigPath = "/etc/spry/other.toml"` names a config file,
//! any other table is passed as TOML (`ConfigBody`). Either gives that handler its own Spry
//! config (for example `template = "off"` for tenants that must not share pages).

use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use protobuf::Message;
use spry_proto::runtimeoptions::Options;

use crate::config::{Config, ConfigError};

/// How the shim names an inline config in errors.
const INLINE_CONFIG: &str = "<containerd runtime options>";

/// The config the handler's options select, or `None` when they select nothing (no
/// options, or another runtime's options type).
pub fn config_from_options(options: Option<&Any>) -> Result<Option<Config>, ConfigError> {
    let Some(any) = options else { return Ok(None) };
    if !any.type_url.ends_with("runtimeoptions.v1.Options") || any.value.is_empty() {
        return Ok(None);
    }
    let options =
        Options::parse_from_bytes(&any.value).map_err(|source| ConfigError::RuntimeOptions {
            type_url: any.type_url.clone(),
            source,
        })?;
    if !options.config_path.is_empty() {
        let path = PathBuf::from(&options.config_path);
        return Config::load_required(&path).map(Some);
    }
    if !options.config_body.is_empty() {
        let text = String::from_utf8_lossy(&options.config_body);
        return Config::parse(&text, Path::new(INLINE_CONFIG)).map(Some);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::TemplatePolicy;

    fn any(options: &Options) -> Any {
        Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: options.write_to_bytes().unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn a_config_path_is_loaded_and_a_missing_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spry-cold.toml");
        std::fs::write(&path, "template = \"off\"\n").unwrap();
        let options = Options {
            config_path: path.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let config = config_from_options(Some(&any(&options))).unwrap().unwrap();
        assert_eq!(config.template, TemplatePolicy::Off);

        let missing = Options {
            config_path: "/nonexistent/spry.toml".into(),
            ..Default::default()
        };
        let err = config_from_options(Some(&any(&missing))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/spry.toml"), "{err}");
    }

    #[test]
    fn an_inline_table_is_a_config_and_unknown_keys_fail() {
        let inline = Options {
            config_body: b"template = \"off\"\n[vm]\nmemory_mib = 512\n".to_vec(),
            ..Default::default()
        };
        let config = config_from_options(Some(&any(&inline))).unwrap().unwrap();
        assert_eq!(config.vm.memory_mib, 512);

        let typo = Options {
            config_body: b"templates = \"off\"\n".to_vec(),
            ..Default::default()
        };
        assert!(config_from_options(Some(&any(&typo))).is_err());
    }

    #[test]
    fn no_options_or_foreign_options_select_nothing() {
        assert!(config_from_options(None).unwrap().is_none());
        let runc = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![8, 1],
            ..Default::default()
        };
        assert!(config_from_options(Some(&runc)).unwrap().is_none());
    }
}
