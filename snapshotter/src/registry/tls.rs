//! TLS for registry connections: the trusted roots (webpki's bundle, the
//! system CA bundle, a per-host `ca` file), one hyper client per distinct set
//! of roots, and telling an untrusted certificate apart from other failures.

use std::collections::HashMap;
use std::error::Error as _;
use std::io;
use std::path::{Path, PathBuf};

use hyper::client::HttpConnector;
use hyper::Client;
use hyper_rustls::HttpsConnector;
use rustls::{Certificate, ClientConfig, OwnedTrustAnchor, RootCertStore};

use super::RegistryConfig;

/// Debian's (and most distributions') bundle of the system's trusted CAs.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The HTTP client type: https and plain http through one connector.
pub(super) type HttpClient = Client<HttpsConnector<HttpConnector>>;

/// Errors loading trusted certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("CA file {path} must be an absolute path")]
    Relative { path: PathBuf },
    #[error("failed to read CA file {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("CA file {path} holds no PEM certificate")]
    Empty { path: PathBuf },
    #[error("CA file {path} holds a certificate that cannot be a trust anchor")]
    Invalid {
        path: PathBuf,
        source: rustls::Error,
    },
}

/// The certificates of a PEM file (a `ca` setting).
pub fn read_ca_file(path: &Path) -> Result<Vec<Certificate>, TlsConfigError> {
    if !path.is_absolute() {
        return Err(TlsConfigError::Relative {
            path: path.to_path_buf(),
        });
    }
    let read = |source| TlsConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let ders = rustls_pemfile::certs(&mut io::BufReader::new(file)).map_err(read)?;
    if ders.is_empty() {
        return Err(TlsConfigError::Empty {
            path: path.to_path_buf(),
        });
    }
    let certs: Vec<Certificate> = ders.into_iter().map(Certificate).collect();
    // Check now that each one is usable as a root, so a bad file fails at load.
    let mut probe = RootCertStore::empty();
    for cert in &certs {
        probe.add(cert).map_err(|source| TlsConfigError::Invalid {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(certs)
}

/// webpki's Mozilla roots plus whatever the system bundle holds (a missing
/// bundle is fine; unparsable entries in it are skipped).
fn base_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.add_trust_anchors(webpki_roots::TLS_SERVER_ROOTS.iter().map(|ta| {
        OwnedTrustAnchor::from_subject_spki_name_constraints(
            ta.subject,
            ta.spki,
            ta.name_constraints,
        )
    }));
    if let Ok(file) = std::fs::File::open(SYSTEM_CA_BUNDLE) {
        if let Ok(ders) = rustls_pemfile::certs(&mut io::BufReader::new(file)) {
            let (added, skipped) = roots.add_parsable_certificates(&ders);
            tracing::debug!(added, skipped, bundle = SYSTEM_CA_BUNDLE, "system CAs");
        }
    }
    roots
}

fn client(roots: RootCertStore) -> HttpClient {
    let tls = ClientConfig::builder()
        .with_safe_defaults()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder().build(connector)
}

/// The clients of one [`RegistryClient`](super::RegistryClient): a default
/// one, and one per `host:port` whose settings add a `ca`.
pub(super) struct Clients {
    default: HttpClient,
    by_authority: HashMap<String, HttpClient>,
}

impl Clients {
    pub(super) fn new(config: &RegistryConfig) -> Result<Self, TlsConfigError> {
        let base = base_roots();
        let mut by_authority = HashMap::new();
        for (host, settings) in &config.hosts {
            let Some(ca) = &settings.ca else { continue };
            let mut roots = base.clone();
            for cert in read_ca_file(ca)? {
                roots.add(&cert).map_err(|source| TlsConfigError::Invalid {
                    path: ca.clone(),
                    source,
                })?;
            }
            // Connections go to the endpoint (a mirror) when one is set, and
            // that is the name its certificate is checked against.
            let authority = settings.endpoint.clone().unwrap_or_else(|| host.clone());
            by_authority.insert(authority, client(roots));
        }
        Ok(Clients {
            default: client(base),
            by_authority,
        })
    }

    /// The client for a URL (by its `host[:port]`).
    pub(super) fn for_url(&self, url: &str) -> &HttpClient {
        super::reference::url_host(url)
            .and_then(|authority| self.by_authority.get(authority))
            .unwrap_or(&self.default)
    }
}

/// What went wrong in a TLS handshake, when that is why a request failed.
pub(super) enum TlsFailure {
    /// The peer's certificate does not chain to a trusted root.
    Untrusted(rustls::Error),
    /// Any other TLS error (bad name, expired, protocol).
    Other(rustls::Error),
}

/// Finds the rustls error under a hyper connect error (hyper-rustls wraps it
/// in `io::Error`s, whose `source()` skips the wrapped error).
pub(super) fn tls_failure(err: &hyper::Error) -> Option<TlsFailure> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = err.source();
    while let Some(e) = cur {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            let untrusted = matches!(
                tls,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                        | rustls::CertificateError::BadSignature
                )
            );
            return Some(if untrusted {
                TlsFailure::Untrusted(tls.clone())
            } else {
                TlsFailure::Other(tls.clone())
            });
        }
        cur = match e.downcast_ref::<io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as _),
            None => e.source(),
        };
    }
    None
}
