//! HTTPS against an in-process registry with a throwaway CA.

use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use crate::testutil::registry::{Auth, MockOptions, MockRegistry};
use crate::testutil::tls::{test_pki, TestPki};

fn blob() -> Vec<u8> {
    (0..50_000u32).map(|i| (i % 241) as u8).collect()
}

fn tls_registry(
    pki: &TestPki,
    auth: Auth,
    redirect: bool,
    storage: Option<String>,
) -> Arc<MockRegistry> {
    MockRegistry::start_with(
        &tokio::runtime::Handle::current(),
        MockOptions {
            auth,
            redirect,
            storage,
            tls: Some(pki.server.clone()),
        },
    )
}

fn write_ca(dir: &tempfile::TempDir, pki: &TestPki) -> PathBuf {
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, &pki.ca_pem).unwrap();
    path
}

/// A client for `registry.test` (so HTTPS, not loopback's plain HTTP) that
/// connects to `endpoint`, trusting `ca` there when given.
fn client_for(endpoint: &str, ca: Option<PathBuf>) -> RegistryClient {
    let mut config = RegistryConfig {
        request_timeout_ms: 5_000,
        ..RegistryConfig::default()
    };
    config.hosts.insert(
        "registry.test".into(),
        HostConfig {
            endpoint: Some(endpoint.into()),
            ca,
            username: Some("u".into()),
            password: Some("p".into()),
            ..HostConfig::default()
        },
    );
    RegistryClient::new(config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_range_fetch_with_configured_ca() {
    let pki = test_pki(&["localhost", "127.0.0.1"]);
    let bearer = Auth::Bearer {
        user: "u".into(),
        pass: "p".into(),
    };
    // Bearer tokens from an https realm, blobs redirected to https storage.
    let reg = tls_registry(&pki, bearer, true, None);
    let data = blob();
    let digest = reg.put_blob(data.clone());
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("localhost:{}", reg.addr.port());
    let c = client_for(&endpoint, Some(write_ca(&dir, &pki)));
    let r = Reference::parse("registry.test/team/app:1").unwrap();
    assert_eq!(c.blob_size(&r, &digest).await.unwrap(), data.len() as u64);
    assert_eq!(
        c.blob_range(&r, &digest, 1000, 4000).await.unwrap(),
        data[1000..5000].to_vec()
    );
    let mut out = Vec::new();
    c.blob_to(&r, &digest, &mut out).await.unwrap();
    assert_eq!(out, data);

    // A loopback host with a `ca` speaks HTTPS too.
    let mut config = RegistryConfig::default();
    config.hosts.insert(
        endpoint.clone(),
        HostConfig {
            ca: Some(write_ca(&dir, &pki)),
            username: Some("u".into()),
            password: Some("p".into()),
            ..HostConfig::default()
        },
    );
    let c = RegistryClient::new(config).unwrap();
    let r = Reference::parse(&format!("{endpoint}/app:1")).unwrap();
    assert_eq!(c.blob_size(&r, &digest).await.unwrap(), data.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_without_the_ca_is_an_untrusted_certificate() {
    let pki = test_pki(&["localhost"]);
    let reg = tls_registry(&pki, Auth::None, false, None);
    let digest = reg.put_blob(blob());
    let endpoint = format!("localhost:{}", reg.addr.port());
    let c = client_for(&endpoint, None);
    let r = Reference::parse("registry.test/app:1").unwrap();
    let err = c.blob_range(&r, &digest, 0, 10).await.unwrap_err();
    let RegistryError::UntrustedCertificate { host, .. } = &err else {
        panic!("expected an untrusted certificate, got {err:?}");
    };
    assert_eq!(host, &endpoint);
    let message = err.to_string();
    assert!(message.contains(&endpoint), "{message}");
    assert!(message.contains("not trusted"), "{message}");

    // The right CA but a name the certificate lacks is a TLS error, not "untrusted".
    let dir = tempfile::tempdir().unwrap();
    let mut config = RegistryConfig::default();
    let ip_endpoint = format!("127.0.0.1:{}", reg.addr.port());
    config.hosts.insert(
        "registry.test".into(),
        HostConfig {
            endpoint: Some(ip_endpoint),
            ca: Some(write_ca(&dir, &pki)),
            ..HostConfig::default()
        },
    );
    let c = RegistryClient::new(config).unwrap();
    let err = c.blob_size(&r, &digest).await.unwrap_err();
    assert!(matches!(err, RegistryError::Tls { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_cross_between_http_and_https() {
    let pki = test_pki(&["localhost"]);
    let data = blob();
    let dir = tempfile::tempdir().unwrap();
    let ca = write_ca(&dir, &pki);

    // HTTPS registry -> plain-HTTP blob storage.
    let plain_storage = MockRegistry::start(&tokio::runtime::Handle::current(), Auth::None, false);
    let digest = plain_storage.put_blob(data.clone());
    let storage = Some(plain_storage.base_url());
    let reg = tls_registry(&pki, Auth::None, true, storage);
    reg.put_blob(data.clone());
    let c = client_for(&format!("localhost:{}", reg.addr.port()), Some(ca.clone()));
    let r = Reference::parse("registry.test/app:1").unwrap();
    assert_eq!(
        c.blob_range(&r, &digest, 7, 70).await.unwrap(),
        data[7..77].to_vec()
    );
    assert_eq!(
        plain_storage
            .state
            .range_requests
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // Plain-HTTP registry -> HTTPS blob storage, trusted through its own host entry.
    let tls_storage = tls_registry(&pki, Auth::None, false, None);
    tls_storage.put_blob(data.clone());
    let storage_host = format!("localhost:{}", tls_storage.addr.port());
    let reg = MockRegistry::start_with(
        &tokio::runtime::Handle::current(),
        MockOptions {
            auth: Auth::None,
            redirect: true,
            storage: Some(tls_storage.base_url()),
            tls: None,
        },
    );
    reg.put_blob(data.clone());
    let mut config = RegistryConfig::default();
    config.hosts.insert(
        storage_host,
        HostConfig {
            ca: Some(ca),
            ..HostConfig::default()
        },
    );
    let c = RegistryClient::new(config).unwrap();
    let r = Reference::parse(&format!("{}/app:1", reg.host())).unwrap();
    assert_eq!(
        c.blob_range(&r, &digest, 100, 50).await.unwrap(),
        data[100..150].to_vec()
    );
}

#[test]
fn ca_settings_are_checked_at_load() {
    let pki = test_pki(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let ca = write_ca(&dir, &pki);
    let with = |ca: PathBuf, insecure: bool| {
        let mut config = RegistryConfig::default();
        config.hosts.insert(
            "r.test".into(),
            HostConfig {
                ca: Some(ca),
                insecure,
                ..HostConfig::default()
            },
        );
        config.validate()
    };
    with(ca.clone(), false).unwrap();
    assert!(matches!(
        with(ca.clone(), true),
        Err(HostConfigError::InsecureWithCa { .. })
    ));
    assert!(matches!(
        with("ca.pem".into(), false),
        Err(HostConfigError::Ca {
            source: TlsConfigError::Relative { .. },
            ..
        })
    ));
    assert!(matches!(
        with(dir.path().join("missing.pem"), false),
        Err(HostConfigError::Ca {
            source: TlsConfigError::Read { .. },
            ..
        })
    ));
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    assert!(matches!(
        with(junk, false),
        Err(HostConfigError::Ca {
            source: TlsConfigError::Empty { .. },
            ..
        })
    ));
}
