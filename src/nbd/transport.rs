//! The byte stream under one connection: TCP as accepted, or TLS over it once
//! `NBD_OPT_STARTTLS` upgraded it (`handshake` decides, `connection` picks its reader and its
//! reply path by it).

/// What the transmission phase runs on.
#[derive(Debug)]
pub(crate) enum Transport<S> {
    /// No TLS: the stream as accepted.
    Plain(S),
    /// TLS negotiated with `NBD_OPT_STARTTLS`, read ahead below rustls
    /// ([`crate::tls::accept_buffered`]).
    Tls(Box<crate::tls::BufferedTls<S>>),
}
