//! TLS credentials for the NBD tests, in the file layout QEMU's `tls-creds-x509` and libnbd's
//! `tls-certificates` read (`ca-cert.pem`, `server-cert.pem`/`server-key.pem`,
//! `client-cert.pem`/`client-key.pem`).
//!
//! Both come from the agent's own per-migration credentials
//! ([`ferry::tls::migration::MigrationCredentials`], server name `destination.ferry.invalid`,
//! which QEMU checks through `tls-hostname`); the "local" ones' server certificate also names
//! 127.0.0.1 and localhost, for libnbd, which checks the server's certificate against the host
//! in the URI and (1.14) has no way to name another.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry::tls::migration::{MigrationCredentials, TLS_HOSTNAME};

/// A QEMU server-endpoint directory and a client-endpoint directory from one CA.
pub struct Creds {
    pub server_dir: PathBuf,
    pub client_dir: PathBuf,
}

impl Creds {
    /// The agent's credentials for one migration, written under `dir/name-{server,client}`.
    pub fn migration(dir: &Path, name: &str) -> (Creds, Arc<rustls::ServerConfig>) {
        let creds = MigrationCredentials::generate().expect("migration credentials");
        let config = creds.nbd_server_config().expect("server config");
        (Creds::write(&creds, dir, name), config)
    }

    /// Credentials like a migration's whose server certificate also names 127.0.0.1 and
    /// localhost, written under `dir/name-{server,client}`.
    pub fn local(dir: &Path, name: &str) -> Creds {
        let creds = MigrationCredentials::generate_for(
            &[TLS_HOSTNAME, "127.0.0.1", "localhost"],
            &["client.ferry.invalid"],
        )
        .expect("local credentials");
        Creds::write(&creds, dir, name)
    }

    /// QEMU's server-endpoint and client-endpoint directories of `creds`.
    fn write(creds: &MigrationCredentials, dir: &Path, name: &str) -> Creds {
        let out = Creds {
            server_dir: dir.join(format!("{name}-server")),
            client_dir: dir.join(format!("{name}-client")),
        };
        creds
            .write_qemu_server_dir(&out.server_dir)
            .expect("write the server directory");
        creds
            .client_bundle()
            .write_qemu_dir(&out.client_dir)
            .expect("write the client directory");
        out
    }

    /// The server's configuration read from its files the way `ferry nbd-serve --tls-cert
    /// --tls-key [--tls-ca]` reads them.
    pub fn server_config(&self, verify_clients: bool) -> Arc<rustls::ServerConfig> {
        let identity = ferry::tls::Identity::load(
            &self.server_dir.join("server-cert.pem"),
            &self.server_dir.join("server-key.pem"),
        )
        .expect("server identity");
        let roots = verify_clients.then(|| {
            ferry::tls::read_roots(&self.server_dir.join("ca-cert.pem")).expect("client CA")
        });
        ferry::tls::server_config(&identity, roots).expect("server config")
    }

    /// A client configuration from the client directory: its CA to check the server with,
    /// its certificate to present.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let identity = ferry::tls::Identity::load(
            &self.client_dir.join("client-cert.pem"),
            &self.client_dir.join("client-key.pem"),
        )
        .expect("client identity");
        let roots = ferry::tls::read_roots(&self.client_dir.join("ca-cert.pem")).expect("CA");
        ferry::tls::client_config(Some(roots), Some(&identity)).expect("client config")
    }

    /// A client directory that trusts this server's CA but presents `other`'s client
    /// certificate: a client of another migration (or another site). Its CA file holds both
    /// CAs, so that the client's own sanity check of its certificate passes and the refusal,
    /// if any, is the server's.
    pub fn impostor(&self, other: &Creds, dir: &Path) -> PathBuf {
        let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).expect("credential file");
        let both = read(&self.client_dir, "ca-cert.pem") + &read(&other.client_dir, "ca-cert.pem");
        write_dir(
            dir,
            &[
                ("ca-cert.pem", &both),
                (
                    "client-cert.pem",
                    &read(&other.client_dir, "client-cert.pem"),
                ),
                ("client-key.pem", &read(&other.client_dir, "client-key.pem")),
            ],
        );
        dir.to_path_buf()
    }
}

fn write_dir(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).expect("credentials directory");
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("credential file");
    }
}

/// QEMU's `--object` for a client endpoint reading `dir`.
pub fn qemu_client_object(id: &str, dir: &Path) -> String {
    format!(
        "tls-creds-x509,id={id},dir={},endpoint=client",
        dir.display()
    )
}

/// QEMU `--image-opts` for export `name` on `addr` over TLS with credentials object `creds`.
pub fn qemu_tls_opts(addr: std::net::SocketAddr, name: &str, creds: &str) -> String {
    format!(
        "driver=nbd,host={},port={},export={name},tls-creds={creds},tls-hostname={TLS_HOSTNAME}",
        addr.ip(),
        addr.port()
    )
}

/// libnbd's URI for export `name` on `addr` over TLS with the client files in `dir`.
pub fn libnbd_tls_uri(addr: std::net::SocketAddr, name: &str, dir: &Path) -> String {
    format!("nbds://{addr}/{name}?tls-certificates={}", dir.display())
}
