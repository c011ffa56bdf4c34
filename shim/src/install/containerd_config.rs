//! Patching containerd's config to add (or remove) the `spry` runtime handler.
//!
//! The file is edited with `toml_edit`, so the user's comments, order and other settings
//! survive. containerd 2.x configs (`version = 3`) keep CRI runtimes under
//! `plugins."io.containerd.cri.v1.runtime"`; containerd 1.x (`version = 2`) under
//! `plugins."io.containerd.grpc.v1.cri"`.

use std::path::{Path, PathBuf};

use toml_edit::{value, DocumentMut, Item, Table};

/// The CRI runtime handler name (RuntimeClass `handler: spry`).
pub const HANDLER: &str = "spry";
pub const RUNTIME_TYPE: &str = "io.containerd.spry.v2";

/// A containerd config that could not be patched.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdConfigError {
    #[error("containerd config {path} is not valid TOML")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml_edit::TomlError,
    },
    #[error("containerd config {path} has version = {version}; Spry knows versions 2 (containerd 1.x) and 3 (containerd 2.x)")]
    UnknownVersion { path: PathBuf, version: i64 },
    #[error("containerd config {path}: `{key}` is not a table")]
    NotATable { path: PathBuf, key: String },
}

/// What the handler entry points at.
#[derive(Debug, Clone)]
pub struct HandlerSettings {
    pub shim_path: PathBuf,
    pub spry_config: PathBuf,
}

fn runtimes_path(version: i64) -> [&'static str; 4] {
    match version {
        3 => [
            "plugins",
            "io.containerd.cri.v1.runtime",
            "containerd",
            "runtimes",
        ],
        _ => [
            "plugins",
            "io.containerd.grpc.v1.cri",
            "containerd",
            "runtimes",
        ],
    }
}

/// The config's `version` key, if the text parses and has one.
pub fn schema_version(text: &str) -> Option<i64> {
    text.parse::<DocumentMut>()
        .ok()?
        .get("version")
        .and_then(Item::as_integer)
}

/// Parses `text` (empty for a missing file, which becomes a version 3 config).
fn parse(text: &str, path: &Path) -> Result<(DocumentMut, i64), ContainerdConfigError> {
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|source| ContainerdConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
    let version = match doc.get("version").and_then(Item::as_integer) {
        Some(v) => v,
        None if text.trim().is_empty() => {
            doc["version"] = value(3);
            3
        }
        // containerd reads a config without `version` as version 1, which it no
        // longer supports; refuse rather than guess.
        None => 1,
    };
    if version != 2 && version != 3 {
        return Err(ContainerdConfigError::UnknownVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    Ok((doc, version))
}

/// The table at `keys` under `table`, created (implicit, so no empty headers appear) where
/// missing; `key` names what was walked, for errors.
fn table_at<'a>(
    mut table: &'a mut Table,
    keys: &[&str],
    path: &Path,
) -> Result<&'a mut Table, ContainerdConfigError> {
    let mut key = String::new();
    for segment in keys {
        key = if key.is_empty() {
            segment.to_string()
        } else {
            format!("{key}.{segment}")
        };
        let entry = table.entry(segment).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        table = entry
            .as_table_mut()
            .ok_or_else(|| ContainerdConfigError::NotATable {
                path: path.to_path_buf(),
                key: key.clone(),
            })?;
    }
    Ok(table)
}

/// `out`, or `text` when they differ only in trailing whitespace: serializing an unchanged
/// document reproduces the input, and installing twice must leave the file byte-identical.
fn unchanged_or(text: &str, out: String) -> String {
    if out.trim() == text.trim() {
        text.to_string()
    } else {
        out
    }
}

/// Returns the config text with the `spry` handler added or updated. Equal to `text`
/// when it already is as wanted (so installing twice changes nothing).
pub fn add_handler(
    text: &str,
    path: &Path,
    settings: &HandlerSettings,
) -> Result<String, ContainerdConfigError> {
    let (mut doc, version) = parse(text, path)?;
    let mut keys = runtimes_path(version).to_vec();
    keys.push(HANDLER);
    let runtime = table_at(doc.as_table_mut(), &keys, path)?;
    runtime.set_implicit(false);
    runtime["runtime_type"] = value(RUNTIME_TYPE);
    runtime["runtime_path"] = value(settings.shim_path.display().to_string());
    // A privileged pod gets the host's devices only when it asks for them: otherwise CRI
    // lists every host device, and each block device (the node's own disks) would be
    // plugged into the pod's VM (Kata recommends the same setting).
    runtime["privileged_without_host_devices"] = value(true);
    let options = runtime
        .entry("options")
        .or_insert(Item::Table(Table::new()));
    if let Some(options) = options.as_table_mut() {
        options["ConfigPath"] = value(settings.spry_config.display().to_string());
    }
    Ok(unchanged_or(text, doc.to_string()))
}

