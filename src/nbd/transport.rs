//! The byte stream under one connection: TCP as accepted, or TLS over it once
//! `NBD_OPT_STARTTLS` upgraded it (`handshake` decides, `connection` picks its reader and its
//! reply path by it).

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio_rustls::TlsAcceptor;

/// Ciphertext read ahead under rustls. rustls asks its socket for at most 4 KiB at a time, so a
/// 1 MiB write would cost 256 `read` calls; with this buffer below it, one call takes whatever
/// the socket holds (up to this much) and rustls is served from memory.
const CIPHERTEXT_BUFFER: usize = 256 * 1024;

/// A TLS session over a stream, with the read-ahead buffer below rustls.
pub(crate) type TlsStream<S> = tokio_rustls::server::TlsStream<BufReader<S>>;

/// What the transmission phase runs on.
#[derive(Debug)]
pub(crate) enum Transport<S> {
    /// No TLS: the stream as accepted.
    Plain(S),
    /// TLS negotiated with `NBD_OPT_STARTTLS`.
    Tls(Box<TlsStream<S>>),
}

/// The server side of a TLS handshake on `stream`, right after `NBD_REP_ACK` to
/// `NBD_OPT_STARTTLS`. Fails if the client's certificate is missing or not signed by the
/// configured CA (when the configuration asks for one), or if the client is not a TLS client.
pub(crate) async fn accept_tls<S>(acceptor: &TlsAcceptor, stream: S) -> io::Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    acceptor
        .accept(BufReader::with_capacity(CIPHERTEXT_BUFFER, stream))
        .await
}
