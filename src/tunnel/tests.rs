//! The RAM relays of both ends in-process: a fake destination QEMU behind the agent's listener,
//! fake source QEMU connections into the source's relay, strangers on the agent's port.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

use super::incoming::{Listener, MAX_HANDSHAKES};
use super::Tunnel;
use crate::tls::migration::MigrationCredentials;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const PAYLOAD: usize = 3 << 20;

fn payload(channel: u8) -> Vec<u8> {
    (0..PAYLOAD)
        .map(|i| (i as u8).wrapping_mul(31) ^ channel)
        .collect()
}

/// The fake destination QEMU: takes `n` connections in order, reads each to its end, answers
/// with its position; returns what each carried.
async fn destination(listener: UnixListener, n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut readers = Vec::new();
    for position in 0..n {
        let (mut conn, _) = listener.accept().await.expect("accept");
        readers.push(tokio::spawn(async move {
            let mut data = Vec::new();
            conn.read_to_end(&mut data).await.expect("read");
            conn.write_all(&[position as u8]).await.expect("answer");
            data
        }));
    }
    for r in readers {
        got.push(r.await.expect("reader"));
    }
    got
}

/// The agent's RAM listener for `n` connections, in front of a fake destination QEMU's socket
/// (returned, for the test to accept on).
async fn agent_before_fake_qemu(
    dir: &std::path::Path,
    creds: &MigrationCredentials,
    n: u32,
) -> (Listener, UnixListener) {
    let qemu_socket = dir.join("dest.sock");
    let fake_qemu = UnixListener::bind(&qemu_socket).expect("bind");
    let listener = Listener::start(
        LOCAL,
        Some(LOCAL),
        creds.nbd_server_config().expect("config"),
        &qemu_socket,
        n,
    )
    .await
    .expect("listen");
    (listener, fake_qemu)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ram_connections_arrive_intact_in_order_and_strangers_get_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = MigrationCredentials::generate().expect("creds");
    let (listener, fake_qemu) = agent_before_fake_qemu(dir.path(), &creds, 3).await;
    let port = listener.port();
    let dest = tokio::spawn(destination(fake_qemu, 3));

    // More idle connections than handshakes may wait, and one TLS client without the
    // certificate: neither keeps the source out, the stranger never hears READY.
    let mut idle = Vec::new();
    for _ in 0..MAX_HANDSHAKES + 8 {
        idle.push(TcpStream::connect((LOCAL, port)).await.expect("idle"));
    }
    let no_cert = tokio_rustls::TlsConnector::from(
        crate::tls::client_config(None, None).expect("client config"),
    );
    let name = rustls::pki_types::ServerName::try_from("destination.ferry.invalid").expect("name");
    let tcp = TcpStream::connect((LOCAL, port)).await.expect("connect");
    if let Ok(mut stranger) = no_cert.connect(name, tcp).await {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stranger.read(&mut byte)).await;
        assert!(
            !matches!(read, Ok(Ok(1))),
            "a client without the certificate was let through"
        );
    }

    let src = dir.path().join("src");
    std::fs::create_dir(&src).expect("src dir");
    let mut tunnel = Tunnel::new(&src, &creds.client_bundle(), "127.0.0.1").expect("tunnel");
    let ram = tunnel.ram(port, 3).expect("relay");
    // The source QEMU opens its channels one after the other, without waiting for the peer.
    let mut channels = Vec::new();
    for channel in 0..3u8 {
        let conn = UnixStream::connect(&ram)
            .await
            .expect("connect to the relay");
        channels.push(tokio::spawn(async move {
            let mut conn = conn;
            conn.write_all(&payload(channel)).await.expect("send");
            conn.shutdown().await.expect("shutdown");
            let mut answer = Vec::new();
            conn.read_to_end(&mut answer).await.expect("answer");
            answer
        }));
    }
    let got = tokio::time::timeout(Duration::from_secs(60), dest)
        .await
        .expect("the destination got its connections")
        .expect("destination");
    for (position, data) in got.iter().enumerate() {
        assert!(
            *data == payload(position as u8),
            "connection {position} carried another channel's bytes or lost some ({} bytes)",
            data.len()
        );
    }
    for (channel, answer) in channels.into_iter().enumerate() {
        assert_eq!(answer.await.expect("channel"), vec![channel as u8]);
    }
    // All three are through: the port is closed.
    assert!(TcpStream::connect((LOCAL, port)).await.is_err());
    drop(idle);
}

