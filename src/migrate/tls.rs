//! The source side of an encrypted migration: the certificates the agent sent, written where
//! the source QEMU reads them, one `tls-creds-x509` client object for the NBD nodes and the RAM
//! stream, and their removal.
//!
//! The files live in a directory of ferry's own, `STATE_DIR/tls/<journal name>-<tag>` (the
//! state directory and this one are 0700, the files 0600), journaled before they are written so
//! that whoever settles the migration (the driver, `ferry recover`, the next `ferry migrate`)
//! removes object and files. QEMU reads the files when the object is created; they are kept only
//! until the migration is settled.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::source::SourceQemu;
use crate::tls::migration::ClientBundle;
use crate::tls::TlsError;

/// What an encrypted migration created on the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceTls {
    /// The `tls-creds-x509` object's id in the source QEMU.
    pub object: String,
    /// The directory holding its files.
    pub dir: PathBuf,
    /// The name the destination's certificate carries (`tls-hostname`).
    pub hostname: String,
}

impl SourceTls {
    /// Where migration `tag` of the VM journaled at `journal` keeps its files.
    pub fn plan(state_dir: &Path, journal: &Path, tag: &str, hostname: &str) -> SourceTls {
        let stem = journal
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "vm".into());
        SourceTls {
            object: format!("ferry-tls-{tag}"),
            dir: state_dir.join("tls").join(format!("{stem}-{tag}")),
            hostname: hostname.to_string(),
        }
    }

    /// Writes the agent's certificates in QEMU's layout (a leftover directory of the same name
    /// is an earlier, settled attempt's and is replaced).
    pub fn write(&self, bundle: &ClientBundle) -> Result<(), TlsError> {
        if let Some(parent) = self.dir.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|source| TlsError::Write {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
        self.remove_files();
        bundle.write_qemu_dir(&self.dir)
    }

    /// Removes the files (QEMU no longer needs them once the object exists).
    pub fn remove_files(&self) {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "cannot remove the migration's keys")
            }
        }
    }

    /// Undoes it all in a source QEMU that keeps the VM: the RAM stream's parameters back to
    /// plaintext, the object deleted (after the NBD nodes that used it), the files removed.
    /// Returns what could not be removed.
    pub async fn remove(&self, qemu: &SourceQemu) -> Option<String> {
        let mut left = None;
        if let Err(e) = qemu.set_migration_tls(None).await {
            warn!(error = %crate::error_chain(&e), "cannot reset the migration TLS parameters");
        }
        if let Err(e) = qemu.del_tls_creds(&self.object).await {
            warn!(error = %crate::error_chain(&e), "cannot remove the TLS credentials object");
            left = Some(format!("object {}", self.object));
        }
        self.remove_files();
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_go_to_a_private_directory_named_after_the_journal_and_come_back_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = SourceTls::plan(
            dir.path(),
            Path::new("/run/ferry/source/vm.sock-0011.json"),
            "abc123",
            "h",
        );
        assert_eq!(tls.object, "ferry-tls-abc123");
        assert_eq!(tls.dir, dir.path().join("tls/vm.sock-0011-abc123"));
        let creds = crate::tls::migration::MigrationCredentials::generate().expect("creds");
        tls.write(&creds.client_bundle()).expect("write");
        tls.write(&creds.client_bundle())
            .expect("a leftover is replaced");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls"))
            .expect("parent")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        tls.remove_files();
        assert!(!tls.dir.exists());
    }
}
