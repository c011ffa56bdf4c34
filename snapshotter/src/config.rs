//! `spry-snapshotter` configuration (TOML), validated at load.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::registry::{HostConfigError, RegistryConfig};

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is invalid")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config {path}: a registry host's settings are invalid")]
    Host {
        path: PathBuf,
        source: HostConfigError,
    },
    #[error("config {path}: {field} must be {requirement}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        requirement: &'static str,
    },
}

/// Where `spry install --snapshotter` writes the config and where every `spry-snapshotter`
/// command (and so `spry warm` / `spry convert`) reads it without `--config`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/spry/snapshotter.toml";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// State directory: metadata, snapshots, chunk cache.
    #[serde(default = "default_root")]
    pub root: PathBuf,
    /// gRPC socket containerd's `proxy_plugins` points at.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default)]
    pub lazy: LazyConfig,
    #[serde(default)]
    pub registry: RegistryConfig,
}

/// Lazy-pulling behaviour.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LazyConfig {
    /// Mount eStargz layers lazily at all (false: every layer is pulled normally).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Fetch the files before `.prefetch.landmark` right after mounting.
    #[serde(default = "yes")]
    pub prefetch: bool,
    /// Fetch the rest of each layer in the background.
    #[serde(default = "yes")]
    pub background_fetch: bool,
    /// Attempts per range request before a read fails with EIO.
    #[serde(default = "default_attempts")]
    pub fetch_attempts: u32,
    /// Backoff between attempts (multiplied by the attempt number).
    #[serde(default = "default_backoff_ms")]
    pub fetch_backoff_ms: u64,
    /// Serve each layer's FUSE filesystem from its own `mount-layer` process,
    /// so that mounts (and the pods using them) outlive snapshotter restarts.
    #[serde(default = "yes")]
    pub fuse_daemon: bool,
    /// Write the files each layer serves to `<snapshot>/accessed.txt` in
    /// first-open order (for `convert --prioritized-files`) and every read it serves to
    /// `<snapshot>/accessed-ranges.txt` (for `convert --prefetch-ranges`); a VM's reads of
    /// the layer's erofs image (`vm_images`) count as the reads of the files they cover.
    /// Recording layers are served through the daemon only: no passthrough, no native mounts.
    #[serde(default)]
    pub record_accesses: bool,
    /// Bound on the chunk cache in MiB (0: none). Past it, least recently used chunks are
    /// evicted; a layer that needs one again fetches it again.
    #[serde(default = "default_cache_max_mib")]
    pub cache_max_mib: u64,
    /// Longest a read waits for the registry (all attempts together) before it fails
    /// with EIO.
    #[serde(default = "default_read_deadline_ms")]
    pub read_deadline_ms: u64,
    /// After a read missed that deadline, reads needing the registry fail at once for
    /// this long (the kernel retries a failed read, and each would wait again).
    #[serde(default = "default_cooldown_ms")]
    pub unresponsive_cooldown_ms: u64,
    /// Once all of a file's chunks are cached, let the kernel read it from the cache
    /// (FUSE passthrough, Linux >= 6.9) instead of asking the daemon for every read.
    #[serde(default = "yes")]
    pub passthrough: bool,
    /// Readahead of a layer's FUSE mount in KiB (the kernel's default is 128). It decides
    /// how much a read asks the daemon for beyond what it needs: with a recorded prefetch
    /// those extra bytes are recorded and prefetched too, so record and serve with the same
    /// value. Fully fetched files (passthrough, native mounts) read with their backing
    /// file's own readahead.
    #[serde(default = "default_readahead_kib")]
    pub readahead_kib: u32,
    /// Also give each layer an erofs image, `<snapshot>/erofs/layer.erofs` beside its tree
    /// at `<snapshot>/fs`, for Spry's VMs to attach as a read-only disk: a lazy layer's is
    /// served (reads of the image fetch only the files they cover), an unpacked layer's is
    /// built in the background once containerd commits it (a second copy of the layer on
    /// disk; without it, Spry's shim packs a container's layers when it creates it).
    #[serde(default)]
    pub vm_images: bool,
    /// Mount a layer whose chunks are all cached and whose diffID is verified as a native
    /// erofs image (Linux >= 6.12) instead of over FUSE: read at local file system speed.
    /// Falls back to FUSE, saying so once, on kernels that cannot.
    #[serde(default = "yes")]
    pub native_mounts: bool,
}

