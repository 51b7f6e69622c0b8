//! A handshake on one end of an in-memory pipe, and a minimal client for the other end, shared
//! by the option tests and the TLS tests. The client encodes by hand (from `doc/proto.md`) on
//! purpose: it must not share the parser it checks.

use std::sync::Arc;

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{negotiate, HandshakeError, Outcome, Policy};
use crate::nbd::backend::Backend;
use crate::nbd::export::{ExportState, Registry};
use crate::nbd::wire::{IHAVEOPT, OPTION_REPLY_MAGIC};

/// A registry serving one new sparse file of `size` as `name`; keep the file alive.
pub(super) fn registry_with(
    name: &str,
    size: u64,
    read_only: bool,
) -> (Arc<Registry>, tempfile::NamedTempFile) {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    f.as_file().set_len(size).expect("set_len");
    let registry = Registry::default();
    let export = ExportState {
        name: name.into(),
        path: f.path().into(),
        read_only,
        backend: Backend::open(f.path(), read_only).expect("open"),
        stop: CancellationToken::new(),
        work: TaskTracker::new(),
    };
    registry.insert(Arc::new(export)).expect("unique name");
    (Arc::new(registry), f)
}

/// The server's handshake on a task; the client's end of the pipe.
pub(super) fn serve(
    registry: Arc<Registry>,
    list_exports: bool,
    tls: Option<TlsAcceptor>,
) -> (
    DuplexStream,
    JoinHandle<Result<Outcome<DuplexStream>, HandshakeError>>,
) {
    let (client, server) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(async move {
        let policy = Policy {
            registry: &registry,
            list_exports,
            tls: tls.as_ref(),
        };
        negotiate(server, &policy).await
    });
    (client, task)
}

/// Reads the greeting and answers with client `flags`.
pub(super) async fn start<S: AsyncRead + AsyncWrite + Unpin>(client: &mut S, flags: u32) {
    let mut greeting = [0u8; 18];
    client.read_exact(&mut greeting).await.expect("greeting");
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    client.write_all(&flags.to_be_bytes()).await.expect("flags");
}

pub(super) async fn option<S: AsyncWrite + Unpin>(client: &mut S, code: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.put_u64(IHAVEOPT);
    b.put_u32(code);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    client.write_all(&b).await.expect("option");
    client.flush().await.expect("option sent");
}

/// Reads one option reply: (option, type, data).
pub(super) async fn reply<S: AsyncRead + Unpin>(client: &mut S) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    client.read_exact(&mut h).await.expect("reply header");
    assert_eq!(
        u64::from_be_bytes(h[0..8].try_into().expect("8")),
        OPTION_REPLY_MAGIC
    );
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
    let mut data = vec![0u8; len as usize];
    client.read_exact(&mut data).await.expect("reply data");
    (
        u32::from_be_bytes(h[8..12].try_into().expect("4")),
        u32::from_be_bytes(h[12..16].try_into().expect("4")),
        data,
    )
}

/// A name as `NBD_OPT_INFO`/`GO`/meta-context data starts: length, then bytes.
pub(super) fn name_data(name: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.put_u32(name.len() as u32);
    d.put_slice(name.as_bytes());
    d
}
