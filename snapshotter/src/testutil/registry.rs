//! A small in-process registry (HTTP API v2 subset) for tests: ranges,
//! uploads, basic or bearer auth, redirects to "blob storage" (its own or
//! another server's), plain HTTP or TLS, and a switch that makes it
//! unreachable (connection refused) and back.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Method, Request, Response, StatusCode};

#[derive(Clone, Debug)]
pub enum Auth {
    None,
    Basic {
        user: String,
        pass: String,
    },
    /// Token service that itself wants basic credentials.
    Bearer {
        user: String,
        pass: String,
    },
}

pub struct State {
    pub blobs: Mutex<HashMap<String, Vec<u8>>>,
    pub manifests: Mutex<HashMap<String, (String, Vec<u8>)>>,
    uploads: Mutex<HashMap<String, ()>>,
    pub auth: Auth,
    pub redirect: bool,
    /// Where blob redirects point (`scheme://host:port`); this server if unset.
    pub storage: Option<String>,
    scheme: &'static str,
    pub blob_bytes_served: AtomicU64,
    pub range_requests: AtomicU64,
    /// Accept requests but never answer them (a registry that hangs, not one that is down).
    pub frozen: std::sync::atomic::AtomicBool,
    addr: Mutex<Option<SocketAddr>>,
}

pub struct MockRegistry {
    pub state: Arc<State>,
    pub addr: SocketAddr,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    runtime: tokio::runtime::Handle,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// How to start a [`MockRegistry`].
#[derive(Clone)]
pub struct MockOptions {
    pub auth: Auth,
    /// Answer blob GETs with a redirect to blob storage.
    pub redirect: bool,
    /// Blob storage to redirect to (`scheme://host:port`); this server if unset.
    pub storage: Option<String>,
    /// Serve HTTPS with this configuration instead of plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

const TOKEN: &str = "t0k3n";

impl MockRegistry {
    /// Starts on 127.0.0.1 on a free port, on `runtime`.
    pub fn start(runtime: &tokio::runtime::Handle, auth: Auth, redirect: bool) -> Arc<Self> {
        Self::start_with(
            runtime,
            MockOptions {
                auth,
                redirect,
                storage: None,
                tls: None,
            },
        )
    }

    /// Starts with every option.
    pub fn start_with(runtime: &tokio::runtime::Handle, opts: MockOptions) -> Arc<Self> {
        let MockOptions {
            auth,
            redirect,
            storage,
            tls,
        } = opts;
        let state = Arc::new(State {
            blobs: Mutex::new(HashMap::new()),
            manifests: Mutex::new(HashMap::new()),
            uploads: Mutex::new(HashMap::new()),
            auth,
            redirect,
            storage,
            scheme: if tls.is_some() { "https" } else { "http" },
            blob_bytes_served: AtomicU64::new(0),
            range_requests: AtomicU64::new(0),
            frozen: std::sync::atomic::AtomicBool::new(false),
            addr: Mutex::new(None),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        *state.addr.lock().unwrap() = Some(addr);
        let reg = Arc::new(MockRegistry {
            state,
            addr,
            stop: Mutex::new(None),
            runtime: runtime.clone(),
            tls,
        });
        reg.serve(listener);
        reg
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `scheme://host:port` of this server (`localhost` when it speaks TLS).
    pub fn base_url(&self) -> String {
        own_url(self.state.scheme, self.addr)
    }

    fn serve(&self, listener: std::net::TcpListener) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        *self.stop.lock().unwrap() = Some(tx);
        let state = self.state.clone();
        let _guard = self.runtime.enter();
        listener.set_nonblocking(true).unwrap();
        if let Some(tls) = &self.tls {
            self.runtime
                .spawn(serve_tls(listener, tls.clone(), state, rx));
            return;
        }
        let server = hyper::Server::from_tcp(listener).unwrap().serve(make_service_fn(move |_| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(service_fn(move |req| handle(state.clone(), req))) }
        }));
        self.runtime.spawn(async move {
            let _ = server
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
    }

    /// Stops accepting connections (clients see connection refused).
    pub fn go_down(&self) {
        if let Some(tx) = self.stop.lock().unwrap().take() {
            let _ = tx.send(());
        }
        // Wait until the port is really closed.
        for _ in 0..100 {
            if std::net::TcpStream::connect(self.addr).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("mock registry did not stop");
    }

    /// Serves again on the same port.
    pub fn come_back(&self) {
        let listener = std::net::TcpListener::bind(self.addr).unwrap();
        self.serve(listener);
    }

    pub fn put_blob(&self, data: Vec<u8>) -> String {
        let digest = crate::estargz::sha256_digest(&data);
        self.state
            .blobs
            .lock()
            .unwrap()
            .insert(digest.clone(), data);
        digest
    }
}

impl Drop for MockRegistry {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }
}

/// Accepts TLS connections until `stop` fires; failed handshakes (a client
/// that does not trust the certificate) just end their connection.
async fn serve_tls(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<State>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let tcp = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let service = service_fn(move |req| handle(state.clone(), req));
            let _ = hyper::server::conn::Http::new()
                .serve_connection(stream, service)
                .await;
        });
    }
}

/// The server's own URL: TLS servers go by `localhost`, the name their
/// test certificates carry.
fn own_url(scheme: &str, addr: SocketAddr) -> String {
    if scheme == "https" {
        format!("https://localhost:{}", addr.port())
    } else {
        format!("http://{addr}")
    }
}

fn status(code: StatusCode) -> Response<Body> {
    Response::builder()
        .status(code)
        .body(Body::empty())
        .unwrap()
}

fn authorized(state: &State, req: &Request<Body>) -> bool {
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match &state.auth {
        Auth::None => true,
        Auth::Basic { user, pass } => {
            header
                == format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
                )
        }
        Auth::Bearer { .. } => header == format!("Bearer {TOKEN}"),
    }
}