/// A RAM connection the relay cannot carry (nobody listens on the agent's port) is closed, and
/// the relay says why, for the operator's error line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_relay_cannot_carry_is_closed_and_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = MigrationCredentials::generate().expect("creds");
    let closed = std::net::TcpListener::bind((LOCAL, 0)).expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let mut tunnel = Tunnel::new(dir.path(), &creds.client_bundle(), "127.0.0.1").expect("tunnel");
    let ram = tunnel.ram(port, 1).expect("relay");
    assert_eq!(tunnel.ram_failure(), None);
    let mut qemu = UnixStream::connect(&ram).await.expect("connect");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), qemu.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the connection must close"
    );
    let why = tunnel.ram_failure().expect("a failure");
    assert!(
        why.contains(&format!("cannot connect to the agent at 127.0.0.1:{port}")),
        "{why}"
    );
}

/// The relays' TLS uses AES-128-GCM (the cheapest AEAD with AES-NI) with the agent's servers,
/// which follow the client's order.
#[tokio::test]
async fn the_data_streams_negotiate_aes_128_gcm() {
    let creds = MigrationCredentials::generate().expect("creds");
    let (server_end, client_end) = tokio::io::duplex(1 << 16);
    let acceptor =
        tokio_rustls::TlsAcceptor::from(creds.nbd_server_config().expect("server config"));
    let client = super::Client::new(&creds.client_bundle()).expect("client");
    let (server, tls) = tokio::join!(
        acceptor.accept(server_end),
        client.connector.connect(client.name.clone(), client_end)
    );
    server.expect("server handshake");
    let suite = tls
        .expect("client handshake")
        .get_ref()
        .1
        .negotiated_cipher_suite()
        .map(|s| s.suite());
    assert_eq!(suite, Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
}

/// When a multifd channel's far side goes (here the destination QEMU drops it), the source QEMU
/// must learn it on its main channel, never on the multifd one: the relay closes the main
/// channel and keeps taking what QEMU writes on the broken channel until QEMU closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_multifd_channel_closes_the_main_channel_and_is_drained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = MigrationCredentials::generate().expect("creds");
    let (listener, fake_qemu) = agent_before_fake_qemu(dir.path(), &creds, 3).await;
    let port = listener.port();
    // The destination keeps the main channel and the last multifd channel open and reads
    // them; it drops the first multifd channel at once.
    let dest = tokio::spawn(async move {
        let mut kept = Vec::new();
        for position in 0..3 {
            let (conn, _) = fake_qemu.accept().await.expect("accept");
            if position != 1 {
                kept.push(tokio::spawn(async move {
                    let mut conn = conn;
                    let mut sink = Vec::new();
                    let _ = conn.read_to_end(&mut sink).await;
                }));
            }
        }
        kept
    });

    let src = dir.path().join("src");
    std::fs::create_dir(&src).expect("src dir");
    let mut tunnel = Tunnel::new(&src, &creds.client_bundle(), "127.0.0.1").expect("tunnel");
    let ram = tunnel.ram(port, 3).expect("relay");
    let mut main = UnixStream::connect(&ram).await.expect("main");
    main.write_all(b"main channel header").await.expect("main");
    let mut multifd = UnixStream::connect(&ram).await.expect("multifd 1");
    let _other = UnixStream::connect(&ram).await.expect("multifd 2");

    // Far more than the socket buffers hold: written in full only if the relay drains it.
    let written = tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..32 {
            multifd.write_all(&payload(1)).await?;
        }
        Ok::<_, std::io::Error>(())
    })
    .await
    .expect("the relay kept taking the broken channel's bytes");
    assert!(
        written.is_ok(),
        "the source QEMU saw its multifd channel fail: {written:?}"
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), main.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the main channel must close: {read:?}"
    );
    let why = tunnel.ram_failure().expect("a failure recorded");
    assert!(why.contains("RAM connection to the agent was cut"), "{why}");
    drop(multifd);
    drop(dest);
}