/// Returns the config text with `spry-snapshotter` registered as the proxy snapshotter
/// `name` on `socket` and made the `spry` handler's snapshotter (containerd ≥ 1.7 / 2.x:
/// images pulled for Spry pods land in it, and their containers' snapshots come from it).
/// CRI must pass the layers' annotations to a remote snapshotter, so
/// `disable_snapshot_annotations` is turned off (other snapshotters ignore them).
pub fn add_snapshotter(
    text: &str,
    path: &Path,
    name: &str,
    socket: &Path,
) -> Result<String, ContainerdConfigError> {
    let (mut doc, version) = parse(text, path)?;
    let plugin = table_at(doc.as_table_mut(), &["proxy_plugins", name], path)?;
    plugin.set_implicit(false);
    plugin["type"] = value("snapshot");
    plugin["address"] = value(socket.display().to_string());
    let mut keys = runtimes_path(version).to_vec();
    keys.push(HANDLER);
    table_at(doc.as_table_mut(), &keys, path)?["snapshotter"] = value(name);
    let images: &[&str] = match version {
        3 => &["plugins", "io.containerd.cri.v1.images"],
        _ => &["plugins", "io.containerd.grpc.v1.cri", "containerd"],
    };
    table_at(doc.as_table_mut(), images, path)?["disable_snapshot_annotations"] = value(false);
    Ok(unchanged_or(text, doc.to_string()))
}

/// Returns the config text without the proxy snapshotter `name` (unchanged when absent).
/// `disable_snapshot_annotations` stays: it may predate Spry, and is harmless.
pub fn remove_snapshotter(
    text: &str,
    path: &Path,
    name: &str,
) -> Result<String, ContainerdConfigError> {
    if text.trim().is_empty() {
        return Ok(text.to_string());
    }
    let (mut doc, _) = parse(text, path)?;
    let removed = doc
        .get_mut("proxy_plugins")
        .and_then(Item::as_table_mut)
        .and_then(|plugins| plugins.remove(name))
        .is_some();
    Ok(if removed {
        doc.to_string()
    } else {
        text.to_string()
    })
}