async fn handle(state: Arc<State>, req: Request<Body>) -> Result<Response<Body>, Infallible> {
    if state.frozen.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let path = req.uri().path().to_string();
    let addr = state.addr.lock().unwrap().unwrap();
    let own = own_url(state.scheme, addr);
    if path == "/token" {
        let Auth::Bearer { user, pass } = &state.auth else {
            return Ok(status(StatusCode::NOT_FOUND));
        };
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        );
        let ok = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some(want.as_str());
        let scoped = req.uri().query().unwrap_or("").contains("scope=repository");
        if !ok || !scoped {
            return Ok(status(StatusCode::UNAUTHORIZED));
        }
        return Ok(Response::new(Body::from(format!(
            "{{\"token\":\"{TOKEN}\"}}"
        ))));
    }
    if let Some(digest) = path.strip_prefix("/storage/") {
        return Ok(serve_blob(&state, &req, digest));
    }
    if let Some(id) = path.strip_prefix("/upload/") {
        if !authorized(&state, &req) {
            return Ok(status(StatusCode::UNAUTHORIZED));
        }
        let query = req.uri().query().unwrap_or("").to_string();
        let known = state.uploads.lock().unwrap().remove(id).is_some();
        let body = hyper::body::to_bytes(req.into_body())
            .await
            .unwrap()
            .to_vec();
        let digest = query
            .strip_prefix("digest=")
            .unwrap_or("")
            .replace("%3A", ":");
        if !known || crate::estargz::sha256_digest(&body) != digest {
            return Ok(status(StatusCode::BAD_REQUEST));
        }
        state.blobs.lock().unwrap().insert(digest, body);
        return Ok(status(StatusCode::CREATED));
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Ok(status(StatusCode::NOT_FOUND));
    };
    if !authorized(&state, &req) {
        let challenge = match &state.auth {
            Auth::Bearer { .. } => format!("Bearer realm=\"{own}/token\",service=\"mock\""),
            _ => "Basic realm=\"mock\"".to_string(),
        };
        return Ok(Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("www-authenticate", challenge)
            .body(Body::empty())
            .unwrap());
    }
    if rest.ends_with("/blobs/uploads/") && req.method() == Method::POST {
        let id = format!("u{}", state.uploads.lock().unwrap().len() + rand_id());
        state.uploads.lock().unwrap().insert(id.clone(), ());
        return Ok(Response::builder()
            .status(StatusCode::ACCEPTED)
            .header("location", format!("/upload/{id}"))
            .body(Body::empty())
            .unwrap());
    }
    if let Some((_, digest)) = rest.split_once("/blobs/") {
        if state.redirect && req.method() == Method::GET {
            return Ok(Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header(
                    "location",
                    format!(
                        "{}/storage/{digest}",
                        state.storage.as_deref().unwrap_or(&own)
                    ),
                )
                .body(Body::empty())
                .unwrap());
        }
        return Ok(serve_blob(&state, &req, digest));
    }
    if let Some((_, reference)) = rest.split_once("/manifests/") {
        if req.method() == Method::PUT {
            let media = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = hyper::body::to_bytes(req.into_body())
                .await
                .unwrap()
                .to_vec();
            let digest = crate::estargz::sha256_digest(&body);
            let mut m = state.manifests.lock().unwrap();
            m.insert(digest, (media.clone(), body.clone()));
            m.insert(reference.to_string(), (media, body));
            return Ok(status(StatusCode::CREATED));
        }
        let found = state.manifests.lock().unwrap().get(reference).cloned();
        return Ok(match found {
            Some((media, body)) => Response::builder()
                .header("content-type", media)
                .body(Body::from(body))
                .unwrap(),
            None => status(StatusCode::NOT_FOUND),
        });
    }
    Ok(status(StatusCode::NOT_FOUND))
}

fn rand_id() -> usize {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize
}

fn serve_blob(state: &State, req: &Request<Body>, digest: &str) -> Response<Body> {
    let Some(blob) = state.blobs.lock().unwrap().get(digest).cloned() else {
        return status(StatusCode::NOT_FOUND);
    };
    if req.method() == Method::HEAD {
        return Response::builder()
            .header("content-length", blob.len())
            .body(Body::empty())
            .unwrap();
    }
    let range = req
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|r| {
            let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
            Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?))
        });
    let (body, code) = match range {
        Some((a, b)) if a <= b && b < blob.len() => {
            state.range_requests.fetch_add(1, Ordering::SeqCst);
            (blob[a..=b].to_vec(), StatusCode::PARTIAL_CONTENT)
        }
        Some(_) => return status(StatusCode::RANGE_NOT_SATISFIABLE),
        None => (blob, StatusCode::OK),
    };
    state
        .blob_bytes_served
        .fetch_add(body.len() as u64, Ordering::SeqCst);
    Response::builder()
        .status(code)
        .body(Body::from(body))
        .unwrap()
}
