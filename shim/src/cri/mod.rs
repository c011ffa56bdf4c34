//! A small CRI client: runtime.v1 over gRPC on containerd's unix socket, the calls
//! `spry upgrade` makes, and containerd's own snapshots API on the same socket (`snapshots.rs`).
//! Messages are rust-protobuf (`spry_proto::cri`); `codec.rs` frames them.

mod codec;
mod snapshots;

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use protobuf::MessageField;
use spry_proto::cri::*;
use tonic::transport::{Channel, Endpoint, Uri};

use codec::ProtobufCodec;

/// containerd's CRI socket on a standard install.
pub const DEFAULT_ENDPOINT: &str = "/run/containerd/containerd.sock";
/// Every call but a pull (which may take minutes) gives up after this.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const PULL_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot connect to the CRI socket {socket} (is containerd running?)")]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("CRI {method} failed: {code:?}: {message}")]
    Call {
        method: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("the runtime's verbose {what} lacks {field} (is this containerd's CRI?)")]
    VerboseInfo {
        what: &'static str,
        field: &'static str,
    },
    #[error("the runtime's verbose {what} cannot be read: {detail}")]
    VerboseInfoParse { what: &'static str, detail: String },
}

impl CriError {
    /// The gRPC status code of a failed call.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Call { code, .. } => Some(*code),
            Self::Connect { .. } | Self::VerboseInfo { .. } | Self::VerboseInfoParse { .. } => None,
        }
    }
}

/// A connection to a CRI runtime.
#[derive(Debug, Clone)]
pub struct CriClient {
    channel: Channel,
}

