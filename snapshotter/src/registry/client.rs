//! The async HTTP client behind everything that talks to a registry.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use hyper::body::{Bytes, HttpBody};
use hyper::header::{self, HeaderValue};
use hyper::{Body, Method, Request, Response, StatusCode};
use sha2::{Digest, Sha256};

use super::auth::{credentials_allowed, parse_challenge, url_origin, Challenge};
use super::body::{read_limited, read_range_of_whole, MAX_MANIFEST_BYTES, MAX_TOKEN_BYTES};
use super::reference::url_host;
use super::tls::{tls_failure, Clients, TlsConfigError, TlsFailure};
use super::{Reference, RegistryConfig, RegistryError};

const MAX_REDIRECTS: usize = 5;
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// A manifest (or index) as the registry served it.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub media_type: String,
    pub digest: String,
    pub bytes: Bytes,
}

/// A registry client shared by all layers of a process.
pub struct RegistryClient {
    http: Clients,
    config: RegistryConfig,
    // Authorization header values by "host scope".
    tokens: Mutex<HashMap<String, String>>,
}

struct Call<'a> {
    method: Method,
    url: String,
    headers: Vec<(header::HeaderName, String)>,
    body: Bytes,
    reference: &'a Reference,
    scope: &'a str,
}

impl RegistryClient {
    /// A client with the given host settings; fails when a host's `ca`
    /// file cannot be loaded.
    pub fn new(config: RegistryConfig) -> Result<Self, TlsConfigError> {
        Ok(RegistryClient {
            http: Clients::new(&config)?,
            config,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// The settings this client was made with.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }

    fn base(&self, r: &Reference) -> String {
        format!(
            "{}://{}/v2/{}",
            self.config.scheme(&r.host),
            self.config.endpoint(&r.host),
            r.repository
        )
    }

    /// Size of a blob (HEAD).
    pub async fn blob_size(&self, r: &Reference, digest: &str) -> Result<u64, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base(r));
        let resp = self
            .execute(self.call(Method::HEAD, url.clone(), r, "pull"))
            .await?;
        let resp = expect(resp, &url, &[StatusCode::OK])?;
        resp.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or(RegistryError::NoLength { url })
    }

    /// `len` bytes of a blob at `offset`, with one range request.
    pub async fn blob_range(
        &self,
        r: &Reference,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base(r));
        let mut call = self.call(Method::GET, url.clone(), r, "pull");
        call.headers.push((
            header::RANGE,
            format!("bytes={}-{}", offset, offset + len - 1),
        ));
        let resp = self.execute(call).await?;
        let resp = expect(resp, &url, &[StatusCode::PARTIAL_CONTENT, StatusCode::OK])?;
        if resp.status() == StatusCode::PARTIAL_CONTENT {
            // More than was asked for is a broken answer, and never buffered.
            let body = read_limited(resp.into_body(), &url, len, self.timeout()).await?;
            return Ok(body.to_vec());
        }
        // The server ignored the range: cut it out of the whole blob as it streams past.
        read_range_of_whole(resp.into_body(), &url, offset, len, self.timeout()).await
    }

