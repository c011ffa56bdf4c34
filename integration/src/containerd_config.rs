//! The files a private containerd 2.x instance needs: its config (version 3), a CNI network and
//! registry host configuration. Pure functions, unit-tested without root.

use anyhow::{Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// Everything that differs between instances.
#[derive(Debug, Clone)]
pub struct ConfigInputs {
    pub root: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub certs_dir: PathBuf,
    pub sandbox_image: String,
    pub snapshotter: String,
    pub log_level: String,
}

/// containerd 2.x config (version 3) with CRI enabled, runc as the default runtime, then every
/// `extra` TOML document deep-merged on top (tables merge key by key; other values replace).
pub fn render_config(inputs: &ConfigInputs, extra: &[String]) -> Result<String> {
    let base = format!(
        r#"
version = 3
root = {root}
state = {state}
# NRI listens on a fixed host-wide socket: concurrent test instances would fight over it.
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
address = {socket}

[debug]
level = {log_level}

[plugins."io.containerd.cri.v1.images"]
snapshotter = {snapshotter}
disable_snapshot_annotations = false

[plugins."io.containerd.cri.v1.images".pinned_images]
sandbox = {sandbox_image}

[plugins."io.containerd.cri.v1.images".registry]
config_path = {certs_dir}

[plugins."io.containerd.cri.v1.runtime"]
# No CAP_SYS_RESOURCE here: never lower oom_score_adj below our own.
restrict_oom_score_adj = true
# Keep netns bind mounts under our state dir, so cleanup finds (and only finds) ours.
netns_mounts_under_state_dir = true

[plugins."io.containerd.cri.v1.runtime".containerd]
default_runtime_name = "runc"

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
SystemdCgroup = false

[plugins."io.containerd.cri.v1.runtime".cni]
bin_dirs = [{cni_bin_dir}]
conf_dir = {cni_conf_dir}
max_conf_num = 1
"#,
        root = toml_str(&inputs.root.to_string_lossy()),
        state = toml_str(&inputs.state.to_string_lossy()),
        socket = toml_str(&inputs.socket.to_string_lossy()),
        log_level = toml_str(&inputs.log_level),
        snapshotter = toml_str(&inputs.snapshotter),
        sandbox_image = toml_str(&inputs.sandbox_image),
        certs_dir = toml_str(&inputs.certs_dir.to_string_lossy()),
        cni_bin_dir = toml_str(&inputs.cni_bin_dir.to_string_lossy()),
        cni_conf_dir = toml_str(&inputs.cni_conf_dir.to_string_lossy()),
    );
    let mut config: Table = base.parse().context("parsing the base containerd config")?;
    for (i, doc) in extra.iter().enumerate() {
        let table: Table = doc
            .parse()
            .with_context(|| format!("parsing extra containerd TOML #{i}:\n{doc}"))?;
        merge(&mut config, table);
    }
    toml::to_string(&config).context("serialising the containerd config")
}

/// Deep merge: tables merge recursively, anything else in `overlay` replaces what `base` had.
pub fn merge(base: &mut Table, overlay: Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(existing)), Value::Table(incoming)) => merge(existing, incoming),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// TOML for a CRI runtime handler, e.g. `runtime_handler_toml("spry", "io.containerd.spry.v1", None)`.
/// `runtime_path` pins the shim binary instead of containerd's PATH lookup.
pub fn runtime_handler_toml(
    handler: &str,
    runtime_type: &str,
    runtime_path: Option<&Path>,
) -> String {
    let mut doc = format!(
        "[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.{handler}]\nruntime_type = {}\n",
        toml_str(runtime_type)
    );
    if let Some(path) = runtime_path {
        doc.push_str(&format!(
            "runtime_path = {}\n",
            toml_str(&path.to_string_lossy())
        ));
    }
    doc
}

/// TOML registering a remote snapshotter (`proxy_plugins`) listening on `socket`.
pub fn proxy_snapshotter_toml(name: &str, socket: &Path) -> String {
    format!(
        "[proxy_plugins.{name}]\ntype = \"snapshot\"\naddress = {}\n",
        toml_str(&socket.to_string_lossy())
    )
}

/// The MTU of the test pod network: below 1500, as overlay networks (VXLAN: 1450) have it, so
/// a runtime that ignores the veth's MTU shows.
pub const POD_MTU: u32 = 1400;

/// A CNI network of its own per instance: bridge + host-local + portmap + loopback, IPv4 and,
/// when `subnet6` is given, IPv6 (dual stack); or `main_plugin` + loopback. The bridge name and subnets are unique so
/// concurrent instances don't share a bridge or routes; pods reach each other, the host
/// (the bridge's address is their gateway) and hostPorts.
pub fn cni_conflist(
    network: &str,
    bridge: &str,
    subnet: &str,
    subnet6: Option<&str>,
    main_plugin: Option<&serde_json::Value>,
    ipam_data_dir: &Path,
) -> serde_json::Value {
    let mut ranges = vec![json!([{ "subnet": subnet }])];
    let mut routes = vec![json!({ "dst": "0.0.0.0/0" })];
    if let Some(subnet6) = subnet6 {
        ranges.push(json!([{ "subnet": subnet6 }]));
        routes.push(json!({ "dst": "::/0" }));
    }
    let mut plugins = vec![json!(
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "mtu": POD_MTU,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam_data_dir,
                    "ranges": ranges,
                    "routes": routes
                }
            }
    )];
    plugins.push(json!({ "type": "portmap", "capabilities": { "portMappings": true } }));
    if let Some(main) = main_plugin {
        plugins = vec![main.clone()];
    }
    plugins.push(json!({ "type": "loopback" }));
    json!({
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": plugins
    })
}

