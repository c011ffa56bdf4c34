//! A small async QMP client: greeting, capability negotiation, commands
//! matched to replies by id, and events fanned out to subscribers.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

/// How long a command may take before we give up on it. Generous: TCG
/// guests on a loaded host are slow, and QEMU's main loop with them.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("failed to connect to QMP socket {path}")]
    Connect {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QMP connection failed")]
    Io {
        #[source]
        source: io::Error,
    },
    #[error("QMP sent something that is not JSON: {line:?}")]
    Parse {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("QMP message is neither a greeting, a reply nor an event: {line:?}")]
    UnknownMessage { line: String },
    #[error("QMP did not greet with a {{\"QMP\": ...}} banner")]
    NoGreeting,
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP command {command} got no reply within {seconds} s")]
    Timeout { command: String, seconds: u64 },
    #[error("QMP connection closed before command {command} was answered")]
    Closed { command: String },
}

/// An asynchronous event from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub event: String,
    pub data: Value,
}

/// One line from QEMU, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    Greeting,
    Return {
        id: Option<u64>,
        value: Value,
    },
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    Event(QmpEvent),
}

/// Classifies one line of QMP.
pub fn parse_message(line: &str) -> Result<QmpMessage, QmpError> {
    let value: Value = serde_json::from_str(line).map_err(|source| QmpError::Parse {
        line: line.to_owned(),
        source,
    })?;
    let id = value.get("id").and_then(Value::as_u64);
    if value.get("QMP").is_some() {
        Ok(QmpMessage::Greeting)
    } else if let Some(result) = value.get("return") {
        Ok(QmpMessage::Return {
            id,
            value: result.clone(),
        })
    } else if let Some(error) = value.get("error") {
        let text = |key: &str| {
            error
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Ok(QmpMessage::Error {
            id,
            class: text("class"),
            desc: text("desc"),
        })
    } else if let Some(event) = value.get("event").and_then(Value::as_str) {
        let data = value.get("data").cloned().unwrap_or(Value::Null);
        Ok(QmpMessage::Event(QmpEvent {
            event: event.to_owned(),
            data,
        }))
    } else {
        Err(QmpError::UnknownMessage {
            line: line.to_owned(),
        })
    }
}

type Reply = Result<Value, (String, String)>;
/// Waiters by command id; `None` once the connection has closed, so that
/// late commands fail at once instead of waiting for their timeout.
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>>;

fn lock(
    pending: &Pending,
) -> std::sync::MutexGuard<'_, Option<HashMap<u64, oneshot::Sender<Reply>>>> {
    pending
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A negotiated QMP connection.
pub struct QmpClient {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient").finish_non_exhaustive()
    }
}

impl QmpClient {
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        Self::handshake(stream).await
    }

    /// Reads the greeting and enters command mode.
    pub async fn handshake(stream: UnixStream) -> Result<Self, QmpError> {
        let (read_half, writer) = stream.into_split();
        let mut lines = BufReader::new(read_half).lines();
        let greeting = lines
            .next_line()
            .await
            .map_err(|source| QmpError::Io { source })?;
        match greeting.as_deref().map(parse_message) {
            Some(Ok(QmpMessage::Greeting)) => {}
            _ => return Err(QmpError::NoGreeting),
        }
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events, _) = broadcast::channel(64);
        let reader = tokio::spawn(read_loop(lines, pending.clone(), events.clone()));
        let client = Self {
            writer: tokio::sync::Mutex::new(writer),
            pending,
            events,
            next_id: AtomicU64::new(1),
            reader,
        };
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_passing(command, arguments, None).await
    }

    /// Hands `fd` to QEMU in a new fd set and returns the set's id: QEMU then opens the
    /// file as `/dev/fdset/<id>` (with the access mode `fd` was opened with). A jailed QEMU
    /// opens no host path itself.
    pub async fn add_fd(&self, fd: BorrowedFd<'_>) -> Result<u64, QmpError> {
        let reply = self.execute_passing("add-fd", None, Some(fd)).await?;
        reply["fdset-id"]
            .as_u64()
            .ok_or_else(|| QmpError::UnknownMessage {
                line: reply.to_string(),
            })
    }

    /// Drops QEMU's fd set `id`; what QEMU opened from it stays open.
    pub async fn remove_fdset(&self, id: u64) -> Result<(), QmpError> {
        self.execute("remove-fd", Some(json!({ "fdset-id": id })))
            .await
            .map(drop)
    }

    async fn execute_passing(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        match lock(&self.pending).as_mut() {
            Some(waiters) => waiters.insert(id, reply_tx),
            None => {
                return Err(QmpError::Closed {
                    command: command.to_owned(),
                })
            }
        };
        let mut line = request.to_string();
        line.push('\n');
        let written = {
            let mut writer = self.writer.lock().await;
            match fd {
                Some(fd) => match send_with_fd(writer.as_ref(), line.as_bytes(), fd).await {
                    Ok(sent) => writer.write_all(&line.as_bytes()[sent..]).await,
                    Err(error) => Err(error),
                },
                None => writer.write_all(line.as_bytes()).await,
            }
        };
        if let Err(source) = written {
            Self::forget(&self.pending, id);
            return Err(QmpError::Io { source });
        }
        let reply = tokio::time::timeout(COMMAND_TIMEOUT, reply_rx).await;
        Self::forget(&self.pending, id);
        match reply {
            Err(_) => Err(QmpError::Timeout {
                command: command.to_owned(),
                seconds: COMMAND_TIMEOUT.as_secs(),
            }),
            Ok(Err(_)) => Err(QmpError::Closed {
                command: command.to_owned(),
            }),
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                command: command.to_owned(),
                class,
                desc,
            }),
        }
    }
}

