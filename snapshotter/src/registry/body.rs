//! Response bodies read with bounds: a registry decides how many bytes it sends, so every
//! read here stops at a limit the client chose.

use std::time::Duration;

use hyper::body::{Bytes, HttpBody};
use hyper::Body;

use super::RegistryError;

/// Largest manifest or index accepted (the distribution spec asks registries to take at
/// least 4 MiB; twice that leaves room).
pub const MAX_MANIFEST_BYTES: u64 = 8 << 20;
/// Largest token-server answer accepted.
pub const MAX_TOKEN_BYTES: u64 = 1 << 20;

/// The whole body, failing once it passes `limit` bytes or takes longer than `timeout`.
pub async fn read_limited(
    mut body: Body,
    url: &str,
    limit: u64,
    timeout: Duration,
) -> Result<Bytes, RegistryError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while let Some(piece) = next_piece(&mut body, url, deadline, timeout).await? {
        if out.len() as u64 + piece.len() as u64 > limit {
            return Err(RegistryError::BodyTooLarge {
                url: url.to_string(),
                limit,
            });
        }
        out.extend_from_slice(&piece);
    }
    Ok(Bytes::from(out))
}

/// Bytes `offset..offset + len` of a body that holds a whole blob (a server that ignored
/// the Range header), within `timeout`: the rest is streamed past, never kept, and reading
/// stops at the end of the range.
pub async fn read_range_of_whole(
    mut body: Body,
    url: &str,
    offset: u64,
    len: u64,
    timeout: Duration,
) -> Result<Vec<u8>, RegistryError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let end = offset.saturating_add(len);
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < end {
        let Some(piece) = next_piece(&mut body, url, deadline, timeout).await? else {
            break;
        };
        let piece_end = at + piece.len() as u64;
        if piece_end > offset {
            let from = offset.saturating_sub(at) as usize;
            let to = (end.min(piece_end) - at) as usize;
            out.extend_from_slice(&piece[from..to]);
        }
        at = piece_end;
    }
    Ok(out)
}

/// The next piece of `body`, failing once `deadline` (for the whole body) has passed.
async fn next_piece(
    body: &mut Body,
    url: &str,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<Option<Bytes>, RegistryError> {
    let next = tokio::time::timeout_at(deadline, body.data())
        .await
        .map_err(|_| RegistryError::Timeout {
            url: url.to_string(),
            timeout,
        })?;
    next.transpose().map_err(|source| RegistryError::Body {
        url: url.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(pieces: Vec<&'static [u8]>) -> Body {
        let stream = futures::stream::iter(
            pieces
                .into_iter()
                .map(|p| Ok::<_, std::io::Error>(Bytes::from_static(p))),
        );
        Body::wrap_stream(stream)
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_body_over_its_limit_is_refused() {
        let ok = read_limited(body_of(vec![b"abc", b"def"]), "u", 6, T).await;
        assert_eq!(&ok.unwrap()[..], b"abcdef");
        let err = read_limited(body_of(vec![b"abc", b"defg"]), "u", 6, T)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::BodyTooLarge { limit: 6, .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_trickling_body_is_cut_off_at_the_deadline_for_the_whole_body() {
        use futures::StreamExt as _;
        // A piece every 50 ms, forever: each piece is quick, the body never ends.
        let trickle = futures::stream::repeat(()).then(|()| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, std::io::Error>(Bytes::from_static(b"x"))
        });
        let started = std::time::Instant::now();
        let err = read_limited(
            Body::wrap_stream(trickle),
            "u",
            1 << 20,
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RegistryError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_range_is_cut_from_a_whole_blob_across_pieces() {
        let whole = || body_of(vec![b"0123", b"4567", b"89"]);
        assert_eq!(
            read_range_of_whole(whole(), "u", 3, 4, T).await.unwrap(),
            b"3456"
        );
        assert_eq!(
            read_range_of_whole(whole(), "u", 8, 10, T).await.unwrap(),
            b"89"
        );
        assert_eq!(
            read_range_of_whole(whole(), "u", 20, 1, T).await.unwrap(),
            b""
        );
    }
}