/// `certs.d/<host>/hosts.toml`: plain HTTP to the local registry at `addr`, for images named `host/...`.
pub fn registry_hosts_toml(addr: &str) -> String {
    format!(
        "server = \"http://{addr}\"\n\n[host.\"http://{addr}\"]\ncapabilities = [\"pull\", \"resolve\", \"push\"]\nskip_verify = true\n"
    )
}

fn toml_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> ConfigInputs {
        ConfigInputs {
            root: "/r".into(),
            state: "/s".into(),
            socket: "/s/c.sock".into(),
            cni_conf_dir: "/c/net.d".into(),
            cni_bin_dir: "/usr/lib/cni".into(),
            certs_dir: "/c/certs.d".into(),
            sandbox_image: "localhost:1/pause:1".into(),
            snapshotter: "overlayfs".into(),
            log_level: "info".into(),
        }
    }

    fn get<'a>(t: &'a Table, path: &[&str]) -> &'a Value {
        let (last, head) = path.split_last().unwrap();
        let table = head.iter().fold(t, |t, k| t[*k].as_table().unwrap());
        &table[*last]
    }

    #[test]
    fn base_config_has_cri_settings() {
        let cfg: Table = render_config(&inputs(), &[]).unwrap().parse().unwrap();
        assert_eq!(cfg["version"].as_integer(), Some(3));
        let runtime = ["plugins", "io.containerd.cri.v1.runtime"];
        assert_eq!(
            get(&cfg, &[&runtime[..], &["restrict_oom_score_adj"]].concat()).as_bool(),
            Some(true)
        );
        let images = ["plugins", "io.containerd.cri.v1.images"];
        assert_eq!(
            get(&cfg, &[&images[..], &["pinned_images", "sandbox"]].concat()).as_str(),
            Some("localhost:1/pause:1")
        );
        assert_eq!(get(&cfg, &["grpc", "address"]).as_str(), Some("/s/c.sock"));
    }

    #[test]
    fn extra_toml_merges_into_existing_tables() {
        let extra = [
            runtime_handler_toml(
                "spry",
                "io.containerd.spry.v1",
                Some(Path::new("/bin/shim")),
            ),
            proxy_snapshotter_toml("spry-estargz", Path::new("/run/snap.sock")),
            "[plugins.\"io.containerd.cri.v1.images\"]\nsnapshotter = \"spry-estargz\"\n"
                .to_string(),
        ];
        let cfg: Table = render_config(&inputs(), &extra).unwrap().parse().unwrap();
        let runtimes = [
            "plugins",
            "io.containerd.cri.v1.runtime",
            "containerd",
            "runtimes",
        ];
        assert_eq!(
            get(&cfg, &[&runtimes[..], &["spry", "runtime_type"]].concat()).as_str(),
            Some("io.containerd.spry.v1")
        );
        assert_eq!(
            get(&cfg, &[&runtimes[..], &["runc", "runtime_type"]].concat()).as_str(),
            Some("io.containerd.runc.v2")
        );
        assert_eq!(
            get(
                &cfg,
                &["plugins", "io.containerd.cri.v1.images", "snapshotter"]
            )
            .as_str(),
            Some("spry-estargz")
        );
        // Merging kept the sibling keys of the overridden table.
        assert_eq!(
            get(
                &cfg,
                &[
                    "plugins",
                    "io.containerd.cri.v1.images",
                    "disable_snapshot_annotations"
                ]
            )
            .as_bool(),
            Some(false)
        );
        assert_eq!(
            get(&cfg, &["proxy_plugins", "spry-estargz", "address"]).as_str(),
            Some("/run/snap.sock")
        );
    }

    #[test]
    fn bad_extra_toml_is_reported_with_its_text() {
        let err = render_config(&inputs(), &["not toml [".to_string()]).unwrap_err();
        assert!(format!("{err:#}").contains("not toml ["), "{err:#}");
    }

    #[test]
    fn cni_and_hosts_files() {
        let conf = cni_conflist("net", "br0", "10.200.1.0/24", None, None, Path::new("/d"));
        assert_eq!(conf["plugins"][0]["bridge"], "br0");
        assert_eq!(conf["plugins"][0]["mtu"], POD_MTU);
        assert_eq!(
            conf["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.200.1.0/24"
        );
        assert_eq!(conf["plugins"][1]["type"], "portmap");
        let dual = cni_conflist(
            "net",
            "br0",
            "10.200.1.0/24",
            Some("fd10::/64"),
            None,
            Path::new("/d"),
        );
        assert_eq!(
            dual["plugins"][0]["ipam"]["ranges"][1][0]["subnet"],
            "fd10::/64"
        );
        assert_eq!(dual["plugins"][0]["ipam"]["routes"][1]["dst"], "::/0");
        let device = json!({ "type": "host-device", "device": "ifb7" });
        let other = cni_conflist(
            "net",
            "br0",
            "10.200.1.0/24",
            None,
            Some(&device),
            Path::new("/d"),
        );
        assert_eq!(other["plugins"][0]["type"], "host-device");
        assert_eq!(other["plugins"][1]["type"], "loopback");
        let hosts: Table = registry_hosts_toml("127.0.0.1:5000").parse().unwrap();
        assert_eq!(hosts["server"].as_str(), Some("http://127.0.0.1:5000"));
    }
}
