//! Per-migration credentials: a CA that lives as long as one migration, a server certificate
//! (the agent's NBD server and RAM listener) and a client certificate (`ferry migrate`'s relays,
//! [`crate::tunnel`]), all signed by it.
//!
//! The agent makes them at `Prepare`; the client half travels to the source inside the TLS
//! control link and nowhere else. A migration never writes them to disk: both ends hold them in
//! memory (the QEMU file layout below is for other peers: tests, benchmarks, `nbd-serve` users). The CA key is never written anywhere: once the two
//! certificates are signed it is dropped, so nothing can issue a third. A certificate is valid
//! from a day before its creation (clocks of two hosts disagree) to [`VALIDITY`] after: long
//! enough for a mirror of many TiB over a slow link to reach its RAM phase, short enough that a
//! leaked key from a finished migration is soon worthless (and its exports are gone anyway).
//!
//! QEMU's `tls-creds-x509` reads a directory with fixed file names: `ca-cert.pem` plus
//! `server-cert.pem`/`server-key.pem` (endpoint server) or `client-cert.pem`/`client-key.pem`
//! (endpoint client). Its sanity checks want the CA flag and keyCertSign on the CA, no CA flag,
//! digitalSignature and keyEncipherment on the leaves, and the right extended key usage.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use super::identity::{write_private, Identity};
use super::TlsError;

/// The name the server certificate carries and the source checks (`tls-hostname`): the CA is
/// this migration's alone, so the name only has to match; `.invalid` can never be a real host.
pub const TLS_HOSTNAME: &str = "destination.ferry.invalid";
/// The name in the source's client certificate (nobody checks it; the CA is what counts).
const SOURCE_NAME: &str = "source.ferry.invalid";
/// The GnuTLS priority for a QEMU `tls-creds-x509` object facing ferry (the benchmark's "QEMU
/// alone with TLS" row, tests): TLS 1.3's AES-128-GCM only, the cheapest AEAD with AES-NI, which
/// ferry's rustls ends speak too. Migrations give QEMU no TLS at all ([`crate::tunnel`]).
pub const QEMU_TLS_PRIORITY: &str = "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM";

/// How long the certificates are valid after they were made.
pub const VALIDITY: time::Duration = time::Duration::days(7);

/// The file names QEMU's `tls-creds-x509` reads.
pub mod files {
    /// The CA certificate (both endpoints).
    pub const CA_CERT: &str = "ca-cert.pem";
    /// Server endpoint: certificate.
    pub const SERVER_CERT: &str = "server-cert.pem";
    /// Server endpoint: key.
    pub const SERVER_KEY: &str = "server-key.pem";
    /// Client endpoint: certificate.
    pub const CLIENT_CERT: &str = "client-cert.pem";
    /// Client endpoint: key.
    pub const CLIENT_KEY: &str = "client-key.pem";
}

/// What the source gets: the CA to check the destination with, and its own certificate and key.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientBundle {
    /// PEM of this migration's CA certificate.
    pub ca_cert: String,
    /// PEM of the source's client certificate.
    pub client_cert: String,
    /// PEM of the client certificate's key.
    pub client_key: String,
    /// The name to check the server certificate against (`tls-hostname`).
    pub hostname: String,
}

impl std::fmt::Debug for ClientBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBundle")
            .field("hostname", &self.hostname)
            .field("client_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl ClientBundle {
    /// Writes QEMU's client-endpoint files into `dir`, which must not exist yet (created 0700).
    pub fn write_qemu_dir(&self, dir: &Path) -> Result<(), TlsError> {
        make_private_dir(dir)?;
        write_private(&dir.join(files::CA_CERT), self.ca_cert.as_bytes())?;
        write_private(&dir.join(files::CLIENT_CERT), self.client_cert.as_bytes())?;
        write_private(&dir.join(files::CLIENT_KEY), self.client_key.as_bytes())
    }

    /// The client certificate as a rustls identity (for ferry's own NBD client in tests and
    /// tools).
    pub fn identity(&self) -> Result<Identity, TlsError> {
        use rustls::pki_types::pem::PemObject;
        let bad = |what| TlsError::Empty {
            what,
            path: "(client bundle)".into(),
        };
        let chain = CertificateDer::pem_slice_iter(self.client_cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad("certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(self.client_key.as_bytes())
            .map_err(|_| bad("private key"))?;
        Ok(Identity { chain, key })
    }
}

/// One migration's credentials, as the agent holds them.
pub struct MigrationCredentials {
    ca: CertificateDer<'static>,
    ca_pem: String,
    server: Identity,
    server_cert_pem: String,
    server_key_pem: String,
    client: ClientBundle,
}

impl std::fmt::Debug for MigrationCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MigrationCredentials { .. }")
    }
}

