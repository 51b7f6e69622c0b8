//! TLS for everything that crosses the network: the control link (agent ↔ `ferry migrate`), the
//! NBD connections (`ferry migrate`'s relay → the agent's NBD server) and the RAM stream
//! (`ferry migrate`'s relay → the agent's RAM listener); the relays are in [`crate::tunnel`].
//!
//! - [`identity`]: a long-lived key and certificate: the agent's own (created on first start in
//!   its state directory, or the operator's), or the source's for sites with a PKI.
//! - [`migration`]: the short-lived CA, server and client certificates an agent makes for each
//!   migration, for NBD and the RAM stream (and, for other peers such as `ferry nbd-serve`'s
//!   clients, the files QEMU's `tls-creds-x509` reads).
//! - here: the rustls configurations (TLS 1.3 only, the `aws-lc-rs` provider) and the exporter
//!   value the control handshake binds its token proofs to.
//!
//! Why the source may accept an agent certificate it cannot verify: the shared token, not the
//! certificate, authenticates the agent. Both HMAC proofs cover the TLS exporter of the session
//! they travel in (RFC 8446 §7.5), so a man in the middle, who has two TLS sessions with two
//! different exporters, cannot forward a proof that verifies. With `--tls-ca` the certificate is
//! checked as well (a site with a PKI gets both).

pub mod identity;
pub mod migration;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

pub use identity::Identity;

/// Label of the exporter value the control handshake's proofs cover.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-ferry-control-v3";
/// Length of the exporter value.
pub const EXPORTER_LEN: usize = 32;

/// A TLS set-up failure, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path} holds no {what} in PEM form")]
    Empty {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// rustls refused the material (a key that does not match its certificate, say).
    #[error("TLS configuration refused: {0}")]
    Config(#[from] rustls::Error),
    /// A client-certificate verifier could not be built from the CA.
    #[error("cannot verify client certificates with this CA: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// Certificate generation failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The one crypto provider: `aws-lc-rs`, rustls's default. Its AES-GCM is the fastest here
/// (AES-128-GCM 12.2-12.4 GB/s against ring's 7.8-9.2 on this machine's AVX-512, in-place
/// 16 KiB records), and every byte of the disks and the RAM goes through it twice, once per
/// end. It builds with cc alone (no cmake, no Go) on x86_64 Linux.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The provider for the disks and the RAM ([`crate::tunnel`]): AES-128-GCM first. rustls
/// servers follow the client's order, so these connections use it: with AES-NI the cheapest
/// AEAD there is (measured with `bench/run`), and 128-bit keys for one short-lived migration
/// are ample. The control link keeps the default order.
pub fn bulk_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
        ],
        ..rustls::crypto::aws_lc_rs::default_provider()
    })
}

/// Every certificate in a PEM file (a chain or a CA bundle).
pub fn read_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let text = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&text)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let text = std::fs::read(path).map_err(|source| TlsError::Read {
        what: "private key",
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|_| TlsError::Empty {
        what: "private key",
        path: path.to_path_buf(),
    })
}

/// A root store holding every certificate of a CA file.
pub fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    roots(read_certs(path, "CA certificate")?)
}

/// A root store from certificates.
pub fn roots(certs: Vec<CertificateDer<'static>>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs {
        store.add(cert)?;
    }
    Ok(store)
}

/// A TLS 1.3 server configuration presenting `identity`; with `client_roots`, a client must
/// present a certificate those roots signed.
pub fn server_config(
    identity: &Identity,
    client_roots: Option<RootCertStore>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_roots {
        Some(roots) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()?,
        ),
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_single_cert(
        identity.chain.clone(),
        identity.key.clone_key(),
    )?))
}

/// A TLS 1.3 client configuration. With `roots` the server's certificate must chain to them
/// (and name the host dialled); without, any certificate is accepted and the caller must
/// authenticate the peer some other way (the control link: token proofs bound to
/// [`exporter`]). `identity`: a client certificate to present.
pub fn client_config(
    roots: Option<RootCertStore>,
    identity: Option<&Identity>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_with(provider(), roots, identity)
}

/// [`client_config`] with another crypto provider (e.g. [`bulk_provider`]).
pub fn client_config_with(
    provider: Arc<CryptoProvider>,
    roots: Option<RootCertStore>,
    identity: Option<&Identity>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match roots {
        Some(roots) => builder.with_root_certificates(roots),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(TokenAuthenticated(provider))),
    };
    let config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The exporter value (RFC 8446 §7.5) of a TLS session: the same on both ends of one session,
/// different on each leg of a relay.
pub fn exporter<D>(conn: &rustls::ConnectionCommon<D>) -> Result<[u8; EXPORTER_LEN], TlsError> {
    let mut out = [0u8; EXPORTER_LEN];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, None)?;
    Ok(out)
}

/// Accepts any server certificate, but still checks that the server holds its key (the
/// handshake signature): the peer is authenticated by the token proofs bound to the session.
#[derive(Debug)]
struct TokenAuthenticated(Arc<CryptoProvider>);

impl ServerCertVerifier for TokenAuthenticated {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is configured.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// SHA-256 of a certificate's DER, as `AA:BB:...`, the form operators compare by eye.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Ciphertext read ahead under rustls. rustls asks its socket for at most 4 KiB at a time, so a
/// 1 MiB write would cost 256 `read` calls; with this buffer below it, one call takes whatever
/// the socket holds (up to this much) and rustls is served from memory. A peer can make a
/// connection hold this much before its handshake is done.
pub(crate) const CIPHERTEXT_BUFFER: usize = 256 * 1024;

/// A server-side TLS session with the read-ahead buffer below rustls.
pub(crate) type BufferedTls<S> = tokio_rustls::server::TlsStream<tokio::io::BufReader<S>>;

/// The server side of a TLS handshake on `stream` (the agent's NBD server after `STARTTLS`, its
/// RAM listener), reading through [`CIPHERTEXT_BUFFER`]. Fails if the client's certificate is
/// missing or not signed by the configured CA (when the configuration asks for one), or if the
/// client is not a TLS client.
pub(crate) async fn accept_buffered<S>(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: S,
) -> std::io::Result<BufferedTls<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    acceptor
        .accept(tokio::io::BufReader::with_capacity(
            CIPHERTEXT_BUFFER,
            stream,
        ))
        .await
}
