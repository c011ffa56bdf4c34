//! Workloads the kubelet tests and benchmark apply, as YAML.

/// A bare pod whose container `main` runs `script` in `image` under RuntimeClass
/// `runtime_class` (`None`: the node's default, runc). `extra` is more YAML for the
/// container, indented four spaces (probes, `stdin: true`...).
pub fn pod(
    name: &str,
    runtime_class: Option<&str>,
    image: &str,
    script: &str,
    extra: &str,
) -> String {
    let class = runtime_class
        .map(|c| format!("  runtimeClassName: {c}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n\
         {class}  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    \
         image: {image}\n    command: [\"sh\", \"-c\", {script:?}]\n{extra}"
    )
}

/// A Deployment of `replicas` pods (label `app: NAME`) sleeping in `image`.
pub fn deployment(name: &str, runtime_class: Option<&str>, image: &str, replicas: u32) -> String {
    let class = runtime_class
        .map(|c| format!("      runtimeClassName: {c}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  \
         replicas: {replicas}\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    \
         metadata:\n      labels: {{app: {name}}}\n    spec:\n{class}      \
         terminationGracePeriodSeconds: 1\n      containers:\n      - name: main\n        \
         image: {image}\n        command: [sleep, \"3600\"]\n"
    )
}

/// A RuntimeClass `name` for containerd handler `handler`, without overhead (runc's).
pub fn runtime_class(name: &str, handler: &str) -> String {
    format!("apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: {name}\nhandler: {handler}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_name_their_runtime_class_only_when_given() {
        assert!(pod("p", Some("spry"), "img", "echo hi", "").contains("  runtimeClassName: spry\n"));
        assert!(!pod("p", None, "img", "echo hi", "").contains("runtimeClassName"));
        let d = deployment("trio", Some("spry"), "img", 3);
        assert!(d.contains("replicas: 3") && d.contains("      runtimeClassName: spry\n"));
        assert!(runtime_class("runc", "runc").ends_with("handler: runc\n"));
    }
}
