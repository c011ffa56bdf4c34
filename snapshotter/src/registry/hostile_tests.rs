//! The registry client against a hostile registry: one that names a plain-HTTP token
//! server elsewhere to collect credentials, redirects from HTTPS to HTTP, sends endless
//! bodies, or answers a digest with other content.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Request, Response, StatusCode};

use super::*;

type Handler = Arc<dyn Fn(&Request<Body>) -> Response<Body> + Send + Sync>;

/// A server on 127.0.0.1 that answers every request with `handler` and records the
/// Authorization header of each (None when absent).
fn serve(handler: Handler) -> (SocketAddr, Arc<Mutex<Vec<Option<String>>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let log = seen.clone();
    let make = make_service_fn(move |_| {
        let (handler, log) = (handler.clone(), log.clone());
        async move {
            Ok::<_, std::convert::Infallible>(service_fn(move |req: Request<Body>| {
                let auth = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_string());
                log.lock().unwrap().push(auth);
                let resp = handler(&req);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            }))
        }
    });
    tokio::spawn(hyper::Server::from_tcp(listener).unwrap().serve(make));
    (addr, seen)
}

fn client_for(host: &str) -> RegistryClient {
    let mut config = RegistryConfig::default();
    config.hosts.insert(
        host.to_string(),
        HostConfig {
            insecure: true,
            username: Some("alice".into()),
            password: Some("secret".into()),
            ..HostConfig::default()
        },
    );
    config.request_timeout_ms = 5_000;
    RegistryClient::new(config).unwrap()
}

fn reply(status: StatusCode, body: Body) -> Response<Body> {
    Response::builder().status(status).body(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_go_to_a_plain_http_token_server_on_another_host() {
    let (collector, collected) = serve(Arc::new(|_| {
        reply(StatusCode::OK, Body::from(r#"{"token":"stolen"}"#))
    }));
    let realm = format!("http://{collector}/token");
    let (registry, _) = serve(Arc::new(move |_| {
        Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("www-authenticate", format!("Bearer realm=\"{realm}\""))
            .body(Body::empty())
            .unwrap()
    }));
    let c = client_for(&registry.to_string());
    let r = Reference::parse(&format!("{registry}/team/app:1")).unwrap();
    let err = c.manifest(&r).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::InsecureRealm { .. }),
        "{err:?}"
    );
    assert!(
        collected.lock().unwrap().is_empty(),
        "the collector was contacted"
    );
}

#[test]
fn a_registry_token_is_sent_only_to_the_registrys_scheme_and_host() {
    use super::auth::url_origin;
    let registry = "https://reg.example:443/v2/a/blobs/sha256:x";
    let same = |url| url_origin(url) == url_origin(registry);
    assert!(same("https://reg.example:443/v2/other"));
    assert!(
        !same("http://reg.example:443/v2/a/blobs/sha256:x"),
        "https to http"
    );
    assert!(!same("https://storage.example/blob"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_manifest_is_cut_off_at_the_limit() {
    let (registry, _) = serve(Arc::new(|_| {
        let piece = hyper::body::Bytes::from(vec![b' '; 1 << 20]);
        let endless = futures::stream::repeat(piece).map(Ok::<_, std::io::Error>);
        reply(StatusCode::OK, Body::wrap_stream(endless))
    }));
    let c = client_for(&registry.to_string());
    let r = Reference::parse(&format!("{registry}/team/app:1")).unwrap();
    let err = c.manifest(&r).await.unwrap_err();
    assert!(matches!(err, RegistryError::BodyTooLarge { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_fetched_by_digest_must_have_that_digest() {
    let (registry, _) = serve(Arc::new(|_| {
        reply(StatusCode::OK, Body::from(r#"{"schemaVersion":2}"#))
    }));
    let c = client_for(&registry.to_string());
    let wanted = format!("sha256:{}", "0".repeat(64));
    let r = Reference::parse(&format!("{registry}/team/app@{wanted}")).unwrap();
    let err = c.manifest(&r).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::ManifestDigest { .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_answer_larger_than_asked_is_refused() {
    let (registry, _) = serve(Arc::new(|_| {
        reply(StatusCode::PARTIAL_CONTENT, Body::from(vec![7u8; 4096]))
    }));
    let c = client_for(&registry.to_string());
    let r = Reference::parse(&format!("{registry}/team/app:1")).unwrap();
    let digest = format!("sha256:{}", "1".repeat(64));
    let err = c.blob_range(&r, &digest, 0, 100).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::BodyTooLarge { limit: 100, .. }),
        "{err:?}"
    );
}

use futures::StreamExt as _;