/// Returns the config text without the `spry` handler (unchanged when it has none).
pub fn remove_handler(text: &str, path: &Path) -> Result<String, ContainerdConfigError> {
    if text.trim().is_empty() {
        return Ok(text.to_string());
    }
    let (mut doc, version) = parse(text, path)?;
    let mut table = Some(doc.as_table_mut());
    for segment in runtimes_path(version) {
        table = table
            .and_then(|t| t.get_mut(segment))
            .and_then(Item::as_table_mut);
    }
    let removed = table
        .and_then(|runtimes| runtimes.remove(HANDLER))
        .is_some();
    Ok(if removed {
        doc.to_string()
    } else {
        text.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> HandlerSettings {
        HandlerSettings {
            shim_path: "/usr/local/bin/containerd-shim-spry-v2".into(),
            spry_config: "/etc/spry/config.toml".into(),
        }
    }

    const USER_V3: &str = r#"version = 3
# my comment stays
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
"#;

    #[test]
    fn adds_the_handler_to_a_v3_config_and_keeps_the_rest() {
        let out = add_handler(USER_V3, Path::new("c.toml"), &settings()).unwrap();
        assert!(out.contains("# my comment stays"), "{out}");
        assert!(out.contains("io.containerd.runc.v2"));
        assert!(out.contains("snapshotter = \"overlayfs\""));
        let parsed: toml::Value = toml::from_str(&out).unwrap();
        let spry =
            &parsed["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["spry"];
        assert_eq!(spry["runtime_type"].as_str(), Some(RUNTIME_TYPE));
        assert_eq!(
            spry["privileged_without_host_devices"].as_bool(),
            Some(true)
        );
        assert_eq!(
            spry["options"]["ConfigPath"].as_str(),
            Some("/etc/spry/config.toml")
        );
    }

    #[test]
    fn installing_twice_changes_nothing() {
        let once = add_handler(USER_V3, Path::new("c.toml"), &settings()).unwrap();
        let twice = add_handler(&once, Path::new("c.toml"), &settings()).unwrap();
        assert_eq!(once, twice);
    }

    #[test]
    fn v2_configs_use_the_containerd_1x_plugin() {
        let out = add_handler("version = 2\n", Path::new("c.toml"), &settings()).unwrap();
        let parsed: toml::Value = toml::from_str(&out).unwrap();
        assert!(
            parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["spry"]
                .is_table()
        );
    }

    #[test]
    fn empty_config_becomes_v3() {
        let out = add_handler("", Path::new("c.toml"), &settings()).unwrap();
        assert!(out.starts_with("version = 3"), "{out}");
    }

    #[test]
    fn remove_undoes_add() {
        let added = add_handler(USER_V3, Path::new("c.toml"), &settings()).unwrap();
        let removed = remove_handler(&added, Path::new("c.toml")).unwrap();
        let parsed: toml::Value = toml::from_str(&removed).unwrap();
        let runtimes = &parsed["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"];
        assert!(runtimes.get("spry").is_none());
        assert!(runtimes.get("runc").is_some());
        assert_eq!(
            remove_handler(&removed, Path::new("c.toml")).unwrap(),
            removed
        );
    }

    #[test]
    fn bad_inputs_are_named() {
        let err = add_handler(
            "version = [",
            Path::new("/etc/containerd/config.toml"),
            &settings(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/etc/containerd/config.toml"));
        let err = add_handler("version = 7\n", Path::new("c.toml"), &settings()).unwrap_err();
        assert!(matches!(
            err,
            ContainerdConfigError::UnknownVersion { version: 7, .. }
        ));
        let err =
            add_handler("[plugins]\nfoo = 1\n", Path::new("c.toml"), &settings()).unwrap_err();
        assert!(matches!(
            err,
            ContainerdConfigError::UnknownVersion { version: 1, .. }
        ));
    }

    #[test]
    fn the_snapshotter_is_registered_for_the_handler_and_removed_again() {
        let socket = Path::new("/run/spry-snapshotter/snapshotter.sock");
        let with_handler = add_handler(USER_V3, Path::new("c.toml"), &settings()).unwrap();
        let out = add_snapshotter(&with_handler, Path::new("c.toml"), "spry", socket).unwrap();
        assert!(out.contains("# my comment stays"), "{out}");
        let parsed: toml::Value = toml::from_str(&out).unwrap();
        assert_eq!(
            parsed["proxy_plugins"]["spry"]["type"].as_str(),
            Some("snapshot")
        );
        let runtimes = &parsed["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"];
        assert_eq!(runtimes["spry"]["snapshotter"].as_str(), Some("spry"));
        assert!(runtimes["runc"].get("snapshotter").is_none());
        // The global default stays: runc pods keep overlayfs.
        let images = &parsed["plugins"]["io.containerd.cri.v1.images"];
        assert_eq!(images["snapshotter"].as_str(), Some("overlayfs"));
        assert_eq!(
            images["disable_snapshot_annotations"].as_bool(),
            Some(false)
        );
        assert_eq!(
            add_snapshotter(&out, Path::new("c.toml"), "spry", socket).unwrap(),
            out
        );
        let v2 = add_snapshotter("version = 2\n", Path::new("c.toml"), "spry", socket).unwrap();
        let parsed: toml::Value = toml::from_str(&v2).unwrap();
        let cri = &parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
        assert_eq!(
            cri["runtimes"]["spry"]["snapshotter"].as_str(),
            Some("spry")
        );
        assert_eq!(cri["disable_snapshot_annotations"].as_bool(), Some(false));

        let removed = remove_snapshotter(&out, Path::new("c.toml"), "spry").unwrap();
        let removed = remove_handler(&removed, Path::new("c.toml")).unwrap();
        let parsed: toml::Value = toml::from_str(&removed).unwrap();
        assert!(parsed
            .get("proxy_plugins")
            .is_none_or(|p| p.get("spry").is_none()));
        assert_eq!(
            remove_snapshotter(&removed, Path::new("c.toml"), "spry").unwrap(),
            removed
        );
    }
}
