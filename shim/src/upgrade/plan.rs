//! What an upgrade will do, decided from what the runtime lists: which pod and container,
//! and the new container's config (the old one's, with the new image, the next attempt and
//! its own log file). Pure: unit-tested without a runtime.

use spry_proto::cri::{Container, ContainerConfig, ContainerState, PodSandbox, PodSandboxState};

use super::UpgradeError;

/// The label kubelet puts on every container it makes.
const KUBELET_POD_UID_LABEL: &str = "io.kubernetes.pod.uid";

/// The ready pod named `wanted`: its id, a unique id prefix, or its name (in `namespace`).
pub fn find_pod<'a>(
    pods: &'a [PodSandbox],
    wanted: &str,
    namespace: Option<&str>,
) -> Result<&'a PodSandbox, UpgradeError> {
    let ready = pods
        .iter()
        .filter(|pod| pod.state.enum_value() == Ok(PodSandboxState::SANDBOX_READY));
    if let Some(exact) = ready.clone().find(|pod| pod.id == wanted) {
        return Ok(exact);
    }
    let matches: Vec<&PodSandbox> = ready
        .filter(|pod| {
            let named = pod.metadata.name == wanted
                && namespace.is_none_or(|ns| pod.metadata.namespace == ns);
            named || (wanted.len() >= 4 && pod.id.starts_with(wanted))
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(UpgradeError::UnknownPod {
            pod: wanted.to_owned(),
        }),
        many => Err(UpgradeError::AmbiguousPod {
            pod: wanted.to_owned(),
            matches: many.iter().map(|pod| pod.id.clone()).collect(),
        }),
    }
}

/// The pod's running container named `name` (the latest attempt if several run).
pub fn find_container<'a>(
    containers: &'a [Container],
    pod: &str,
    name: &str,
) -> Result<&'a Container, UpgradeError> {
    let running = || {
        containers
            .iter()
            .filter(|c| c.state.enum_value() == Ok(ContainerState::CONTAINER_RUNNING))
    };
    running()
        .filter(|c| c.metadata.name == name)
        .max_by_key(|c| c.metadata.attempt)
        .ok_or_else(|| UpgradeError::UnknownContainer {
            pod: pod.to_owned(),
            container: name.to_owned(),
            running: running().map(|c| c.metadata.name.clone()).collect(),
        })
}

/// The attempt after every container of that name the pod has had (the runtime refuses a
/// name it already holds).
pub fn next_attempt(containers: &[Container], name: &str) -> u32 {
    containers
        .iter()
        .filter(|c| c.metadata.name == name)
        .map(|c| c.metadata.attempt + 1)
        .max()
        .unwrap_or(0)
}

/// A container kubelet made: kubelet owns its lifecycle and would fight a swap.
pub fn kubelet_managed(container: &Container) -> bool {
    container.labels.contains_key(KUBELET_POD_UID_LABEL)
}

/// The config of the container that replaces `old`: everything the same but the image,
/// the attempt and the log file (kubelet's `<name>/<attempt>.log` when that is the old
/// layout, so `logs --previous` style tooling finds each attempt).
pub fn successor(old: &ContainerConfig, image: &str, attempt: u32) -> ContainerConfig {
    let mut new = old.clone();
    new.image.mut_or_insert_default().image = image.to_owned();
    new.image.mut_or_insert_default().user_specified_image = image.to_owned();
    new.metadata.mut_or_insert_default().attempt = attempt;
    new.log_path = log_path_for(&old.log_path, &old.metadata.name, attempt);
    new
}