    /// Streams a whole blob into `out`, verifying its digest.
    pub async fn blob_to(
        &self,
        r: &Reference,
        digest: &str,
        out: &mut dyn Write,
    ) -> Result<u64, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base(r));
        let resp = self
            .execute(self.call(Method::GET, url.clone(), r, "pull"))
            .await?;
        let resp = expect(resp, &url, &[StatusCode::OK])?;
        let mut body = resp.into_body();
        let mut hash = Sha256::new();
        let mut total = 0u64;
        loop {
            let next = tokio::time::timeout(self.timeout(), body.data()).await;
            let next = next.map_err(|_| RegistryError::Timeout {
                url: url.clone(),
                timeout: self.timeout(),
            })?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|source| RegistryError::Body {
                url: url.clone(),
                source,
            })?;
            hash.update(&chunk);
            total += chunk.len() as u64;
            out.write_all(&chunk)
                .map_err(|source| RegistryError::Write { source })?;
        }
        let actual = format!("sha256:{}", hex::encode(hash.finalize()));
        if actual != digest {
            return Err(RegistryError::Digest {
                url,
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(total)
    }

    /// The manifest or index for `r`'s tag or digest.
    pub async fn manifest(&self, r: &Reference) -> Result<Manifest, RegistryError> {
        let url = format!("{}/manifests/{}", self.base(r), r.object());
        let mut call = self.call(Method::GET, url.clone(), r, "pull");
        call.headers
            .push((header::ACCEPT, MANIFEST_ACCEPT.to_string()));
        let resp = self.execute(call).await?;
        let resp = expect(resp, &url, &[StatusCode::OK])?;
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes =
            read_limited(resp.into_body(), &url, MAX_MANIFEST_BYTES, self.timeout()).await?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        // Asked for by digest: the content must be that digest, whatever the registry says.
        if let Some(expected) = r.digest.as_ref().filter(|d| **d != digest) {
            return Err(RegistryError::ManifestDigest {
                url,
                expected: expected.clone(),
                actual: digest,
            });
        }
        Ok(Manifest {
            media_type,
            digest,
            bytes,
        })
    }

    /// Uploads a blob unless the registry already has it.
    pub async fn push_blob(
        &self,
        r: &Reference,
        digest: &str,
        data: Bytes,
    ) -> Result<(), RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base(r));
        let head = self
            .execute(self.call(Method::HEAD, url, r, "pull,push"))
            .await?;
        if head.status() == StatusCode::OK {
            return Ok(());
        }
        let url = format!("{}/blobs/uploads/", self.base(r));
        let resp = self
            .execute(self.call(Method::POST, url.clone(), r, "pull,push"))
            .await?;
        let resp = expect(resp, &url, &[StatusCode::ACCEPTED])?;
        let location = location(&resp, &url)?;
        let sep = if location.contains('?') { '&' } else { '?' };
        let put_url = format!("{location}{sep}digest={}", percent_encode(digest));
        let mut call = self.call(Method::PUT, put_url.clone(), r, "pull,push");
        call.headers
            .push((header::CONTENT_TYPE, "application/octet-stream".into()));
        call.body = data;
        let resp = self.execute(call).await?;
        expect(resp, &put_url, &[StatusCode::CREATED])?;
        Ok(())
    }

    /// Uploads a manifest under `r`'s tag.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        media_type: &str,
        data: Bytes,
    ) -> Result<(), RegistryError> {
        let url = format!("{}/manifests/{}", self.base(r), r.object());
        let mut call = self.call(Method::PUT, url.clone(), r, "pull,push");
        call.headers
            .push((header::CONTENT_TYPE, media_type.to_string()));
        call.body = data;
        let resp = self.execute(call).await?;
        expect(resp, &url, &[StatusCode::CREATED])?;
        Ok(())
    }

    fn call<'a>(
        &self,
        method: Method,
        url: String,
        reference: &'a Reference,
        scope: &'a str,
    ) -> Call<'a> {
        Call {
            method,
            url,
            headers: Vec::new(),
            body: Bytes::new(),
            reference,
            scope,
        }
    }

    /// Sends `call`, answering one auth challenge and following redirects.
    async fn execute(&self, call: Call<'_>) -> Result<Response<Body>, RegistryError> {
        let host = &call.reference.host;
        let key = format!(
            "{host} repository:{}:{}",
            call.reference.repository, call.scope
        );
        let mut url = call.url.clone();
        let mut challenged = false;
        let mut redirects = 0;
        // Scheme and host: a token for https://registry is never sent to http://registry
        // (a redirect can point there).
        let registry_origin = url_origin(&call.url).map(str::to_string);
        loop {
            let on_registry =
                registry_origin.is_some() && url_origin(&url) == registry_origin.as_deref();
            let auth = if on_registry {
                self.tokens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&key)
                    .cloned()
            } else {
                None
            };
            let resp = self.send_once(&call, &url, auth).await?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && on_registry && !challenged {
                challenged = true;
                let challenge = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge)
                    .ok_or_else(|| RegistryError::Unauthorized { url: url.clone() })?;
                let value = self
                    .answer(host, call.reference, call.scope, challenge, &url)
                    .await?;
                self.tokens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), value);
                continue;
            }
            if status == StatusCode::UNAUTHORIZED {
                return Err(RegistryError::Unauthorized { url });
            }
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(RegistryError::TooManyRedirects {
                        url,
                        max: MAX_REDIRECTS,
                    });
                }
                url = location(&resp, &url)?;
                continue;
            }
            return Ok(resp);
        }
    }

    async fn send_once(
        &self,
        call: &Call<'_>,
        url: &str,
        auth: Option<String>,
    ) -> Result<Response<Body>, RegistryError> {
        let mut builder = Request::builder().method(call.method.clone()).uri(url);
        for (name, value) in &call.headers {
            builder = builder.header(name, value);
        }
        if let Some(auth) = auth {
            builder = builder.header(header::AUTHORIZATION, auth);
        }
        if !call.body.is_empty() || call.method == Method::PUT || call.method == Method::POST {
            builder = builder.header(header::CONTENT_LENGTH, call.body.len());
        }
        let request = builder
            .body(Body::from(call.body.clone()))
            .map_err(|source| RegistryError::Build {
                url: url.to_string(),
                source,
            })?;
        self.send(request, url).await
    }

    /// One request with the timeout, through the client for its host.
    async fn send(
        &self,
        request: Request<Body>,
        url: &str,
    ) -> Result<Response<Body>, RegistryError> {
        let http = self.http.for_url(url);
        match tokio::time::timeout(self.timeout(), http.request(request)).await {
            Err(_) => Err(RegistryError::Timeout {
                url: url.to_string(),
                timeout: self.timeout(),
            }),
            Ok(Err(source)) => Err(request_error(url, source)),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// Produces the Authorization header value for a challenge.
    async fn answer(
        &self,
        host: &str,
        reference: &Reference,
        scope: &str,
        challenge: Challenge,
        url: &str,
    ) -> Result<String, RegistryError> {
        let creds = self.config.host(host);
        let basic = match (&creds.username, &creds.password) {
            (Some(u), Some(p)) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )),
            _ => None,
        };
        let (realm, service, challenge_scope) = match challenge {
            Challenge::Basic => {
                return basic.ok_or_else(|| RegistryError::Unauthorized {
                    url: url.to_string(),
                })
            }
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => (realm, service, scope),
        };
        let scope = challenge_scope
            .unwrap_or_else(|| format!("repository:{}:{scope}", reference.repository));
        let mut token_url = format!("{realm}?scope={}", percent_encode(&scope));
        if let Some(service) = service {
            token_url.push_str(&format!("&service={}", percent_encode(&service)));
        }
        let mut builder = Request::builder().method(Method::GET).uri(&token_url);
        if let Some(basic) = basic {
            if !credentials_allowed(&realm, url) {
                return Err(RegistryError::InsecureRealm {
                    realm,
                    registry: host.to_string(),
                });
            }
            builder = builder.header(header::AUTHORIZATION, basic);
        }
        let request = builder
            .body(Body::empty())
            .map_err(|source| RegistryError::Build {
                url: token_url.clone(),
                source,
            })?;
        let resp = self.send(request, &token_url).await?;
        if resp.status() != StatusCode::OK {
            return Err(RegistryError::Token {
                realm,
                status: resp.status().as_u16(),
            });
        }
        let body = read_limited(
            resp.into_body(),
            &token_url,
            MAX_TOKEN_BYTES,
            self.timeout(),
        )
        .await?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|source| RegistryError::TokenJson {
                realm: realm.clone(),
                source,
            })?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .ok_or(RegistryError::Token { realm, status: 200 })?;
        Ok(format!("Bearer {token}"))
    }
}

