//! What can make a migration fail, typed: each variant carries what a reader needs (which disk,
//! which status, how long) and its cause as a source. It becomes one line only where it is
//! reported ([`crate::error_chain`]).

use std::path::PathBuf;

use super::control::ControlError;
use super::source::{DiscoverError, SourceError};
use super::PhaseName;
use crate::status::{MigrationStatus, WaitError};

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A QMP command on the source QEMU failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The VM cannot be read or cannot migrate as it is.
    #[error(transparent)]
    Discover(#[from] DiscoverError),
    /// The control connection or the agent failed, or the agent refused.
    #[error(transparent)]
    Agent(#[from] ControlError),
    /// The directory of the encrypted streams' relays could not be made.
    #[error("cannot make the directory of the encrypted streams' sockets; check --state-dir")]
    Tls(#[source] crate::tls::TlsError),
    /// A relay of the encrypted streams could not start.
    #[error("cannot start the encrypted relay to the agent")]
    Tunnel(#[from] crate::tunnel::TunnelError),
    /// The NBD relay could not carry a disk's connection to the agent (QEMU only saw its
    /// socket close).
    #[error(
        "the disks' NBD connection failed because ferry's encrypted relay could not carry it: {0}"
    )]
    NbdRelay(String),
    /// The RAM relay could not carry the source QEMU's stream (QEMU only saw its socket close).
    #[error("the RAM stream failed because ferry's encrypted relay could not carry it: {0}")]
    RamRelay(String),
    /// The source QEMU's event stream broke.
    #[error("source QEMU")]
    SourceEvents(#[source] qmp::Error),
    /// The source journal could not be read or written.
    #[error("cannot use the journal {}; check --state-dir", .path.display())]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A journaled migration of this VM was interrupted and must be settled first.
    #[error("migration {migration_id} of this VM was interrupted: run `ferry recover --qmp {}` first", .socket.display())]
    Interrupted {
        /// The interrupted migration.
        migration_id: String,
        /// The VM's QMP socket.
        socket: PathBuf,
    },
    /// Ctrl-C or SIGTERM.
    #[error("interrupted")]
    Cancelled,
    /// The agent's `Prepared` had no export for a disk.
    #[error("the agent prepared no export for disk {disk}")]
    NoExport {
        /// The disk.
        disk: String,
    },
    /// Disks did not reach sync in time.
    #[error(
        "disks {disks} did not reach sync within {secs} s (the guest may write faster than the \
         network; try --sync-writes)"
    )]
    MirrorTimeout {
        /// The disks still copying.
        disks: String,
        /// The timeout.
        secs: u64,
    },
    /// A mirror job ended with an error, or vanished.
    #[error("mirror of disk {disk} failed: {why}")]
    Mirror {
        /// The disk.
        disk: String,
        /// QEMU's words.
        why: String,
    },
    /// The final sync at the switchover failed.
    #[error("final sync of disk {disk} failed: {why}")]
    FinalSync {
        /// The disk.
        disk: String,
        /// QEMU's words.
        why: String,
    },
    /// The final sync did not finish.
    #[error("waiting for the final disk sync")]
    FinalSyncWait(#[source] qmp::Error),
    /// The RAM did not reach the switchover in time.
    #[error("RAM did not converge within {secs} s")]
    RamTimeout {
        /// The timeout.
        secs: u64,
    },
    /// QEMU's migration failed or was cancelled.
    #[error("migration {status}: {why}")]
    Migration {
        /// The status QEMU reported.
        status: MigrationStatus,
        /// QEMU's reason.
        why: String,
    },
    /// Waiting for the source QEMU's migration to end failed.
    #[error("waiting for the migration to complete")]
    Wait(#[from] WaitError),
    /// The source completed but the destination gave the VM back (it never ran there).
    #[error("the destination did not take the VM: {0}; it runs on the source")]
    NotTaken(String),
    /// The source took the VM back, but something of the migration is left (the text says
    /// what, and the journal stays for `ferry recover`).
    #[error("{error}; {pending}")]
    Pending {
        /// Why the migration failed.
        error: Box<MigrateError>,
        /// What is left to do.
        pending: String,
    },
    /// Nobody could decide who owns the VM: it stays paused on the source (the text says what to
    /// do).
    #[error("{0}")]
    Undecided(String),
    /// `ferry xl migrate`: xl, its stream or its transport failed (the text says which).
    #[error("{0}")]
    Xl(String),
}

/// A failed migration: the phase, the error, and whether the source VM runs after settling.
#[derive(Debug, thiserror::Error)]
#[error("{phase}")]
pub struct Failure {
    /// Where it failed.
    pub phase: PhaseName,
    /// What went wrong.
    #[source]
    pub error: MigrateError,
    /// Whether the source VM runs (filled in after settling).
    pub source_running: bool,
}

impl Failure {
    /// Adds what the settlement left to do (if anything) to the error.
    pub fn with_pending(self, pending: Option<String>) -> Self {
        match pending {
            None => self,
            Some(pending) => Failure {
                error: MigrateError::Pending {
                    error: Box::new(self.error),
                    pending,
                },
                ..self
            },
        }
    }

    /// A failure in `phase`.
    pub fn new(phase: PhaseName, error: impl Into<MigrateError>) -> Self {
        Failure {
            phase,
            error: error.into(),
            source_running: false,
        }
    }

    /// The error as the one line the operator reads (without the phase).
    pub fn line(&self) -> String {
        crate::error_chain(&self.error)
    }
}

/// Shorthand: a closure that turns an error into a failure of `phase`.
pub fn at<E: Into<MigrateError>>(phase: PhaseName) -> impl Fn(E) -> Failure {
    move |e| Failure::new(phase, e)
}