fn log_path_for(old: &str, name: &str, attempt: u32) -> String {
    if old.is_empty() {
        return String::new();
    }
    let kubelet_layout = old
        .strip_prefix(&format!("{name}/"))
        .and_then(|rest| rest.strip_suffix(".log"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if kubelet_layout {
        return format!("{name}/{attempt}.log");
    }
    match old.strip_suffix(".log") {
        Some(stem) => format!("{stem}.{attempt}.log"),
        None => format!("{old}.{attempt}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::{EnumOrUnknown, MessageField};
    use spry_proto::cri::{ContainerMetadata, PodSandboxMetadata};

    fn pod(id: &str, name: &str, ns: &str, ready: bool) -> PodSandbox {
        let mut pod = PodSandbox::new();
        pod.id = id.into();
        let mut meta = PodSandboxMetadata::new();
        meta.name = name.into();
        meta.namespace = ns.into();
        pod.metadata = MessageField::some(meta);
        pod.state = EnumOrUnknown::new(if ready {
            PodSandboxState::SANDBOX_READY
        } else {
            PodSandboxState::SANDBOX_NOTREADY
        });
        pod
    }

    fn container(id: &str, name: &str, attempt: u32, running: bool) -> Container {
        let mut c = Container::new();
        c.id = id.into();
        let mut meta = ContainerMetadata::new();
        meta.name = name.into();
        meta.attempt = attempt;
        c.metadata = MessageField::some(meta);
        c.state = EnumOrUnknown::new(if running {
            ContainerState::CONTAINER_RUNNING
        } else {
            ContainerState::CONTAINER_EXITED
        });
        c
    }

    #[test]
    fn pods_are_found_by_id_prefix_or_name_and_only_when_ready_and_unique() {
        let pods = [
            pod("aaaa1111", "web", "default", true),
            pod("aaaa2222", "web", "staging", true),
            pod("bbbb3333", "db", "default", true),
            pod("cccc4444", "old", "default", false),
        ];
        assert_eq!(find_pod(&pods, "bbbb", None).unwrap().id, "bbbb3333");
        assert_eq!(find_pod(&pods, "db", None).unwrap().id, "bbbb3333");
        assert_eq!(find_pod(&pods, "aaaa2222", None).unwrap().id, "aaaa2222");
        assert_eq!(
            find_pod(&pods, "web", Some("staging")).unwrap().id,
            "aaaa2222"
        );
        assert!(matches!(
            find_pod(&pods, "web", None),
            Err(UpgradeError::AmbiguousPod { matches, .. }) if matches.len() == 2
        ));
        assert!(matches!(
            find_pod(&pods, "old", None),
            Err(UpgradeError::UnknownPod { .. })
        ));
        // A prefix shorter than 4 is too easy to get wrong.
        assert!(matches!(
            find_pod(&pods, "bbb", None),
            Err(UpgradeError::UnknownPod { .. })
        ));
    }

    #[test]
    fn the_running_container_of_that_name_is_picked_and_attempts_only_go_up() {
        let containers = [
            container("c0", "app", 0, false),
            container("c1", "app", 1, true),
            container("s0", "sidecar", 0, true),
        ];
        assert_eq!(find_container(&containers, "p", "app").unwrap().id, "c1");
        match find_container(&containers, "p", "nope") {
            Err(UpgradeError::UnknownContainer { running, .. }) => {
                assert_eq!(running, ["app", "sidecar"])
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(next_attempt(&containers, "app"), 2);
        assert_eq!(next_attempt(&containers, "sidecar"), 1);
        assert_eq!(next_attempt(&containers, "new"), 0);
    }

    #[test]
    fn the_successor_keeps_the_config_but_image_attempt_and_log() {
        let mut old = ContainerConfig::new();
        old.metadata.mut_or_insert_default().name = "app".into();
        old.image.mut_or_insert_default().image = "reg/app:1".into();
        old.args = vec!["--port".into(), "80".into()];
        old.log_path = "app/0.log".into();
        old.labels.insert("tier".into(), "web".into());
        let new = successor(&old, "reg/app:2", 1);
        assert_eq!(new.image.image, "reg/app:2");
        assert_eq!(new.metadata.attempt, 1);
        assert_eq!(new.log_path, "app/1.log");
        assert_eq!(
            (new.args.clone(), new.labels.clone()),
            (old.args, old.labels)
        );

        assert_eq!(log_path_for("app.log", "app", 3), "app.3.log");
        assert_eq!(log_path_for("out", "app", 3), "out.3");
        assert_eq!(log_path_for("app/x.log", "app", 3), "app/x.3.log");
        assert_eq!(log_path_for("", "app", 3), "");
    }
}
