//! Registry HTTP API v2 client: manifests, blob range reads, pushes, with
//! token and basic auth, redirects, HTTPS (system and per-host CAs) and plain
//! HTTP for insecure hosts.

pub mod auth;
mod blob;
mod body;
mod client;
mod reference;
mod tls;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use blob::RegistryBlob;
pub use client::{Manifest, RegistryClient};
pub use reference::Reference;
pub use tls::{read_ca_file, TlsConfigError, SYSTEM_CA_BUNDLE};

/// Errors of registry requests.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {reference:?}")]
    InvalidReference { reference: String },
    #[error("invalid URL {url:?}")]
    InvalidUrl { url: String },
    #[error("request to {url} failed")]
    Request { url: String, source: hyper::Error },
    #[error("the TLS certificate of {host} is not trusted (request to {url}); set `ca` for it under [registry.hosts]")]
    UntrustedCertificate {
        host: String,
        url: String,
        source: Box<rustls::Error>,
    },
    #[error("TLS handshake with {host} failed (request to {url})")]
    Tls {
        host: String,
        url: String,
        source: Box<rustls::Error>,
    },
    #[error("request to {url} timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url} sent an authentication challenge we cannot answer")]
    Unauthorized { url: String },
    #[error("token endpoint {realm} answered HTTP {status}")]
    Token { realm: String, status: u16 },
    #[error("token endpoint {realm} sent a malformed response")]
    TokenJson {
        realm: String,
        source: serde_json::Error,
    },
    #[error("{url} redirected more than {max} times")]
    TooManyRedirects { url: String, max: usize },
    #[error("{url} sent a redirect without a usable Location")]
    BadRedirect { url: String },
    #[error("failed to read the response body from {url}")]
    Body { url: String, source: hyper::Error },
    #[error("{url} sent more than {limit} bytes")]
    BodyTooLarge { url: String, limit: u64 },
    #[error("manifest from {url} has digest {actual}, expected {expected}")]
    ManifestDigest {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("token server {realm} is plain HTTP on another host than the registry: credentials for {registry} are not sent there")]
    InsecureRealm { realm: String, registry: String },
    #[error("{url} answered without Content-Length")]
    NoLength { url: String },
    #[error("failed to build a request for {url}")]
    Build {
        url: String,
        source: hyper::http::Error,
    },
    #[error("blob from {url} has digest {actual}, expected {expected}")]
    Digest {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("failed to write the downloaded blob")]
    Write { source: std::io::Error },
}

/// Per-host settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Speak plain HTTP to this host.
    #[serde(default)]
    pub insecure: bool,
    /// A PEM file of CA certificates trusted for this host (its `endpoint`
    /// when one is set) on top of the system's, like `ca` in containerd's
    /// `hosts.toml`. Setting it also makes a loopback host use HTTPS.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Connect here (`host:port`) instead of the host in image references,
    /// like a containerd `hosts.toml` mirror.
    #[serde(default)]
    pub endpoint: Option<String>,
}

/// Registry client settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Settings by `host[:port]`.
    #[serde(default)]
    pub hosts: HashMap<String, HostConfig>,
    /// Bound on one request, including reading its body.
    #[serde(default = "default_timeout_ms")]
    pub request_timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    30_000
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            hosts: HashMap::new(),
            request_timeout_ms: default_timeout_ms(),
        }
    }
}

impl RegistryConfig {
    /// These settings with only `host`'s entry: what a process serving one image's layer
    /// needs, and no other registry's credentials.
    pub fn only_host(&self, host: &str) -> RegistryConfig {
        RegistryConfig {
            hosts: self
                .hosts
                .iter()
                .filter(|(name, _)| name.as_str() == host)
                .map(|(name, settings)| (name.clone(), settings.clone()))
                .collect(),
            request_timeout_ms: self.request_timeout_ms,
        }
    }

    /// Where to connect for `host`.
    fn endpoint(&self, host: &str) -> String {
        self.hosts
            .get(host)
            .and_then(|h| h.endpoint.clone())
            .unwrap_or_else(|| host.to_string())
    }

    fn host(&self, host: &str) -> HostConfig {
        self.hosts.get(host).cloned().unwrap_or_default()
    }

    /// Plain HTTP for hosts marked `insecure` and, as Docker does, for
    /// loopback hosts without a `ca`; HTTPS for everything else.
    fn scheme(&self, host: &str) -> &'static str {
        let settings = self.host(host);
        let name = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
        let loopback = name == "localhost" || name == "127.0.0.1" || name == "[::1]";
        if settings.insecure || (loopback && settings.ca.is_none()) {
            "http"
        } else {
            "https"
        }
    }

    /// Checks what loading can check: every `ca` file is readable and holds
    /// usable certificates, and no host is both `insecure` and given a `ca`.
    pub fn validate(&self) -> Result<(), HostConfigError> {
        for (host, settings) in &self.hosts {
            if let Some(ca) = &settings.ca {
                if settings.insecure {
                    return Err(HostConfigError::InsecureWithCa { host: host.clone() });
                }
                read_ca_file(ca).map_err(|source| HostConfigError::Ca {
                    host: host.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }
}

/// A per-host setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum HostConfigError {
    #[error("registry host {host:?} is `insecure` (plain HTTP) and has a `ca`; pick one")]
    InsecureWithCa { host: String },
    #[error("registry host {host:?}: unusable `ca`")]
    Ca {
        host: String,
        source: TlsConfigError,
    },
}

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;
