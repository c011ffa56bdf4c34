//! Removal of the CNI portmap plugin's nat rules of one harness network. CNI DEL removes a
//! pod's rules when its sandbox is torn down; a containerd killed under a pod (the fault
//! tests, a crashed run) leaves them behind, and then a later pod with the same hostPort on
//! this host is DNATed to the dead pod's address first (critest's `127.0.0.1:<hostPort>`
//! spec timed out on such a rule, for runc and Spry alike).

use anyhow::{Context, Result};
use std::io::Write;
use std::process::{Command, Stdio};

/// The portmap plugin's entry chain in the nat table.
const DNAT_CHAIN: &str = "CNI-HOSTPORT-DNAT";

/// The harness's CNI network of the instance with bridge `bridge` (see `containerd_config`).
pub fn network_of_bridge(bridge: &str) -> String {
    format!("spry-it-{bridge}")
}

/// Deletes `network`'s rules from the nat tables (IPv4 and IPv6): its jumps in
/// CNI-HOSTPORT-DNAT and the per-pod chains they jump to. Returns how many pods' chains
/// went. A table without portmap's chain (no pod ever had a hostPort) is fine.
pub fn remove_portmap_rules(network: &str) -> Result<usize> {
    let mut removed = 0;
    for (list, restore) in [
        ("iptables", "iptables-restore"),
        ("ip6tables", "ip6tables-restore"),
    ] {
        let listed = Command::new(list)
            .args(["-w", "-t", "nat", "-S", DNAT_CHAIN])
            .output();
        let Ok(listed) = listed else { continue };
        if !listed.status.success() {
            continue;
        }
        let rules = String::from_utf8_lossy(&listed.stdout);
        let Some(script) = deletion_script(&rules, network) else {
            continue;
        };
        let mut child = Command::new(restore)
            .args(["-w", "--noflush"])
            .stdin(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {restore}"))?;
        child
            .stdin
            .take()
            .context("restore's stdin")?
            .write_all(script.text.as_bytes())?;
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "{restore} failed on:\n{}", script.text);
        removed += script.chains;
    }
    Ok(removed)
}

/// Removes the rules of every harness network whose bridge is gone (an instance whose
/// teardown predates this cleanup, or never ran); returns the networks.
pub fn remove_orphaned_portmap_rules() -> Result<Vec<String>> {
    let mut orphans = Vec::new();
    for list in ["iptables", "ip6tables"] {
        let Ok(listed) = Command::new(list)
            .args(["-w", "-t", "nat", "-S", DNAT_CHAIN])
            .output()
        else {
            continue;
        };
        for network in harness_networks(&String::from_utf8_lossy(&listed.stdout)) {
            let bridge = network.trim_start_matches("spry-it-");
            let gone = !std::path::Path::new("/sys/class/net").join(bridge).exists();
            if gone && !orphans.contains(&network) {
                orphans.push(network);
            }
        }
    }
    for network in &orphans {
        remove_portmap_rules(network)?;
    }
    Ok(orphans)
}

/// The harness networks (`spry-it-spryit<tag>`) named in `rules`' dnat comments.
fn harness_networks(rules: &str) -> Vec<String> {
    let mut networks = Vec::new();
    for rule in rules.lines() {
        let Some((_, rest)) = rule.split_once("dnat name: \\\"") else {
            continue;
        };
        let Some((network, _)) = rest.split_once("\\\"") else {
            continue;
        };
        let harness = network
            .strip_prefix("spry-it-spryit")
            .is_some_and(|tag| tag.len() == 8 && tag.chars().all(|c| c.is_ascii_hexdigit()));
        if harness && !networks.iter().any(|n| n == network) {
            networks.push(network.to_string());
        }
    }
    networks
}

struct DeletionScript {
    text: String,
    chains: usize,
}

/// An iptables-restore script deleting `network`'s jumps from `rules` (the output of `-S
/// CNI-HOSTPORT-DNAT`) and emptying and removing the chains they jump to; None if none.
fn deletion_script(rules: &str, network: &str) -> Option<DeletionScript> {
    let name = format!("dnat name: \\\"{network}\\\"");
    let mut deletes = Vec::new();
    let mut chains: Vec<&str> = Vec::new();
    for rule in rules.lines() {
        let Some(spec) = rule.strip_prefix(&format!("-A {DNAT_CHAIN} ")) else {
            continue;
        };
        if !rule.contains(&name) {
            continue;
        }
        let Some(chain) = rule.rsplit(" -j ").next().map(str::trim) else {
            continue;
        };
        deletes.push(format!("-D {DNAT_CHAIN} {spec}"));
        if chain.starts_with("CNI-DN-") && !chains.contains(&chain) {
            chains.push(chain);
        }
    }
    if deletes.is_empty() {
        return None;
    }
    let mut text = String::from("*nat\n");
    for line in deletes {
        text.push_str(&line);
        text.push('\n');
    }
    for chain in &chains {
        text.push_str(&format!("-F {chain}\n-X {chain}\n"));
    }
    text.push_str("COMMIT\n");
    Some(DeletionScript {
        text,
        chains: chains.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_networks_jumps_and_chains_go() {
        let rules = "-N CNI-HOSTPORT-DNAT\n\
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment \"dnat name: \\\"spry-it-spryit2c7f43c0\\\" id: \\\"1fa8\\\"\" -m multiport --dports 12000 -j CNI-DN-2f12990463f835d0cbe5c\n\
-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment \"dnat name: \\\"spry-it-spryitaaaaaaaa\\\" id: \\\"77\\\"\" -m multiport --dports 8080 -j CNI-DN-other\n";
        let script = deletion_script(rules, "spry-it-spryit2c7f43c0").unwrap();
        assert_eq!(script.chains, 1);
        assert_eq!(
            script.text,
            "*nat\n\
-D CNI-HOSTPORT-DNAT -p tcp -m comment --comment \"dnat name: \\\"spry-it-spryit2c7f43c0\\\" id: \\\"1fa8\\\"\" -m multiport --dports 12000 -j CNI-DN-2f12990463f835d0cbe5c\n\
-F CNI-DN-2f12990463f835d0cbe5c\n-X CNI-DN-2f12990463f835d0cbe5c\nCOMMIT\n"
        );
        assert!(deletion_script(rules, "spry-it-spryit00000000").is_none());
        // A network whose name is a prefix of another's is not mistaken for it.
        assert!(deletion_script(rules, "spry-it-spryit2c7f43").is_none());
        assert_eq!(
            harness_networks(rules),
            ["spry-it-spryit2c7f43c0", "spry-it-spryitaaaaaaaa"]
        );
        let foreign = "-A CNI-HOSTPORT-DNAT -m comment --comment \"dnat name: \\\"cbr0\\\" id: \\\"1\\\"\" -j CNI-DN-x\n";
        assert!(harness_networks(foreign).is_empty());
    }
}
