//! Converts a whole image to eStargz: every layer, the config's diff IDs,
//! a manifest whose layers carry the TOC digest and uncompressed size.
//! The result is a normal OCI gzip image to runtimes that ignore eStargz.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::layer::{convert_tar, LayerConvertError, LayerConvertOptions};
use super::layout::copy_layout_blob;
use super::unpack::{unpack_layer, UnpackError};
use crate::estargz::{TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION};
use crate::registry::{Reference, RegistryClient, RegistryError};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Errors converting an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageConvertError {
    #[error("registry request failed")]
    Registry(#[from] RegistryError),
    #[error("failed to read OCI layout file {path}")]
    Layout {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} JSON is malformed")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("image index has no linux/amd64 manifest")]
    NoPlatform,
    #[error("layer media type {media_type:?} is not a (gzip) tar layer")]
    LayerType { media_type: String },
    #[error("failed to convert layer {digest}")]
    Layer {
        digest: String,
        source: LayerConvertError,
    },
    #[error("failed to unpack layer {digest}")]
    Unpack { digest: String, source: UnpackError },
    #[error("failed to use a temporary file")]
    Temp { source: std::io::Error },
    #[error("{digest:?} is not a sha256 digest (sha256: and 64 hex digits)")]
    BadDigest { digest: String },
    #[error("OCI layout blob {path} has digest {actual}, expected {expected}")]
    LayoutDigest {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

/// What the image runs (the `config` object of its configuration).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RunConfig {
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

impl RunConfig {
    /// Entrypoint followed by cmd, as a container runtime runs them.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = self.entrypoint.clone().unwrap_or_default();
        argv.extend(self.cmd.clone().unwrap_or_default());
        argv
    }
}

/// An image's layers applied to a directory.
#[derive(Debug, Clone)]
pub struct UnpackedImage {
    pub run: RunConfig,
    /// Regular files of the image (cleaned paths relative to the root).
    pub files: HashSet<String>,
}

/// Where the source image comes from.
#[derive(Debug, Clone)]
pub enum ImageSource {
    Registry(Reference),
    /// An OCI image layout directory and optionally the tag to pick.
    Layout {
        dir: PathBuf,
        tag: Option<String>,
    },
}

/// What was pushed.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertedImage {
    pub reference: String,
    pub manifest_digest: String,
    pub layers: Vec<ConvertedLayer>,
}

/// One converted layer.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertedLayer {
    pub digest: String,
    pub size: u64,
    pub toc_digest: String,
    pub uncompressed_size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    platform: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageManifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

struct Source<'a> {
    client: &'a RegistryClient,
    kind: &'a ImageSource,
}

impl Source<'_> {
    async fn blob(&self, digest: &str, out: &mut std::fs::File) -> Result<(), ImageConvertError> {
        match self.kind {
            ImageSource::Registry(r) => {
                self.client.blob_to(r, digest, out).await?;
            }
            ImageSource::Layout { dir, .. } => copy_layout_blob(dir, digest, out)?,
        }
        Ok(())
    }

    async fn blob_bytes(&self, digest: &str) -> Result<Vec<u8>, ImageConvertError> {
        let mut f = tempfile::tempfile().map_err(|source| ImageConvertError::Temp { source })?;
        self.blob(digest, &mut f).await?;
        read_all(&mut f)
    }

    /// The linux/amd64 image manifest.
    async fn manifest(&self) -> Result<ImageManifest, ImageConvertError> {
        let (media_type, bytes) = match self.kind {
            ImageSource::Registry(r) => {
                let m = self.client.manifest(r).await?;
                (m.media_type, m.bytes.to_vec())
            }
            ImageSource::Layout { dir, .. } => {
                let path = dir.join("index.json");
                let bytes = std::fs::read(&path)
                    .map_err(|source| ImageConvertError::Layout { path, source })?;
                (INDEX_TYPES[0].to_string(), bytes)
            }
        };
        let mut media_type = media_type;
        let mut bytes = bytes;
        // Indexes may nest (layout index -> image index -> manifest).
        for _ in 0..3 {
            let value: Value =
                serde_json::from_slice(&bytes).map_err(|source| ImageConvertError::Json {
                    what: "manifest",
                    source,
                })?;
            let is_index =
                INDEX_TYPES.contains(&media_type.as_str()) || value.get("manifests").is_some();
            if !is_index {
                return serde_json::from_value(value).map_err(|source| ImageConvertError::Json {
                    what: "manifest",
                    source,
                });
            }
            let index: Index =
                serde_json::from_value(value).map_err(|source| ImageConvertError::Json {
                    what: "index",
                    source,
                })?;
            let want_tag = match self.kind {
                ImageSource::Layout { tag: Some(t), .. } => Some(t.as_str()),
                _ => None,
            };
            let pick = index
                .manifests
                .iter()
                .find(|d| {
                    want_tag.is_some_and(|t| {
                        d.annotations
                            .get("org.opencontainers.image.ref.name")
                            .map(String::as_str)
                            == Some(t)
                    })
                })
                .or_else(|| {
                    index.manifests.iter().find(|d| {
                        d.platform.as_ref().is_none_or(|p| {
                            p.get("os").and_then(Value::as_str) == Some("linux")
                                && p.get("architecture").and_then(Value::as_str) == Some("amd64")
                        })
                    })
                })
                .ok_or(ImageConvertError::NoPlatform)?;
            media_type = pick.media_type.clone();
            bytes = match self.kind {
                ImageSource::Registry(r) => {
                    let by_digest = Reference {
                        digest: Some(pick.digest.clone()),
                        tag: None,
                        ..r.clone()
                    };
                    self.client.manifest(&by_digest).await?.bytes.to_vec()
                }
                ImageSource::Layout { .. } => self.blob_bytes(&pick.digest).await?,
            };
        }
        Err(ImageConvertError::NoPlatform)
    }
}

