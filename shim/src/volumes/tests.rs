use std::path::Path;

use oci_spec::runtime::{MountBuilder, Spec};
use spry_proto::agent::volume_mount;

use super::*;

fn bind(destination: &str, source: &Path, options: &[&str]) -> Mount {
    MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        .build()
        .unwrap()
}

fn spec_with(mounts: Vec<Mount>) -> Spec {
    let mut spec = Spec::default();
    let mut all = spec.mounts().clone().unwrap();
    all.extend(mounts);
    spec.set_mounts(Some(all));
    spec
}

fn destinations(spec: &Spec) -> Vec<String> {
    spec.mounts()
        .as_ref()
        .unwrap()
        .iter()
        .filter(|m| !is_bind(m))
        .map(|m| m.destination().display().to_string())
        .collect()
}

#[test]
fn cri_files_are_copied_host_paths_shared_and_dev_shm_is_the_pods() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let log = dir.path().join("termination-log");
    std::fs::write(&log, "").unwrap();
    let mut spec = spec_with(vec![
        bind("/etc/hosts", &hosts, &["rbind", "ro"]),
        bind("/data", &data, &["rbind", "rprivate", "rw"]),
        bind("/dev/termination-log", &log, &["rbind"]),
        bind("/dev/shm", Path::new("/nonexistent/shm"), &["rbind"]),
    ]);

    let volumes = plan(&mut spec).unwrap();

    assert_eq!(volumes.files.len(), 1);
    assert_eq!(volumes.files[0].destination, "/etc/hosts");
    assert_eq!(volumes.files[0].content, b"127.0.0.1 localhost\n");
    assert!(volumes.files[0].readonly);
    let shared: Vec<_> = volumes
        .shared
        .iter()
        .map(|v| (v.destination.display().to_string(), v.is_dir, v.readonly))
        .collect();
    assert_eq!(
        shared,
        [
            ("/data".to_string(), true, ReadOnly::No),
            ("/dev/termination-log".to_string(), false, ReadOnly::No)
        ]
    );
    assert_eq!(volumes.shared[0].options, ["rbind", "rprivate", "rw"]);
    assert_eq!(volumes.guest.len(), 1);
    assert_eq!(
        volumes.guest[0].source,
        Some(volume_mount::Source::PodShm(true))
    );
    // Every bind mount is out of the spec; the others (/proc, /dev...) stay.
    let all = spec.mounts().as_ref().unwrap();
    assert!(all.iter().all(|m| !is_bind(m)));
    assert!(destinations(&spec).contains(&"/proc".to_string()));
}

#[test]
fn a_symlinked_source_is_shared_as_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let mut spec = spec_with(vec![bind("/data", &link, &["rbind"])]);
    let volumes = plan(&mut spec).unwrap();
    assert_eq!(volumes.shared[0].source, target.canonicalize().unwrap());
    assert!(volumes.shared[0].is_dir);
}

#[test]
fn a_missing_source_fails_naming_it() {
    let missing = Path::new("/nonexistent/spry-volume");
    let mut spec = spec_with(vec![bind("/data", missing, &["rbind"])]);
    let err = plan(&mut spec).unwrap_err();
    assert!(matches!(err, VolumeError::MissingSource { .. }));
    let message = err.to_string();
    assert!(
        message.contains("/nonexistent/spry-volume") && message.contains("/data"),
        "{message}"
    );
}

#[test]
fn bidirectional_propagation_is_refused_and_other_modes_pass() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec_with(vec![bind("/data", dir.path(), &["rbind", "rshared"])]);
    let err = plan(&mut spec).unwrap_err();
    assert!(
        matches!(&err, VolumeError::UnsupportedPropagation { mode, .. } if mode == "rshared"),
        "{err}"
    );
    let mut spec = spec_with(vec![bind("/data", dir.path(), &["rbind", "rslave"])]);
    assert_eq!(plan(&mut spec).unwrap().shared.len(), 1);
}

#[test]
fn a_device_or_socket_source_is_refused() {
    let mut spec = spec_with(vec![bind(
        "/dev/null-copy",
        Path::new("/dev/null"),
        &["rbind"],
    )]);
    let err = plan(&mut spec).unwrap_err();
    assert!(
        matches!(err, VolumeError::UnsupportedSource { .. }),
        "{err}"
    );
}