impl CriClient {
    /// Connects to the CRI socket at `socket`.
    pub async fn connect(socket: &Path) -> Result<Self, CriError> {
        let path = socket.to_path_buf();
        // The URI is only a placeholder: the connector always dials the socket.
        let channel = Endpoint::from_static("http://cri.sock")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(TokioIo::new)
                }
            }))
            .await
            .map_err(|source| CriError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(Self { channel })
    }

    async fn call<Req, Resp>(
        &self,
        method: &'static str,
        path: &'static str,
        request: Req,
        timeout: Duration,
    ) -> Result<Resp, CriError>
    where
        Req: protobuf::Message + Send + 'static,
        Resp: protobuf::Message + Send + 'static,
    {
        self.call_request(method, path, tonic::Request::new(request), timeout)
            .await
    }

    async fn call_request<Req, Resp>(
        &self,
        method: &'static str,
        path: &'static str,
        mut request: tonic::Request<Req>,
        timeout: Duration,
    ) -> Result<Resp, CriError>
    where
        Req: protobuf::Message + Send + 'static,
        Resp: protobuf::Message + Send + 'static,
    {
        let failed = |status: tonic::Status| CriError::Call {
            method,
            code: status.code(),
            message: status.message().to_owned(),
        };
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| failed(tonic::Status::unavailable(e.to_string())))?;
        request.set_timeout(timeout);
        let reply = grpc
            .unary(
                request,
                PathAndQuery::from_static(path),
                ProtobufCodec::<Req, Resp>::default(),
            )
            .await
            .map_err(failed)?;
        Ok(reply.into_inner())
    }

    pub async fn list_pod_sandboxes(&self) -> Result<Vec<PodSandbox>, CriError> {
        let reply: ListPodSandboxResponse = self
            .call(
                "ListPodSandbox",
                "/runtime.v1.RuntimeService/ListPodSandbox",
                ListPodSandboxRequest::new(),
                CALL_TIMEOUT,
            )
            .await?;
        Ok(reply.items)
    }

    /// The sandbox's status and, from containerd's verbose info, the config it was made with.
    pub async fn pod_sandbox(
        &self,
        id: &str,
    ) -> Result<(PodSandboxStatus, PodSandboxConfig), CriError> {
        let mut request = PodSandboxStatusRequest::new();
        request.pod_sandbox_id = id.to_owned();
        request.verbose = true;
        let reply: PodSandboxStatusResponse = self
            .call(
                "PodSandboxStatus",
                "/runtime.v1.RuntimeService/PodSandboxStatus",
                request,
                CALL_TIMEOUT,
            )
            .await?;
        let config = verbose_config(&reply.info, "pod sandbox info")?;
        Ok((reply.status.unwrap_or_default(), config))
    }

    pub async fn list_containers(&self, pod_id: &str) -> Result<Vec<Container>, CriError> {
        let mut filter = ContainerFilter::new();
        filter.pod_sandbox_id = pod_id.to_owned();
        let mut request = ListContainersRequest::new();
        request.filter = MessageField::some(filter);
        let reply: ListContainersResponse = self
            .call(
                "ListContainers",
                "/runtime.v1.RuntimeService/ListContainers",
                request,
                CALL_TIMEOUT,
            )
            .await?;
        Ok(reply.containers)
    }

    pub async fn container_status(&self, id: &str) -> Result<ContainerStatus, CriError> {
        Ok(self.container_status_reply(id, false).await?.0)
    }

    /// The container's status, the config it was created with and its snapshotter
    /// (containerd's verbose info).
    pub async fn container(&self, id: &str) -> Result<ContainerDetails, CriError> {
        let (status, info) = self.container_status_reply(id, true).await?;
        Ok(ContainerDetails {
            status,
            config: verbose_config(&info, "container info")?,
            snapshotter: verbose_string(&info, "snapshotter"),
            snapshot_key: verbose_string(&info, "snapshotKey"),
            runtime_type: verbose_string(&info, "runtimeType"),
        })
    }

    async fn container_status_reply(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<(ContainerStatus, std::collections::HashMap<String, String>), CriError> {
        let mut request = ContainerStatusRequest::new();
        request.container_id = id.to_owned();
        request.verbose = verbose;
        let reply: ContainerStatusResponse = self
            .call(
                "ContainerStatus",
                "/runtime.v1.RuntimeService/ContainerStatus",
                request,
                CALL_TIMEOUT,
            )
            .await?;
        Ok((reply.status.unwrap_or_default(), reply.info))
    }

    /// The image's id when the node has it.
    pub async fn image_id(&self, image: &str) -> Result<Option<String>, CriError> {
        let mut spec = ImageSpec::new();
        spec.image = image.to_owned();
        let mut request = ImageStatusRequest::new();
        request.image = MessageField::some(spec);
        let reply: ImageStatusResponse = self
            .call(
                "ImageStatus",
                "/runtime.v1.ImageService/ImageStatus",
                request,
                CALL_TIMEOUT,
            )
            .await?;
        Ok(reply.image.into_option().map(|image| image.id))
    }

    /// Pulls `image` for the pod and returns its reference (the image id containerd keeps).
    pub async fn pull_image(
        &self,
        image: &str,
        sandbox: &PodSandboxConfig,
    ) -> Result<String, CriError> {
        let mut spec = ImageSpec::new();
        spec.image = image.to_owned();
        let mut request = PullImageRequest::new();
        request.image = MessageField::some(spec);
        request.sandbox_config = MessageField::some(sandbox.clone());
        let reply: PullImageResponse = self
            .call(
                "PullImage",
                "/runtime.v1.ImageService/PullImage",
                request,
                PULL_TIMEOUT,
            )
            .await?;
        Ok(reply.image_ref)
    }

    pub async fn create_container(
        &self,
        pod_id: &str,
        config: &ContainerConfig,
        sandbox: &PodSandboxConfig,
    ) -> Result<String, CriError> {
        let mut request = CreateContainerRequest::new();
        request.pod_sandbox_id = pod_id.to_owned();
        request.config = MessageField::some(config.clone());
        request.sandbox_config = MessageField::some(sandbox.clone());
        let reply: CreateContainerResponse = self
            .call(
                "CreateContainer",
                "/runtime.v1.RuntimeService/CreateContainer",
                request,
                CALL_TIMEOUT,
            )
            .await?;
        Ok(reply.container_id)
    }

    pub async fn start_container(&self, id: &str) -> Result<(), CriError> {
        let mut request = StartContainerRequest::new();
        request.container_id = id.to_owned();
        let _: StartContainerResponse = self
            .call(
                "StartContainer",
                "/runtime.v1.RuntimeService/StartContainer",
                request,
                CALL_TIMEOUT,
            )
            .await?;
        Ok(())
    }

    /// Stops the container, killing it after `grace`.
    pub async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), CriError> {
        let mut request = StopContainerRequest::new();
        request.container_id = id.to_owned();
        request.timeout = grace.as_secs() as i64;
        let _: StopContainerResponse = self
            .call(
                "StopContainer",
                "/runtime.v1.RuntimeService/StopContainer",
                request,
                CALL_TIMEOUT + grace,
            )
            .await?;
        Ok(())
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let mut request = RemoveContainerRequest::new();
        request.container_id = id.to_owned();
        let _: RemoveContainerResponse = self
            .call(
                "RemoveContainer",
                "/runtime.v1.RuntimeService/RemoveContainer",
                request,
                CALL_TIMEOUT,
            )
            .await?;
        Ok(())
    }
}

