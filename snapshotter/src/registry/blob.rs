//! A registry blob as a [`BlobFetcher`] for the synchronous FUSE side.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::runtime::Handle;

use super::{Reference, RegistryClient};
use crate::layer::{BlobFetcher, FetchError};

/// One blob of one repository, read with range requests.
pub struct RegistryBlob {
    client: Arc<RegistryClient>,
    reference: Reference,
    digest: String,
    size: OnceLock<u64>,
    runtime: Handle,
}

impl RegistryBlob {
    /// `runtime` runs the async requests; callers must not be on it.
    pub fn new(
        client: Arc<RegistryClient>,
        reference: Reference,
        digest: String,
        runtime: Handle,
    ) -> Self {
        RegistryBlob {
            client,
            reference,
            digest,
            size: OnceLock::new(),
            runtime,
        }
    }
}

impl BlobFetcher for RegistryBlob {
    fn size(&self) -> Result<u64, FetchError> {
        if let Some(size) = self.size.get() {
            return Ok(*size);
        }
        let size = self
            .runtime
            .block_on(self.client.blob_size(&self.reference, &self.digest))
            .map_err(|source| FetchError::Registry {
                source: Box::new(source),
            })?;
        Ok(*self.size.get_or_init(|| size))
    }

    fn fetch(&self, offset: u64, len: u64) -> Result<Vec<u8>, FetchError> {
        self.runtime
            .block_on(
                self.client
                    .blob_range(&self.reference, &self.digest, offset, len),
            )
            .map_err(|source| FetchError::Registry {
                source: Box::new(source),
            })
    }

    fn fetch_within(
        &self,
        offset: u64,
        len: u64,
        timeout: Duration,
    ) -> Result<Vec<u8>, FetchError> {
        let request = self
            .client
            .blob_range(&self.reference, &self.digest, offset, len);
        // The timer is made inside block_on: only there is the runtime's context entered.
        let timed = async { tokio::time::timeout(timeout, request).await };
        match self.runtime.block_on(timed) {
            Err(_) => Err(FetchError::Deadline { timeout }),
            Ok(result) => result.map_err(|source| FetchError::Registry {
                source: Box::new(source),
            }),
        }
    }
}