impl MigrationCredentials {
    /// A fresh CA and the two certificates it signs; the CA key is dropped on return.
    pub fn generate() -> Result<MigrationCredentials, TlsError> {
        Self::generate_for(&[TLS_HOSTNAME], &[SOURCE_NAME])
    }

    /// [`generate`](Self::generate) with other names in the certificates: `server` for the
    /// server's (DNS names or IP addresses, at least one; the first is the one the client
    /// bundle says to check), `client` for the client's. For peers that check the server
    /// against the address they dial, as libnbd does, which has no `tls-hostname`.
    pub fn generate_for(
        server: &[&str],
        client: &[&str],
    ) -> Result<MigrationCredentials, TlsError> {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let hostname = server.first().copied().unwrap_or(TLS_HOSTNAME).to_string();
        let now = time::OffsetDateTime::now_utc();
        // Valid from a day back (two hosts' clocks disagree) to VALIDITY ahead; named `name`.
        let dated = |mut params: CertificateParams, name: &str| {
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + VALIDITY;
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, name);
            params
        };

        let ca_key = KeyPair::generate()?;
        let mut ca_params = dated(CertificateParams::default(), "ferry migration CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |name: &str, san: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate()?;
            let mut params = dated(CertificateParams::new(san)?, name);
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![usage];
            params.use_authority_key_identifier_extension = true;
            let cert = params.signed_by(&key, &issuer)?;
            Ok::<_, TlsError>((cert, key))
        };
        let (server_cert, server_key) = leaf(
            "ferry destination",
            names(server),
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client_cert, client_key) = leaf(
            "ferry source",
            names(client),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let server = Identity {
            chain: vec![server_cert.der().clone()],
            key: PrivateKeyDer::try_from(server_key.serialize_der())
                .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?,
        };
        Ok(MigrationCredentials {
            ca: ca_cert.der().clone(),
            ca_pem: ca_cert.pem(),
            server,
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client: ClientBundle {
                ca_cert: ca_cert.pem(),
                client_cert: client_cert.pem(),
                client_key: client_key.serialize_pem(),
                hostname,
            },
        })
    }

    /// What goes to the source, over the TLS control link only.
    pub fn client_bundle(&self) -> ClientBundle {
        self.client.clone()
    }

    /// The NBD server's configuration: the server certificate, and only clients with this
    /// migration's client certificate.
    pub fn nbd_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        super::server_config(&self.server, Some(super::roots(vec![self.ca.clone()])?))
    }

    /// Writes QEMU's server-endpoint files into `dir`, which must not exist yet (created 0700).
    pub fn write_qemu_server_dir(&self, dir: &Path) -> Result<(), TlsError> {
        make_private_dir(dir)?;
        write_private(&dir.join(files::CA_CERT), self.ca_pem.as_bytes())?;
        write_private(
            &dir.join(files::SERVER_CERT),
            self.server_cert_pem.as_bytes(),
        )?;
        write_private(&dir.join(files::SERVER_KEY), self.server_key_pem.as_bytes())
    }
}

fn make_private_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|source| TlsError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn credentials_make_configs_and_private_qemu_dirs() {
        let creds = MigrationCredentials::generate().expect("test setup");
        creds.nbd_server_config().expect("test setup");
        let bundle = creds.client_bundle();
        let client = bundle.identity().expect("test setup");
        let roots = super::super::roots(vec![creds.ca.clone()]).expect("test setup");
        super::super::client_config(Some(roots), Some(&client)).expect("test setup");
        assert!(!format!("{bundle:?}").contains("PRIVATE"));

        let dir = tempfile::tempdir().expect("test setup");
        let (server_dir, client_dir) = (dir.path().join("s"), dir.path().join("c"));
        creds
            .write_qemu_server_dir(&server_dir)
            .expect("test setup");
        bundle.write_qemu_dir(&client_dir).expect("test setup");
        for (d, names) in [
            (
                &server_dir,
                [files::CA_CERT, files::SERVER_CERT, files::SERVER_KEY],
            ),
            (
                &client_dir,
                [files::CA_CERT, files::CLIENT_CERT, files::CLIENT_KEY],
            ),
        ] {
            let mode = std::fs::metadata(d)
                .expect("test setup")
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o700);
            for name in names {
                let mode = std::fs::metadata(d.join(name))
                    .expect("test setup")
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{name}");
            }
        }
        // A second write into the same place is refused rather than mixing two migrations.
        assert!(bundle.write_qemu_dir(&client_dir).is_err());
    }
}
