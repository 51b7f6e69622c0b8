//! The source's journal: one file per VM (keyed by its QMP socket) under the state directory
//! (`--state-dir`, default `/run/ferry`), written durably before each step that changes the
//! source QEMU, and removed once the migration is settled either way.
//!
//! It names everything ferry created in the source QEMU (NBD nodes, mirror jobs, migration
//! capabilities it turned on), the agent and migration id to ask, and the phase reached, so that
//! `ferry recover` (or the next `ferry migrate` of the same VM) can finish what a dead driver
//! started. `/run` is a tmpfs: after a host reboot the source QEMU is gone too, and so is the
//! need for the journal.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::mirror::MirrorJob;

/// The state directory used when none is given.
pub const DEFAULT_STATE_DIR: &str = "/run/ferry";

/// How far a migration got on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourcePhase {
    /// NBD nodes and mirror jobs are (being) created.
    Mirror,
    /// Capabilities set, RAM migration (being) started. From here the source QEMU's migration
    /// status decides who owns the VM: `completed` means the destination loaded all of it.
    Ram,
    /// The source took the VM back (and resumed it if it ran): it is never handed over from
    /// here, whatever the source QEMU says. What stays is what could not be done then: telling
    /// the agent to roll back, or removing what the record still names from the source QEMU.
    Returned,
}

/// What the journal holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// The phase reached.
    pub phase: SourcePhase,
    /// The agent's id for the migration.
    pub migration_id: String,
    /// The agent, `HOST:PORT`.
    pub to: String,
    /// The nodes and jobs created in the source QEMU.
    pub jobs: Vec<MirrorJob>,
    /// Migration capabilities ferry turned on (they were off).
    pub capabilities: Vec<String>,
    /// Whether the guest was running when the migration started.
    pub resume: bool,
    /// The source QEMU's pid, to tell a dead QEMU from a busy socket.
    pub qemu_pid: Option<u32>,
    /// The migration parameters ferry changed, with the values they had before (restored if
    /// the VM stays).
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
    /// The relays' socket directory of an encrypted migration.
    #[serde(default)]
    pub tls: Option<super::tls::SourceTls>,
    /// Other files made for the migration (`ferry xl migrate`'s config for the receiver and
    /// its relay's socket), removed when it is settled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<PathBuf>,
    /// A `returned` record whose agent already heard the rollback (or never needed to: the
    /// migration ended before the RAM phase): only the source QEMU's clean-up is left.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent_told: bool,
}

impl SourceRecord {
    /// Whether it names anything in the source QEMU to remove or put back (nodes and jobs,
    /// capabilities, parameters).
    pub fn names_qemu_state(&self) -> bool {
        !self.jobs.is_empty() || !self.capabilities.is_empty() || self.parameters.is_some()
    }

    /// Forgets what it names in the source QEMU: that QEMU is gone, or was replaced.
    pub fn forget_qemu_state(&mut self) {
        (self.jobs, self.capabilities, self.parameters) = (Vec::new(), Vec::new(), None);
    }
}

/// The journal file of one VM.
#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    /// The journal for the VM behind `qmp_socket`.
    pub fn for_socket(state_dir: &Path, qmp_socket: &Path) -> Journal {
        let canonical = qmp_socket
            .canonicalize()
            .unwrap_or_else(|_| qmp_socket.to_path_buf());
        let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
        let base = canonical
            .file_name()
            .map(|n| crate::vm::safe_name(&n.to_string_lossy()))
            .unwrap_or_default();
        let name = format!("{base}-{}.json", crate::protocol::hex(&digest[..8]));
        Journal {
            path: state_dir.join("source").join(name),
        }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The interrupted migration recorded here, if any.
    pub fn read(&self) -> io::Result<Option<SourceRecord>> {
        crate::journal::read(&self.path)
    }

    /// Records `record` durably (creating the state directory if needed, private to root).
    pub fn write(&self, record: &SourceRecord) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        crate::journal::write(&self.path, record)
    }

    /// The migration is settled: forget it.
    pub fn remove(&self) -> io::Result<()> {
        crate::journal::remove(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_per_socket_round_trip() {
        let state = tempfile::tempdir().expect("tempdir");
        let a = Journal::for_socket(state.path(), Path::new("/run/vm1/qmp.sock"));
        let b = Journal::for_socket(state.path(), Path::new("/run/vm2/qmp.sock"));
        assert_ne!(a.path(), b.path());
        assert!(a.path().starts_with(state.path().join("source")));
        assert_eq!(a.read().expect("read"), None);
        let record = SourceRecord {
            phase: SourcePhase::Ram,
            migration_id: "m1-0".into(),
            to: "127.0.0.1:1".into(),
            jobs: vec![],
            capabilities: vec!["events".into()],
            resume: true,
            qemu_pid: Some(1),
            tls: None,
            files: Vec::new(),
            parameters: None,
            agent_told: false,
        };
        a.write(&record).expect("write");
        assert_eq!(a.read().expect("read"), Some(record));
        assert_eq!(b.read().expect("read"), None);
        a.remove().expect("remove");
        assert_eq!(a.read().expect("read"), None);
        assert!(SourcePhase::Mirror < SourcePhase::Ram);
        assert!(SourcePhase::Ram < SourcePhase::Returned);
    }
}