fn read_all(f: &mut std::fs::File) -> Result<Vec<u8>, ImageConvertError> {
    let mut out = Vec::new();
    f.seek(SeekFrom::Start(0))
        .and_then(|_| f.read_to_end(&mut out))
        .map_err(|source| ImageConvertError::Temp { source })?;
    Ok(out)
}

/// Converts `source` and pushes the result to `target`.
pub async fn convert_image(
    client: &RegistryClient,
    source: &ImageSource,
    target: &Reference,
    opts: &LayerConvertOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ConvertedImage, ImageConvertError> {
    let src = Source {
        client,
        kind: source,
    };
    let manifest = src.manifest().await?;
    let config_bytes = src.blob_bytes(&manifest.config.digest).await?;
    let mut config: Value =
        serde_json::from_slice(&config_bytes).map_err(|source| ImageConvertError::Json {
            what: "config",
            source,
        })?;

    let mut layers = Vec::new();
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for (n, layer) in manifest.layers.iter().enumerate() {
        progress(&format!(
            "layer {}/{} {}: converting",
            n + 1,
            manifest.layers.len(),
            layer.digest
        ));
        let gzip = layer.media_type.contains("gzip");
        if !(layer.media_type.contains("tar") || layer.media_type.contains("rootfs.diff")) {
            return Err(ImageConvertError::LayerType {
                media_type: layer.media_type.clone(),
            });
        }
        let mut compressed =
            tempfile::tempfile().map_err(|source| ImageConvertError::Temp { source })?;
        src.blob(&layer.digest, &mut compressed).await?;
        compressed
            .seek(SeekFrom::Start(0))
            .map_err(|source| ImageConvertError::Temp { source })?;
        let out = tempfile::tempfile().map_err(|source| ImageConvertError::Temp { source })?;
        let digest = layer.digest.clone();
        let opts = opts.clone();
        let (written, mut out) = tokio::task::spawn_blocking(move || {
            let input: Box<dyn Read> = if gzip {
                Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
                    compressed,
                )))
            } else {
                Box::new(std::io::BufReader::new(compressed))
            };
            convert_tar(input, out, &opts)
        })
        .await
        .map_err(|e| ImageConvertError::Temp {
            source: std::io::Error::other(e),
        })?
        .map_err(|source| ImageConvertError::Layer { digest, source })?;
        let bytes = read_all(&mut out)?;
        progress(&format!(
            "layer {}/{}: pushing {} bytes",
            n + 1,
            manifest.layers.len(),
            bytes.len()
        ));
        client
            .push_blob(target, &written.blob_digest, Bytes::from(bytes))
            .await?;
        let mut annotations = layer.annotations.clone();
        annotations.insert(TOC_DIGEST_ANNOTATION.into(), written.toc_digest.clone());
        annotations.insert(
            UNCOMPRESSED_SIZE_ANNOTATION.into(),
            written.uncompressed_size.to_string(),
        );
        descriptors.push(Descriptor {
            media_type: OCI_LAYER_GZIP.into(),
            digest: written.blob_digest.clone(),
            size: written.blob_size,
            annotations,
            platform: None,
        });
        diff_ids.push(Value::String(written.diff_id.clone()));
        layers.push(ConvertedLayer {
            digest: written.blob_digest,
            size: written.blob_size,
            toc_digest: written.toc_digest,
            uncompressed_size: written.uncompressed_size,
        });
    }

    if let Some(rootfs) = config.get_mut("rootfs") {
        rootfs["diff_ids"] = Value::Array(diff_ids);
    }
    // The history no longer matches the reordered layers' creation; keep it,
    // it is informational only.
    let config_bytes = serde_json::to_vec(&config).map_err(|source| ImageConvertError::Json {
        what: "config",
        source,
    })?;
    let config_digest = crate::estargz::sha256_digest(&config_bytes);
    client
        .push_blob(target, &config_digest, Bytes::from(config_bytes.clone()))
        .await?;
    let new_manifest = ImageManifest {
        schema_version: 2,
        media_type: OCI_MANIFEST.into(),
        config: Descriptor {
            media_type: OCI_CONFIG.into(),
            digest: config_digest,
            size: config_bytes.len() as u64,
            annotations: BTreeMap::new(),
            platform: None,
        },
        layers: descriptors,
    };
    let manifest_bytes =
        serde_json::to_vec(&new_manifest).map_err(|source| ImageConvertError::Json {
            what: "manifest",
            source,
        })?;
    let manifest_digest = crate::estargz::sha256_digest(&manifest_bytes);
    client
        .push_manifest(target, OCI_MANIFEST, Bytes::from(manifest_bytes))
        .await?;
    Ok(ConvertedImage {
        reference: target.to_string(),
        manifest_digest,
        layers,
    })
}

