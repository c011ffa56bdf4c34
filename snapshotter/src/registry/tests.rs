use std::sync::atomic::Ordering;

use hyper::body::Bytes;

use super::*;
use crate::testutil::registry::{Auth, MockRegistry};

fn client(host: &str, user: &str, pass: &str) -> RegistryClient {
    let mut config = RegistryConfig::default();
    config.hosts.insert(
        host.to_string(),
        HostConfig {
            insecure: true,
            username: Some(user.into()),
            password: Some(pass.into()),
            ..HostConfig::default()
        },
    );
    config.request_timeout_ms = 5_000;
    RegistryClient::new(config).unwrap()
}

fn blob() -> Vec<u8> {
    (0..100_000u32).map(|i| (i % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_auth_and_redirect_to_storage() {
    let reg = MockRegistry::start(
        &tokio::runtime::Handle::current(),
        Auth::Bearer {
            user: "u".into(),
            pass: "p".into(),
        },
        true,
    );
    let data = blob();
    let digest = reg.put_blob(data.clone());
    let c = client(&reg.host(), "u", "p");
    let r = Reference::parse(&format!("{}/team/app:1", reg.host())).unwrap();
    assert_eq!(c.blob_size(&r, &digest).await.unwrap(), data.len() as u64);
    assert_eq!(
        c.blob_range(&r, &digest, 1000, 5000).await.unwrap(),
        data[1000..6000].to_vec()
    );
    assert_eq!(reg.state.range_requests.load(Ordering::SeqCst), 1);
    let mut out = Vec::new();
    c.blob_to(&r, &digest, &mut out).await.unwrap();
    assert_eq!(out, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_push_and_pull_manifest() {
    let reg = MockRegistry::start(
        &tokio::runtime::Handle::current(),
        Auth::Basic {
            user: "u".into(),
            pass: "p".into(),
        },
        false,
    );
    let c = client(&reg.host(), "u", "p");
    let r = Reference::parse(&format!("{}/app:v1", reg.host())).unwrap();
    let data = Bytes::from(blob());
    let digest = crate::estargz::sha256_digest(&data);
    c.push_blob(&r, &digest, data.clone()).await.unwrap();
    assert_eq!(reg.state.blobs.lock().unwrap()[&digest], data.to_vec());
    let manifest = br#"{"schemaVersion":2}"#.to_vec();
    c.push_manifest(
        &r,
        "application/vnd.oci.image.manifest.v1+json",
        Bytes::from(manifest.clone()),
    )
    .await
    .unwrap();
    let got = c.manifest(&r).await.unwrap();
    assert_eq!(got.bytes.to_vec(), manifest);
    assert_eq!(got.media_type, "application/vnd.oci.image.manifest.v1+json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_reported() {
    let reg = MockRegistry::start(
        &tokio::runtime::Handle::current(),
        Auth::Bearer {
            user: "u".into(),
            pass: "p".into(),
        },
        false,
    );
    let digest = reg.put_blob(blob());
    let c = client(&reg.host(), "u", "wrong");
    let r = Reference::parse(&format!("{}/app:v1", reg.host())).unwrap();
    let err = c.blob_range(&r, &digest, 0, 10).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::Token { status: 401, .. }),
        "{err:?}"
    );
    let reg2 = MockRegistry::start(
        &tokio::runtime::Handle::current(),
        Auth::Basic {
            user: "u".into(),
            pass: "p".into(),
        },
        false,
    );
    let c = client(&reg2.host(), "u", "wrong");
    let r = Reference::parse(&format!("{}/app:v1", reg2.host())).unwrap();
    let err = c.blob_size(&r, &digest).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_registry_fails_fast_and_recovers() {
    let reg = MockRegistry::start(&tokio::runtime::Handle::current(), Auth::None, false);
    let digest = reg.put_blob(blob());
    let c = client(&reg.host(), "u", "p");
    let r = Reference::parse(&format!("{}/app:v1", reg.host())).unwrap();
    reg.go_down();
    let started = std::time::Instant::now();
    let err = c.blob_range(&r, &digest, 0, 10).await.unwrap_err();
    assert!(matches!(err, RegistryError::Request { .. }), "{err:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    reg.come_back();
    assert_eq!(
        c.blob_range(&r, &digest, 0, 10).await.unwrap(),
        blob()[..10].to_vec()
    );
}

#[test]
fn schemes_follow_host_settings() {
    let mut config = RegistryConfig::default();
    config.hosts.insert(
        "plain.example:5000".into(),
        HostConfig {
            insecure: true,
            ..HostConfig::default()
        },
    );
    config.hosts.insert(
        "localhost:5443".into(),
        HostConfig {
            ca: Some("/etc/ssl/certs/ca-certificates.crt".into()),
            ..HostConfig::default()
        },
    );
    assert_eq!(config.scheme("registry.example.com"), "https");
    assert_eq!(config.scheme("plain.example:5000"), "http");
    assert_eq!(config.scheme("localhost:5000"), "http");
    assert_eq!(config.scheme("127.0.0.1:5000"), "http");
    assert_eq!(config.scheme("localhost:5443"), "https");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_override_redirects_connections() {
    let reg = MockRegistry::start(&tokio::runtime::Handle::current(), Auth::None, false);
    let digest = reg.put_blob(blob());
    let mut config = RegistryConfig::default();
    config.hosts.insert(
        "mirror.test:5000".into(),
        HostConfig {
            insecure: true,
            endpoint: Some(reg.host()),
            ..HostConfig::default()
        },
    );
    let c = RegistryClient::new(config).unwrap();
    let r = Reference::parse("mirror.test:5000/app:v1").unwrap();
    assert_eq!(
        c.blob_range(&r, &digest, 5, 5).await.unwrap(),
        blob()[5..10].to_vec()
    );
}
