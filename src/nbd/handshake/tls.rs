//! The plaintext part of a handshake on a server that requires TLS (the spec's FORCEDTLS mode):
//! until the client sends `NBD_OPT_STARTTLS`, every other option is refused with
//! `NBD_REP_ERR_TLS_REQD` and its data skipped unread, so nothing about the exports (not even
//! whether a name exists) and no parser beyond the option header is reachable without a TLS
//! session, which with a client CA means without this migration's client certificate.
//!
//! `NBD_OPT_EXPORT_NAME` cannot be answered with an error: the connection is closed instead.
//! `NBD_OPT_ABORT` is acknowledged as anywhere else.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{read_option_header, send, skip, HandshakeError};
use crate::nbd::wire::{self, opt, rep};

/// How the plaintext part ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BeforeTls {
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next.
    StartTls,
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
}

/// Answers options until `NBD_OPT_STARTTLS` (acknowledged) or `NBD_OPT_ABORT`.
pub(super) async fn await_starttls<S>(stream: &mut S) -> Result<BeforeTls, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(128);
    loop {
        let header = read_option_header(stream).await?;
        match header.code {
            opt::EXPORT_NAME => return Err(HandshakeError::ExportNameBeforeTls),
            opt::STARTTLS if header.length == 0 => {
                wire::put_option_reply(&mut out, opt::STARTTLS, rep::ACK, &[]);
                send(stream, &mut out).await?;
                return Ok(BeforeTls::StartTls);
            }
            opt::ABORT => {
                // The spec asks servers to ignore data sent with NBD_OPT_ABORT.
                skip(stream, header.length).await?;
                wire::put_option_reply(&mut out, opt::ABORT, rep::ACK, &[]);
                // The client may already be gone; it was leaving anyway.
                let _ = send(stream, &mut out).await;
                return Ok(BeforeTls::Aborted);
            }
            code => {
                skip(stream, header.length).await?;
                let (reply, message) = if code == opt::STARTTLS {
                    (rep::ERR_INVALID, "NBD_OPT_STARTTLS carries no data")
                } else {
                    (
                        rep::ERR_TLS_REQD,
                        "this server requires TLS: send NBD_OPT_STARTTLS first",
                    )
                };
                wire::put_option_error(&mut out, code, reply, message);
                send(stream, &mut out).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::super::test_support::*;
    use super::super::{HandshakeError, Outcome};
    use crate::nbd::transport::Transport;
    use crate::nbd::wire::{info, opt, rep, ReplyStyle, BASE_ALLOCATION};
    use crate::tls::migration::{MigrationCredentials, TLS_HOSTNAME};

    /// This migration's server configuration (client certificate required), and a client
    /// configuration trusting its CA, with the client certificate or without.
    fn credentials(with_client_cert: bool) -> (TlsAcceptor, TlsConnector) {
        let creds = MigrationCredentials::generate().expect("credentials");
        let server = creds.nbd_server_config().expect("server config");
        let bundle = creds.client_bundle();
        let ca = CertificateDer::from_pem_slice(bundle.ca_cert.as_bytes()).expect("CA PEM");
        let roots = crate::tls::roots(vec![ca]).expect("roots");
        let identity = bundle.identity().expect("client identity");
        let client = crate::tls::client_config(Some(roots), with_client_cert.then_some(&identity))
            .expect("client config");
        (TlsAcceptor::from(server), TlsConnector::from(client))
    }

    fn server_name() -> ServerName<'static> {
        ServerName::try_from(TLS_HOSTNAME).expect("a DNS name")
    }

    #[tokio::test]
    async fn options_before_starttls_get_tls_reqd_and_reveal_nothing() {
        let (registry, _f) = registry_with("disk", 1 << 20, false);
        let (acceptor, _) = credentials(true);
        let (mut client, server) = serve(registry, true, Some(acceptor));
        start(&mut client, 3).await;

        for (code, data) in [
            (opt::LIST, Vec::new()),
            (opt::STRUCTURED_REPLY, Vec::new()),
            (opt::EXTENDED_HEADERS, Vec::new()),
            (0x1234, b"unknown option".to_vec()),
        ] {
            option(&mut client, code, &data).await;
            let (echo, kind, _) = reply(&mut client).await;
            assert_eq!((echo, kind), (code, rep::ERR_TLS_REQD), "option {code}");
        }
        // A served name and an unknown one get the same answer: TLS first.
        for name in ["disk", "missing"] {
            let mut go = name_data(name);
            go.put_u16(0);
            for code in [opt::INFO, opt::GO] {
                option(&mut client, code, &go).await;
                let (_, kind, message) = reply(&mut client).await;
                assert_eq!(kind, rep::ERR_TLS_REQD);
                assert!(String::from_utf8_lossy(&message).contains("STARTTLS"));
            }
        }
        // Oversized data is skipped, not buffered, and still refused for want of TLS.
        option(&mut client, opt::GO, &vec![0u8; 1 << 20]).await;
        assert_eq!(reply(&mut client).await.1, rep::ERR_TLS_REQD);

        option(&mut client, opt::ABORT, &[]).await;
        assert_eq!(reply(&mut client).await.1, rep::ACK);
        assert!(matches!(server.await, Ok(Ok(Outcome::Aborted))));
    }

    #[tokio::test]
    async fn export_name_before_starttls_closes_the_connection() {
        let (registry, _f) = registry_with("disk", 1 << 20, false);
        let (acceptor, _) = credentials(true);
        let (mut client, server) = serve(registry, true, Some(acceptor));
        start(&mut client, 3).await;
        option(&mut client, opt::EXPORT_NAME, b"disk").await;
        assert!(matches!(
            server.await,
            Ok(Err(HandshakeError::ExportNameBeforeTls))
        ));
        // Nothing was sent back: no size, no flags, just the end of the stream.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("end of stream");
        assert!(rest.is_empty(), "{} bytes after EXPORT_NAME", rest.len());
    }

    #[tokio::test]
    async fn starttls_with_data_is_invalid_and_negotiation_goes_on() {
        let (registry, _f) = registry_with("disk", 1 << 20, false);
        let (acceptor, _) = credentials(true);
        let (mut client, server) = serve(registry, true, Some(acceptor));
        start(&mut client, 3).await;
        option(&mut client, opt::STARTTLS, b"x").await;
        assert_eq!(reply(&mut client).await.1, rep::ERR_INVALID);
        option(&mut client, opt::STARTTLS, &[]).await;
        assert_eq!(reply(&mut client).await.1, rep::ACK);
        // Not a TLS client after all: the handshake fails, the connection ends.
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("garbage");
        assert!(matches!(server.await, Ok(Err(HandshakeError::Tls(_)))));
    }

    #[tokio::test]
    async fn starttls_without_tls_configured_is_refused_by_policy() {
        let (registry, _f) = registry_with("disk", 1 << 20, false);
        let (mut client, server) = serve(registry, false, None);
        start(&mut client, 3).await;
        option(&mut client, opt::STARTTLS, &[]).await;
        let (echo, kind, message) = reply(&mut client).await;
        assert_eq!((echo, kind), (opt::STARTTLS, rep::ERR_POLICY));
        assert!(String::from_utf8_lossy(&message).contains("not enabled"));
        // Plaintext negotiation continues as before.
        let mut go = name_data("disk");
        go.put_u16(0);
        option(&mut client, opt::GO, &go).await;
        assert_eq!(reply(&mut client).await.1, rep::INFO);
        assert_eq!(reply(&mut client).await.1, rep::INFO);
        assert_eq!(reply(&mut client).await.1, rep::ACK);
        assert!(matches!(
            server.await,
            Ok(Ok(Outcome::Transmission(_, Transport::Plain(_))))
        ));
    }

    #[tokio::test]
    async fn starttls_then_go_over_tls_with_the_migration_certificates() {
        let (registry, _f) = registry_with("disk", 1 << 20, false);
        let (acceptor, connector) = credentials(true);
        let (mut client, server) = serve(registry, true, Some(acceptor));
        start(&mut client, 3).await;
        option(&mut client, opt::LIST, &[]).await;
        assert_eq!(reply(&mut client).await.1, rep::ERR_TLS_REQD);
        option(&mut client, opt::STARTTLS, &[]).await;
        assert_eq!(reply(&mut client).await, (opt::STARTTLS, rep::ACK, vec![]));
        let mut tls = connector
            .connect(server_name(), client)
            .await
            .expect("TLS handshake with the migration's certificates");

        // No second greeting: options go straight on, encrypted, from a fresh state (meta
        // contexts need structured replies negotiated first, on this side of STARTTLS).
        let mut set = name_data("disk");
        set.put_u32(1);
        set.put_u32(BASE_ALLOCATION.len() as u32);
        set.put_slice(BASE_ALLOCATION.as_bytes());
        option(&mut tls, opt::SET_META_CONTEXT, &set).await;
        assert_eq!(reply(&mut tls).await.1, rep::ERR_INVALID);
        option(&mut tls, opt::STARTTLS, &[]).await;
        assert_eq!(
            reply(&mut tls).await.1,
            rep::ERR_INVALID,
            "no TLS inside TLS"
        );
        option(&mut tls, opt::LIST, &[]).await;
        let (_, kind, data) = reply(&mut tls).await;
        assert_eq!(kind, rep::SERVER);
        assert_eq!(&data[4..], b"disk");
        assert_eq!(reply(&mut tls).await.1, rep::ACK);
        option(&mut tls, opt::STRUCTURED_REPLY, &[]).await;
        assert_eq!(reply(&mut tls).await.1, rep::ACK);
        option(&mut tls, opt::SET_META_CONTEXT, &set).await;
        assert_eq!(reply(&mut tls).await.1, rep::META_CONTEXT);
        assert_eq!(reply(&mut tls).await.1, rep::ACK);

        let mut go = name_data("disk");
        go.put_u16(1);
        go.put_u16(info::BLOCK_SIZE);
        option(&mut tls, opt::GO, &go).await;
        let (_, kind, data) = reply(&mut tls).await;
        assert_eq!(kind, rep::INFO);
        assert_eq!(
            u64::from_be_bytes(data[2..10].try_into().expect("8")),
            1 << 20
        );
        assert_eq!(reply(&mut tls).await.1, rep::INFO);
        assert_eq!(reply(&mut tls).await.1, rep::ACK);
        let Ok(Ok(Outcome::Transmission(session, Transport::Tls(_)))) = server.await else {
            panic!("expected the transmission phase over TLS");
        };
        assert_eq!(session.style, ReplyStyle::Structured);
        assert!(session.base_allocation.is_some());
    }

    #[tokio::test]
    async fn a_client_without_the_client_certificate_is_refused() {
        let (registry, _f) = registry_with("disk", 1 << 20, false);
        let (acceptor, connector) = credentials(false);
        let (mut client, server) = serve(registry, true, Some(acceptor));
        start(&mut client, 3).await;
        option(&mut client, opt::STARTTLS, &[]).await;
        assert_eq!(reply(&mut client).await.1, rep::ACK);
        // TLS 1.3: the client finishes its side before the server checks the certificate, so
        // the refusal shows on the first read.
        if let Ok(mut tls) = connector.connect(server_name(), client).await {
            option(&mut tls, opt::LIST, &[]).await;
            let mut byte = [0u8; 1];
            assert!(
                !matches!(tls.read(&mut byte).await, Ok(1)),
                "no answer without a client certificate"
            );
        }
        let Ok(Err(HandshakeError::Tls(e))) = server.await else {
            panic!("expected a failed TLS handshake");
        };
        assert!(
            e.to_string().contains("certificate"),
            "the reason names the certificate: {e}"
        );
    }
}