/// What containerd's verbose status says of a container.
#[derive(Debug, Clone)]
pub struct ContainerDetails {
    pub status: ContainerStatus,
    pub config: ContainerConfig,
    /// The snapshotter its rootfs comes from (containerd's name for it), when said.
    pub snapshotter: Option<String>,
    /// Its snapshot's key in that snapshotter, when said.
    pub snapshot_key: Option<String>,
    /// The containerd runtime it runs under (`io.containerd.spry.v2`), when said.
    pub runtime_type: Option<String>,
}

/// A string `field` of containerd's verbose container info.
fn verbose_string(info: &std::collections::HashMap<String, String>, field: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    Some(value.get(field)?.as_str()?.to_owned())
}

/// The `config` in containerd's verbose info: Go's JSON of the CRI message (proto field
/// names, enums as numbers), which the proto3 JSON parser reads.
fn verbose_config<M: protobuf::MessageFull>(
    info: &std::collections::HashMap<String, String>,
    what: &'static str,
) -> Result<M, CriError> {
    let text = info.get("info").ok_or(CriError::VerboseInfo {
        what,
        field: "info",
    })?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| CriError::VerboseInfoParse {
            what,
            detail: e.to_string(),
        })?;
    let mut config = value.get("config").cloned().ok_or(CriError::VerboseInfo {
        what,
        field: "config",
    })?;
    // Go prints unset pointers as null, which the proto3 JSON parser here refuses.
    drop_nulls(&mut config);
    let options = protobuf_json_mapping::ParseOptions {
        ignore_unknown_fields: true,
        ..Default::default()
    };
    protobuf_json_mapping::parse_from_str_with_options(&config.to_string(), &options).map_err(|e| {
        CriError::VerboseInfoParse {
            what,
            detail: e.to_string(),
        }
    })
}

fn drop_nulls(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerds_go_json_of_a_config_is_read_whole() {
        // As containerd 2.x prints it: proto names, enums as numbers, nulls, unknown keys.
        let info = serde_json::json!({
            "sandboxID": "abc",
            "snapshotter": "spry",
            "snapshotKey": "c1",
            "runtimeType": "io.containerd.spry.v2",
            "config": {
                "metadata": {"name": "web", "attempt": 2},
                "image": {"image": "registry.local/app:1", "user_specified_image": "app:1"},
                "command": ["/bin/server"],
                "args": ["--port", "8080"],
                "envs": [{"key": "MODE", "value": "prod"}],
                "mounts": [{"container_path": "/data", "host_path": "/srv/data", "propagation": 2}],
                "labels": {"app": "web"},
                "log_path": "web/2.log",
                "tty": true,
                "windows": null,
                "linux": {"resources": {"memory_limit_in_bytes": 134217728},
                          "security_context": {"run_as_user": {"value": 1000}}},
                "a_field_from_a_newer_cri": 1
            }
        });
        let map = std::collections::HashMap::from([("info".to_owned(), info.to_string())]);
        let config: ContainerConfig = verbose_config(&map, "container info").unwrap();
        assert_eq!(config.metadata.name, "web");
        assert_eq!(config.metadata.attempt, 2);
        assert_eq!(config.image.image, "registry.local/app:1");
        assert_eq!(config.args, ["--port", "8080"]);
        assert_eq!(config.envs[0].value, "prod");
        assert_eq!(
            config.mounts[0].propagation.enum_value(),
            Ok(MountPropagation::PROPAGATION_BIDIRECTIONAL)
        );
        assert_eq!(config.log_path, "web/2.log");
        assert!(config.tty);
        assert_eq!(config.linux.resources.memory_limit_in_bytes, 134217728);
        assert_eq!(config.linux.security_context.run_as_user.value, 1000);
        assert_eq!(verbose_string(&map, "snapshotter").as_deref(), Some("spry"));
        assert_eq!(verbose_string(&map, "snapshotKey").as_deref(), Some("c1"));
        assert_eq!(
            verbose_string(&map, "runtimeType").as_deref(),
            Some(crate::service::RUNTIME_ID)
        );
        assert_eq!(verbose_string(&map, "sandboxID").as_deref(), Some("abc"));

        let none = std::collections::HashMap::new();
        let err = verbose_config::<ContainerConfig>(&none, "container info").unwrap_err();
        assert!(
            matches!(err, CriError::VerboseInfo { field: "info", .. }),
            "{err}"
        );
        assert_eq!(verbose_string(&none, "snapshotter"), None);
    }
}
