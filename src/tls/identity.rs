//! A long-lived TLS identity: a certificate chain and its private key.
//!
//! The agent's is created on first start in its state directory (`agent-key.pem`, mode 0600,
//! and a self-signed `agent-cert.pem`) and reused afterwards, so that its fingerprint stays the
//! same across restarts; an operator with a PKI passes `--tls-cert/--tls-key` instead.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsError;

/// File name of the agent's generated key in its state directory.
pub const AGENT_KEY: &str = "agent-key.pem";
/// File name of the agent's generated certificate in its state directory.
pub const AGENT_CERT: &str = "agent-cert.pem";

/// A certificate chain (leaf first) and its key.
#[derive(Debug)]
pub struct Identity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Reads an operator's certificate chain and key; a key that does not match the
    /// certificate is refused when a configuration is built from it.
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        let chain = super::read_certs(cert, "certificate")?;
        let key = super::read_key(key)?;
        Ok(Identity { chain, key })
    }

    /// The agent's own identity in `state_dir`: read if there, created (and kept) otherwise.
    /// The directory is created 0700; the key is written 0600 before any byte of it.
    pub fn load_or_create(state_dir: &Path) -> Result<(Identity, bool), TlsError> {
        let (cert, key) = (state_dir.join(AGENT_CERT), state_dir.join(AGENT_KEY));
        if key.exists() || cert.exists() {
            return Ok((Identity::load(&cert, &key)?, false));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| TlsError::Write {
                path: state_dir.to_path_buf(),
                source,
            })?;
        // Two agents starting at once on a fresh host: one creates, the other waits and reads.
        let lock_path = state_dir.join(".identity.lock");
        let lock_file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| TlsError::Write {
                path: lock_path.clone(),
                source,
            })?;
        let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| TlsError::Write {
                path: lock_path,
                source: errno.into(),
            })?;
        if key.exists() || cert.exists() {
            return Ok((Identity::load(&cert, &key)?, false));
        }
        let key_pair = rcgen::KeyPair::generate()?;
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "ferry-agent".into());
        let mut params = rcgen::CertificateParams::new(vec![host.clone()])
            .or_else(|_| rcgen::CertificateParams::new(vec!["ferry-agent".to_string()]))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("ferry agent on {host}"));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(365 * 20);
        let certificate = params.self_signed(&key_pair)?;
        write_private(&key, key_pair.serialize_pem().as_bytes())?;
        write_private(&cert, certificate.pem().as_bytes())?;
        Ok((Identity::load(&cert, &key)?, true))
    }

    /// The leaf certificate's SHA-256 fingerprint.
    pub fn fingerprint(&self) -> String {
        self.chain
            .first()
            .map(super::fingerprint)
            .unwrap_or_default()
    }
}

/// Writes `bytes` to a new file readable by its owner only (created 0600, then synced).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let fail = |source| TlsError::Write {
        path: PathBuf::from(path),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    // The mode of create_new is filtered by the umask, never widened: make it exact.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(fail)?;
    file.write_all(bytes).map_err(fail)?;
    file.sync_all().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_identity_is_created_once_and_private() {
        let dir = tempfile::tempdir().expect("test setup");
        let state = dir.path().join("state");
        let (first, created) = Identity::load_or_create(&state).expect("test setup");
        assert!(created);
        let (again, created) = Identity::load_or_create(&state).expect("test setup");
        assert!(!created);
        assert_eq!(first.fingerprint(), again.fingerprint());
        let mode = |p: &Path| {
            std::fs::metadata(p)
                .expect("test setup")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(AGENT_KEY)), 0o600);
        super::super::server_config(&first, None).expect("test setup");
    }
}