/// Sends the start of `bytes` with `fd` attached (SCM_RIGHTS); returns how much was sent.
async fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let fds = [fd.as_raw_fd()];
    loop {
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            sendmsg::<UnixAddr>(
                stream.as_raw_fd(),
                &[io::IoSlice::new(bytes)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(sent) => return Ok(sent),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
}

impl QmpClient {
    fn forget(pending: &Pending, id: u64) {
        if let Some(waiters) = lock(pending).as_mut() {
            waiters.remove(&id);
        }
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
) {
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(%error, "QMP read failed");
                break;
            }
        };
        let (id, reply) = match parse_message(&line) {
            Ok(QmpMessage::Return { id, value }) => (id, Ok(value)),
            Ok(QmpMessage::Error { id, class, desc }) => (id, Err((class, desc))),
            Ok(QmpMessage::Event(event)) => {
                // Nobody listening is fine.
                let _ = events.send(event);
                continue;
            }
            Ok(QmpMessage::Greeting) => continue,
            Err(error) => {
                tracing::warn!(%error, "ignoring a QMP message");
                continue;
            }
        };
        let waiter = id.and_then(|id| lock(&pending).as_mut()?.remove(&id));
        match waiter {
            Some(waiter) => {
                let _ = waiter.send(reply);
            }
            None => tracing::debug!(?id, "QMP reply nobody waits for"),
        }
    }
    // Dropping the senders wakes every waiter with "closed".
    lock(&pending).take();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_messages() {
        assert_eq!(
            parse_message(r#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#).unwrap(),
            QmpMessage::Greeting
        );
        assert_eq!(
            parse_message(r#"{"return": {}, "id": 4}"#).unwrap(),
            QmpMessage::Return {
                id: Some(4),
                value: json!({})
            }
        );
        assert_eq!(
            parse_message(
                r#"{"id": 5, "error": {"class": "GenericError", "desc": "Duplicate node name"}}"#
            )
            .unwrap(),
            QmpMessage::Error {
                id: Some(5),
                class: "GenericError".into(),
                desc: "Duplicate node name".into()
            }
        );
        assert_eq!(
            parse_message(r#"{"timestamp": {"seconds": 1}, "event": "DEVICE_DELETED", "data": {"device": "d0"}}"#)
                .unwrap(),
            QmpMessage::Event(QmpEvent { event: "DEVICE_DELETED".into(), data: json!({"device": "d0"}) })
        );
        assert!(matches!(
            parse_message("not json"),
            Err(QmpError::Parse { .. })
        ));
        assert!(matches!(
            parse_message(r#"{"what": 1}"#),
            Err(QmpError::UnknownMessage { .. })
        ));
    }

    /// A scripted QEMU on the other end of a socket pair.
    async fn fake_qemu(stream: UnixStream) {
        let (read_half, mut write_half) = stream.into_split();
        let mut lines = BufReader::new(read_half).lines();
        write_half
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        while let Ok(Some(line)) = lines.next_line().await {
            let request: Value = serde_json::from_str(&line).unwrap();
            let id = request["id"].clone();
            let reply = match request["execute"].as_str().unwrap() {
                "qmp_capabilities" => json!({"return": {}, "id": id}),
                "query-status" => {
                    // An event first: the client must route it, not take it as the reply.
                    let event = json!({"event": "RESUME", "data": {}, "timestamp": {}});
                    write_half
                        .write_all(format!("{event}\n").as_bytes())
                        .await
                        .unwrap();
                    json!({"return": {"status": "running"}, "id": id})
                }
                _ => json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": id}),
            };
            write_half
                .write_all(format!("{reply}\n").as_bytes())
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn commands_get_their_replies_and_events_are_broadcast() {
        let (client_end, qemu_end) = UnixStream::pair().unwrap();
        tokio::spawn(fake_qemu(qemu_end));
        let client = QmpClient::handshake(client_end).await.unwrap();
        let mut events = client.subscribe();
        let status = client.execute("query-status", None).await.unwrap();
        assert_eq!(status, json!({"status": "running"}));
        assert_eq!(events.recv().await.unwrap().event, "RESUME");
        match client.execute("bogus", Some(json!({"a": 1}))).await {
            Err(QmpError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_closed_connection_fails_pending_commands() {
        let (client_end, qemu_end) = UnixStream::pair().unwrap();
        let server = tokio::spawn(async move {
            let (read_half, mut write_half) = qemu_end.into_split();
            let mut lines = BufReader::new(read_half).lines();
            write_half.write_all(b"{\"QMP\": {}}\n").await.unwrap();
            let line = lines.next_line().await.unwrap().unwrap();
            let id = serde_json::from_str::<Value>(&line).unwrap()["id"].clone();
            write_half
                .write_all(format!("{}\n", json!({"return": {}, "id": id})).as_bytes())
                .await
                .unwrap();
            // Read the next command, then hang up without answering.
            let _ = lines.next_line().await;
        });
        let client = QmpClient::handshake(client_end).await.unwrap();
        let result = client.execute("quit", None).await;
        assert!(matches!(result, Err(QmpError::Closed { .. })), "{result:?}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_greeting_is_an_error() {
        let (client_end, qemu_end) = UnixStream::pair().unwrap();
        drop(qemu_end);
        assert!(matches!(
            QmpClient::handshake(client_end).await,
            Err(QmpError::NoGreeting)
        ));
    }
}
