//! The `/metrics` endpoint: a deliberately tiny HTTP/1.x responder for Prometheus scrapers.
//!
//! It answers `GET /metrics` and nothing else, one request per connection (`Connection:
//! close`). The port may be reachable by anyone on the network, so nothing a client does may cost
//! the agent more than a bounded slice: a request head over [`MAX_HEAD`] bytes gets 431 and a
//! close, a client that has not sent its head within [`READ_TIMEOUT`] (slow loris) or does not
//! take the answer within [`WRITE_TIMEOUT`] is dropped, at most [`MAX_CONNECTIONS`] are served
//! at once (more are closed on accept), and each connection is its own task: the accept loop
//! never waits on a client, and migrations never wait on this server. No body is ever read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::metrics::Metrics;

/// The largest request head read (request line and headers); real scrapers send a few hundred.
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to receive the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// Binds the endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves scrapes until `shutdown`.
pub async fn run(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "metrics: too many connections; closing");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            answer(stream, &metrics).await;
            drop(slot);
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics,
    NotFound,
    BadMethod,
    Malformed,
}

fn parse_head(head: &[u8]) -> Asked {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_ascii_whitespace();
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next())
    else {
        return Asked::Malformed;
    };
    if !version.starts_with("HTTP/1.") {
        return Asked::Malformed;
    }
    if method != "GET" && method != "HEAD" {
        return Asked::BadMethod;
    }
    let path = target.split('?').next().unwrap_or_default();
    if path == "/metrics" {
        Asked::Metrics
    } else {
        Asked::NotFound
    }
}

/// Reads the request head: up to the blank line, at most [`MAX_HEAD`] bytes. `None`: too long.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => head,
        Ok(Err(_)) => return,
        Err(_) => {
            debug!("metrics: no request within the timeout; closing");
            return;
        }
    };
    let (status, body) = match head.as_deref().map(parse_head) {
        None => ("431 Request Header Fields Too Large", String::new()),
        Some(Asked::Metrics) => ("200 OK", metrics.render()),
        Some(Asked::NotFound) => ("404 Not Found", "only /metrics is served\n".into()),
        Some(Asked::BadMethod) => ("405 Method Not Allowed", String::new()),
        Some(Asked::Malformed) => ("400 Bad Request", String::new()),
    };
    let head_only = head.as_deref().is_some_and(|h| h.starts_with(b"HEAD "));
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        body.len()
    )
    .into_bytes();
    if !head_only {
        response.extend_from_slice(body.as_bytes());
    }
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.shutdown().await?;
        // Closing a socket with unread input resets the connection, and the client may lose
        // the answer with it: read a bounded amount of what it still sends, briefly.
        let mut sink = [0u8; 4096];
        let mut left = MAX_HEAD * 8;
        while left > 0 {
            match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        debug!("metrics: the client did not take the answer; closing");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Asked::Metrics
        );
        assert_eq!(
            parse_head(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Asked::Metrics
        );
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(
            parse_head(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Asked::BadMethod
        );
        assert_eq!(parse_head(b"GET /metrics\r\n\r\n"), Asked::Malformed);
        assert_eq!(parse_head(b"\xff\xfe\r\n\r\n"), Asked::Malformed);
    }

    async fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("send");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn hostile_clients_get_bounded_answers_and_do_not_block_others() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        tokio::spawn(run(listener, Arc::new(Metrics::new()), stop.clone()));

        // Slow loris: connections that never finish their head hold no one else up. (Two
        // places stay free: the one scrape's place may not be back before the next connects.)
        let mut lorises = Vec::new();
        for _ in 0..MAX_CONNECTIONS - 2 {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow:")
                .await
                .expect("send");
            lorises.push(s);
        }
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("ferry_migrations_total{outcome=\"completed\"} 0"),
            "{ok}"
        );

        // An oversized head is cut off at the cap, with 431.
        let mut big = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
        big.resize(MAX_HEAD * 4, b'a');
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(&big).await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");

        // The lorises are dropped once their time is up.
        let start = tokio::time::Instant::now();
        for mut s in lorises {
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(READ_TIMEOUT * 2, s.read(&mut buf))
                .await
                .expect("closed within the timeout")
                .unwrap_or(0);
            assert_eq!(n, 0, "closed without an answer");
        }
        assert!(start.elapsed() <= READ_TIMEOUT + Duration::from_secs(2));
        stop.cancel();
    }
}