impl LazyConfig {
    /// The chunk cache under `dir`, bounded as configured.
    pub fn open_cache(
        &self,
        dir: &std::path::Path,
    ) -> Result<crate::cache::ChunkCache, crate::cache::CacheError> {
        Ok(crate::cache::ChunkCache::open(dir)?.with_limit(self.cache_max_mib << 20))
    }
}

fn yes() -> bool {
    true
}
fn default_attempts() -> u32 {
    3
}
fn default_backoff_ms() -> u64 {
    200
}
fn default_read_deadline_ms() -> u64 {
    20_000
}
fn default_cooldown_ms() -> u64 {
    5_000
}
fn default_readahead_kib() -> u32 {
    DEFAULT_READAHEAD_KIB
}

/// See [`LazyConfig::readahead_kib`].
pub const DEFAULT_READAHEAD_KIB: u32 = 32;

fn default_cache_max_mib() -> u64 {
    10 << 10
}
fn default_root() -> PathBuf {
    PathBuf::from("/var/lib/spry-snapshotter")
}
fn default_socket() -> PathBuf {
    PathBuf::from("/run/spry-snapshotter/snapshotter.sock")
}

impl Default for LazyConfig {
    fn default() -> Self {
        LazyConfig {
            enabled: true,
            prefetch: true,
            background_fetch: true,
            fetch_attempts: default_attempts(),
            fetch_backoff_ms: default_backoff_ms(),
            fuse_daemon: true,
            record_accesses: false,
            cache_max_mib: default_cache_max_mib(),
            read_deadline_ms: default_read_deadline_ms(),
            unresponsive_cooldown_ms: default_cooldown_ms(),
            passthrough: true,
            readahead_kib: default_readahead_kib(),
            vm_images: false,
            native_mounts: true,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: default_root(),
            socket: default_socket(),
            lazy: LazyConfig::default(),
            registry: RegistryConfig::default(),
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    /// Loads `path`, or the defaults when `path` is the default location and absent (a node
    /// without `spry install --snapshotter` runs on defaults; a named file must exist).
    pub fn load_or_default(path: &Path) -> Result<Self, ConfigError> {
        if path == Path::new(DEFAULT_CONFIG_PATH) && !path.exists() {
            return Ok(Config::default());
        }
        Self::load(path)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, requirement| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            requirement,
        };
        if !self.root.is_absolute() {
            return Err(invalid("root", "an absolute path"));
        }
        if !self.socket.is_absolute() {
            return Err(invalid("socket", "an absolute path"));
        }
        if self.lazy.fetch_attempts == 0 || self.lazy.fetch_attempts > 20 {
            return Err(invalid("lazy.fetch_attempts", "between 1 and 20"));
        }
        if self.registry.request_timeout_ms == 0 {
            return Err(invalid("registry.request_timeout_ms", "positive"));
        }
        self.registry
            .validate()
            .map_err(|source| ConfigError::Host {
                path: path.to_path_buf(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn only_the_default_path_may_be_missing() {
        let missing = Path::new("/nonexistent/spry-snapshotter.toml");
        assert!(matches!(
            Config::load_or_default(missing),
            Err(ConfigError::Read { .. })
        ));
        if !Path::new(DEFAULT_CONFIG_PATH).exists() {
            let config = Config::load_or_default(Path::new(DEFAULT_CONFIG_PATH)).unwrap();
            assert_eq!(config.socket, default_socket());
        }
    }

    #[test]
    fn loads_and_validates() {
        let c = load(
            "root = \"/tmp/x\"\n[lazy]\nprefetch = false\n[registry.hosts.\"127.0.0.1:5000\"]\ninsecure = true\n",
        )
        .unwrap();
        assert!(!c.lazy.prefetch);
        assert!(c.registry.hosts["127.0.0.1:5000"].insecure);
        assert!(matches!(
            load("rooot = \"/x\""),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            load("root = \"rel\""),
            Err(ConfigError::Invalid { field: "root", .. })
        ));
    }
}
