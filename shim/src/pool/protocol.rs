//! What `start` and a spare shim say over the spare's control socket: one JSON line each
//! way. The socket is root's, in the 0700 state dir; lines are bounded all the same.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::PoolError;

/// Longest line either side reads.
const MAX_LINE: u64 = 64 * 1024;

/// `start` to a spare: become the shim of this pod, as containerd asked `start` for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdoptRequest {
    /// The sandbox task's id.
    pub id: String,
    pub namespace: String,
    /// containerd's address (`-address`).
    pub address: String,
    /// containerd's ttrpc address, where events go.
    pub ttrpc_address: String,
    /// The sandbox task's bundle.
    pub bundle: PathBuf,
    /// The socket to serve the pod's tasks on, as `start` will give it to containerd.
    pub socket: String,
}

/// A spare's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum AdoptReply {
    /// Listening on the socket: `start` can hand it to containerd.
    Serving,
    /// This spare cannot take the pod; `start` tries another or starts a shim of its own.
    Refused { reason: String },
}

pub async fn write_line<W, T>(writer: &mut W, message: &T) -> Result<(), PoolError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut line = serde_json::to_vec(message).map_err(PoolError::Encode)?;
    line.push(b'\n');
    writer.write_all(&line).await.map_err(PoolError::Control)?;
    writer.flush().await.map_err(PoolError::Control)
}

pub async fn read_line<R, T>(reader: R) -> Result<T, PoolError>
where
    R: AsyncRead + Unpin,
    T: for<'de> Deserialize<'de>,
{
    let mut line = Vec::new();
    BufReader::new(reader.take(MAX_LINE))
        .read_until(b'\n', &mut line)
        .await
        .map_err(PoolError::Control)?;
    if line.last() != Some(&b'\n') {
        return Err(PoolError::Truncated);
    }
    serde_json::from_slice(&line).map_err(PoolError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_cross_and_garbage_or_floods_are_refused() {
        let request = AdoptRequest {
            id: "abc".into(),
            namespace: "k8s.io".into(),
            address: "/run/containerd/containerd.sock".into(),
            ttrpc_address: "/run/containerd/containerd.sock.ttrpc".into(),
            bundle: "/run/containerd/io.containerd.runtime.v2.task/k8s.io/abc".into(),
            socket: "unix:///run/containerd/s/0123".into(),
        };
        let mut wire = Vec::new();
        write_line(&mut wire, &request).await.unwrap();
        let back: AdoptRequest = read_line(wire.as_slice()).await.unwrap();
        assert_eq!(back, request);

        let unknown = b"{\"id\":\"a\",\"extra\":1}\n".as_slice();
        assert!(matches!(
            read_line::<_, AdoptRequest>(unknown).await,
            Err(PoolError::Decode(_))
        ));
        let flood = vec![b'x'; 100 * 1024];
        assert!(matches!(
            read_line::<_, AdoptReply>(flood.as_slice()).await,
            Err(PoolError::Truncated)
        ));
        assert!(matches!(
            read_line::<_, AdoptReply>(b"".as_slice()).await,
            Err(PoolError::Truncated)
        ));
    }
}