/// Applies every layer of `source` to `root` (which must exist), for a
/// recording run of the image.
pub async fn unpack_image(
    client: &RegistryClient,
    source: &ImageSource,
    root: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<UnpackedImage, ImageConvertError> {
    let src = Source {
        client,
        kind: source,
    };
    let manifest = src.manifest().await?;
    let config_bytes = src.blob_bytes(&manifest.config.digest).await?;
    #[derive(Deserialize)]
    struct ImageConfig {
        #[serde(default)]
        config: Option<RunConfig>,
    }
    let config: ImageConfig =
        serde_json::from_slice(&config_bytes).map_err(|source| ImageConvertError::Json {
            what: "config",
            source,
        })?;
    let temp = |source| ImageConvertError::Temp { source };
    let mut files = HashSet::new();
    for (n, layer) in manifest.layers.iter().enumerate() {
        progress(&format!(
            "layer {}/{} {}: unpacking",
            n + 1,
            manifest.layers.len(),
            layer.digest
        ));
        let mut compressed = tempfile::tempfile().map_err(temp)?;
        src.blob(&layer.digest, &mut compressed).await?;
        let gzip = layer.media_type.contains("gzip");
        let digest = layer.digest.clone();
        let root = root.to_path_buf();
        files = tokio::task::spawn_blocking(move || {
            compressed.seek(SeekFrom::Start(0)).map_err(temp)?;
            // Unpacking reads the tar twice: give it an uncompressed, seekable copy.
            let mut tar = if gzip {
                let mut plain = tempfile::tempfile().map_err(temp)?;
                let mut decoder =
                    flate2::read::MultiGzDecoder::new(std::io::BufReader::new(compressed));
                std::io::copy(&mut decoder, &mut plain).map_err(temp)?;
                plain.seek(SeekFrom::Start(0)).map_err(temp)?;
                plain
            } else {
                compressed
            };
            unpack_layer(&mut tar, &root, &mut files)
                .map_err(|source| ImageConvertError::Unpack { digest, source })?;
            Ok::<_, ImageConvertError>(files)
        })
        .await
        .map_err(|e| ImageConvertError::Temp {
            source: std::io::Error::other(e),
        })??;
    }
    Ok(UnpackedImage {
        run: config.config.unwrap_or_default(),
        files,
    })
}

/// Layer descriptors (digest, TOC digest) of an eStargz image, for `warm`.
pub async fn estargz_layers(
    client: &RegistryClient,
    image: &Reference,
) -> Result<Vec<(String, Option<String>)>, ImageConvertError> {
    let kind = ImageSource::Registry(image.clone());
    let src = Source {
        client,
        kind: &kind,
    };
    let manifest = src.manifest().await?;
    Ok(manifest
        .layers
        .into_iter()
        .map(|l| {
            let toc = l.annotations.get(TOC_DIGEST_ANNOTATION).cloned();
            (l.digest, toc)
        })
        .collect())
}