fn expect(
    resp: Response<Body>,
    url: &str,
    ok: &[StatusCode],
) -> Result<Response<Body>, RegistryError> {
    if ok.contains(&resp.status()) {
        Ok(resp)
    } else {
        Err(RegistryError::Status {
            url: url.to_string(),
            status: resp.status().as_u16(),
        })
    }
}

/// The absolute URL of a response's Location header.
fn location(resp: &Response<Body>, base: &str) -> Result<String, RegistryError> {
    let bad = || RegistryError::BadRedirect {
        url: base.to_string(),
    };
    let loc = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .ok_or_else(bad)?;
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return Ok(loc.to_string());
    }
    let scheme_end = base.find("://").ok_or_else(bad)? + 3;
    let host_end = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    if loc.starts_with('/') {
        Ok(format!("{}{loc}", &base[..host_end]))
    } else {
        let dir_end = base
            .rfind('/')
            .filter(|i| *i >= host_end)
            .unwrap_or(host_end);
        Ok(format!("{}/{loc}", &base[..dir_end]))
    }
}

/// A failed request as an error, naming an untrusted certificate as such.
fn request_error(url: &str, source: hyper::Error) -> RegistryError {
    let host = url_host(url).unwrap_or(url).to_string();
    let url = url.to_string();
    match tls_failure(&source) {
        Some(TlsFailure::Untrusted(source)) => RegistryError::UntrustedCertificate {
            host,
            url,
            source: Box::new(source),
        },
        Some(TlsFailure::Other(source)) => RegistryError::Tls {
            host,
            url,
            source: Box::new(source),
        },
        None => RegistryError::Request { url, source },
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_resolves() {
        assert_eq!(
            percent_encode("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
        assert_eq!(
            url_host("http://127.0.0.1:5000/v2/x"),
            Some("127.0.0.1:5000")
        );
        let resp = Response::builder()
            .header("location", "/v2/x/blobs/uploads/123?s=1")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            location(&resp, "http://h:1/v2/x/blobs/uploads/").unwrap(),
            "http://h:1/v2/x/blobs/uploads/123?s=1"
        );
    }
}
