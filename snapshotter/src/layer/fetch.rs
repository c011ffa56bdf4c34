//! Where a remote layer's compressed bytes come from.

/// Errors of a blob fetcher.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("registry request failed")]
    Registry {
        // Boxed: the registry's errors are large and reads pass this up on every failure.
        source: Box<crate::registry::RegistryError>,
    },
    #[error("fetcher returned {got} bytes, expected {expected}")]
    ShortRead { expected: u64, got: u64 },
    #[error("failed to read the local blob")]
    Io { source: std::io::Error },
    #[error("no answer within {timeout:?}")]
    Deadline { timeout: std::time::Duration },
}

/// Random access to a compressed layer blob.
pub trait BlobFetcher: Send + Sync {
    /// Size of the blob in bytes.
    fn size(&self) -> Result<u64, FetchError>;
    /// Exactly `len` bytes at `offset`.
    fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>, FetchError>;
    /// [`Self::fetch`], giving up with [`FetchError::Deadline`] after `timeout`. Fetchers
    /// that can wait on a remote end override it.
    fn fetch_within(
        &self,
        offset: u64,
        len: u64,
        timeout: std::time::Duration,
    ) -> Result<Vec<u8>, FetchError> {
        let _ = timeout;
        self.fetch(offset, len)
    }
}
