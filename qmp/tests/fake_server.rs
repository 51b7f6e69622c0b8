//! The client against misbehaving peers on real unix sockets: whatever they send, the client
//! returns a clean error, never panics or hangs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qmp::{CloseReason, Error, Qmp, MAX_LINE};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

const GREETING: &[u8] =
    b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": []}}\n";

/// Binds a socket in a fresh directory and serves one connection with `script`.
fn serve<F, Fut>(script: F) -> (tempfile::TempDir, PathBuf, tokio::task::JoinHandle<()>)
where
    F: FnOnce(UnixStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).expect("bind fake QMP socket");
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        script(stream).await;
    });
    (dir, path, task)
}

/// Greets, answers `qmp_capabilities`, then reads one request and returns its id.
async fn handshake_then_one_request(stream: &mut BufReader<UnixStream>) -> Value {
    stream.get_mut().write_all(GREETING).await.expect("greet");
    let mut line = String::new();
    stream
        .read_line(&mut line)
        .await
        .expect("read capabilities");
    let caps: Value = serde_json::from_str(&line).expect("JSON");
    let reply = format!("{{\"return\": {{}}, \"id\": {}}}\n", caps["id"]);
    stream
        .get_mut()
        .write_all(reply.as_bytes())
        .await
        .expect("answer capabilities");
    line.clear();
    stream.read_line(&mut line).await.expect("read request");
    let req: Value = serde_json::from_str(&line).expect("JSON");
    req["id"].clone()
}

async fn connect(path: &Path) -> Result<Qmp, Error> {
    tokio::time::timeout(Duration::from_secs(3), Qmp::connect_unix(path))
        .await
        .expect("connect must not hang")
}

#[tokio::test]
async fn garbage_greeting_is_not_qmp() {
    let (_dir, path, server) = serve(|mut s| async move {
        s.write_all(b"SSH-2.0-OpenSSH_9.2p1\r\n")
            .await
            .expect("write");
    });
    let err = connect(&path).await.expect_err("not QMP");
    match &err {
        Error::NotQmp { detail } => assert!(
            detail.contains("SSH-2.0"),
            "detail shows what came: {detail}"
        ),
        other => panic!("expected NotQmp, got {other:?}"),
    }
    server.await.expect("server");
}

#[tokio::test]
async fn huge_greeting_line_is_refused_at_the_cap() {
    let (_dir, path, server) = serve(|mut s| async move {
        // The client stops reading at the cap and hangs up, so this write may fail.
        let _ = s.write_all(&vec![b' '; MAX_LINE + 2]).await;
    });
    let err = connect(&path).await.expect_err("line too long");
    assert!(
        matches!(err, Error::LineTooLong { limit: MAX_LINE }),
        "{err:?}"
    );
    server.await.expect("server");
}

#[tokio::test]
async fn huge_reply_line_ends_the_connection_and_the_pending_call() {
    let (_dir, path, server) = serve(|s| async move {
        let mut s = BufReader::new(s);
        let id = handshake_then_one_request(&mut s).await;
        let mut reply = format!("{{\"id\": {id}, \"return\": \"").into_bytes();
        reply.resize(MAX_LINE + 100, b'a');
        reply.extend_from_slice(b"\"}\n");
        let _ = s.get_mut().write_all(&reply).await;
    });
    let qmp = connect(&path).await.expect("handshake");
    let mut events = qmp.events();
    let res = tokio::time::timeout(
        Duration::from_secs(3),
        qmp.execute_raw("query-status", Value::Null),
    )
    .await;
    assert!(matches!(res, Ok(Err(Error::Disconnected))), "{res:?}");
    assert_eq!(
        qmp.close_reason(),
        Some(CloseReason::LineTooLong { limit: MAX_LINE })
    );
    assert!(matches!(events.next().await, Err(Error::Disconnected)));
    server.await.expect("server");
}

#[tokio::test]
async fn closing_in_the_middle_of_a_reply_is_a_clean_error() {
    let (_dir, path, server) = serve(|s| async move {
        let mut s = BufReader::new(s);
        let id = handshake_then_one_request(&mut s).await;
        let half = format!("{{\"id\": {id}, \"return\": {{\"status\": \"runn");
        s.get_mut().write_all(half.as_bytes()).await.expect("write");
    });
    let qmp = connect(&path).await.expect("handshake");
    assert_eq!(
        qmp.peer_pid(),
        Some(std::process::id()),
        "the fake server runs in this process"
    );
    let res = tokio::time::timeout(
        Duration::from_secs(3),
        qmp.execute(qapi::qmp::query_status {}),
    )
    .await;
    assert!(matches!(res, Ok(Err(Error::Disconnected))), "{res:?}");
    assert_eq!(qmp.close_reason(), Some(CloseReason::EofMidLine));
    server.await.expect("server");
}

#[tokio::test]
async fn missing_socket_is_a_connect_error_naming_the_path() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("nobody-here.sock");
    let err = Qmp::connect_unix(&path).await.expect_err("no socket");
    assert!(
        matches!(&err, Error::Connect { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("cannot connect to QMP socket {}", path.display())
    );
    // The retrying variant gives up after its time with the same error.
    let started = std::time::Instant::now();
    let err = Qmp::connect_unix_timeout(&path, Duration::from_millis(200))
        .await
        .expect_err("no socket");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(150)
            && started.elapsed() < Duration::from_secs(1)
    );
}

#[tokio::test]
async fn tcp_connection_works_and_has_no_peer_pid() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local address");
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write.write_all(GREETING).await.expect("greet");
        while let Some(line) = lines.next_line().await.expect("read") {
            let req: Value = serde_json::from_str(&line).expect("JSON");
            let reply = serde_json::json!({"return": {"echo": req["execute"]}, "id": req["id"]});
            write
                .write_all(format!("{reply}\n").as_bytes())
                .await
                .expect("reply");
        }
    });
    let qmp = Qmp::connect_tcp(addr).await.expect("handshake over TCP");
    assert_eq!(qmp.peer_pid(), None);
    let reply = qmp.execute_raw("ping", Value::Null).await.expect("reply");
    assert_eq!(reply, serde_json::json!({"echo": "ping"}));
    drop(qmp);
    // Dropping the client closes the connection: the server's read loop ends.
    tokio::time::timeout(Duration::from_secs(1), server)
        .await
        .expect("server saw EOF")
        .expect("server");
}
