//! The source side of an encrypted migration: the private directory the relays' unix sockets
//! live in ([`crate::tunnel`]), and its removal.
//!
//! The source QEMU speaks plaintext to those sockets only; `ferry migrate` carries the bytes to
//! the agent over TLS with the client certificate the agent sent, which stays in this process's
//! memory. The directory, `STATE_DIR/tls/<tag>` (the state directory and this one are 0700, so
//! no other user can connect to the sockets), is journaled before it is made so that whoever
//! settles the migration (the driver, `ferry recover`, the next `ferry migrate`) removes it.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::tls::TlsError;

/// What an encrypted migration created on the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceTls {
    /// The directory holding the relays' sockets.
    pub dir: PathBuf,
}

impl SourceTls {
    /// Where migration `tag` keeps its sockets.
    pub fn plan(state_dir: &Path, tag: &str) -> SourceTls {
        SourceTls {
            dir: state_dir.join("tls").join(tag),
        }
    }

    /// Makes the directory (0700, and its parent too); a leftover of the same name is an
    /// earlier, settled attempt's and is replaced.
    pub fn create(&self) -> Result<(), TlsError> {
        let made = |path: &Path, recursive| {
            std::fs::DirBuilder::new()
                .recursive(recursive)
                .mode(0o700)
                .create(path)
                .map_err(|source| TlsError::Write {
                    path: path.to_path_buf(),
                    source,
                })
        };
        if let Some(parent) = self.dir.parent() {
            made(parent, true)?;
        }
        self.remove_files();
        made(&self.dir, false)
    }

    /// Removes the directory and its sockets.
    pub fn remove_files(&self) {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "cannot remove the migration's sockets")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_go_to_a_private_directory_and_come_back_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = SourceTls::plan(dir.path(), "abc123");
        assert_eq!(tls.dir, dir.path().join("tls/abc123"));
        tls.create().expect("create");
        std::fs::write(tls.dir.join("leftover"), b"x").expect("write");
        tls.create().expect("a leftover is replaced");
        assert!(!tls.dir.join("leftover").exists());
        use std::os::unix::fs::PermissionsExt;
        for d in [dir.path().join("tls"), tls.dir.clone()] {
            let mode = std::fs::metadata(&d).expect("dir").permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", d.display());
        }
        tls.remove_files();
        assert!(!tls.dir.exists());
    }
}
