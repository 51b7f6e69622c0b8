//! The migrations this agent holds, by id, so that a migration can outlive its control
//! connection: a source that lost the link (or `ferry recover` after `ferry migrate` died)
//! reaches it again with `Resolve`, and a restarted agent puts back what its journals name.
//!
//! A migration lives in a [`Slot`]; whoever acts on it locks the slot, and whoever finishes it
//! (commit or rollback) takes it out, so a connection and a recovering source can never both
//! act on one migration. A connection waiting for the next message does not hold the lock.
//!
//! A migration whose connection dropped after its destination QEMU started is *detached*: a
//! watcher keeps the paused destination until the source settles it, rolls it back when its
//! QEMU dies, and kills it after `--recover-window` unless its incoming migration completed (the
//! source may have completed too: only the source can say, so such a destination is kept until
//! it does).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::metrics::Metrics;
use super::received::{read_pid, Received};
use super::space::Ledger;
use super::storage::{MigrationDir, Phase};
use crate::protocol::AgentMessage;
use crate::status::MigrationStatus;

/// One migration, `None` once someone finished it.
pub type Slot = Arc<tokio::sync::Mutex<Option<Received>>>;

/// How often a detached migration's destination is checked.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// The agent's migrations.
pub struct Registry {
    storage: PathBuf,
    recover_window: Duration,
    slots: Mutex<HashMap<String, Slot>>,
    /// The free space reserved by the migrations in progress.
    pub ledger: Arc<Ledger>,
    /// The agent's metrics.
    pub metrics: Arc<Metrics>,
}

impl Registry {
    /// An empty registry for the migrations under `storage`.
    pub fn new(storage: PathBuf, recover_window: Duration, metrics: Arc<Metrics>) -> Registry {
        Registry {
            ledger: Ledger::new(&storage),
            storage,
            recover_window,
            slots: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a migration; returns its slot.
    pub fn insert(&self, received: Received) -> Slot {
        let id = received.dir.id.clone();
        let slot = Arc::new(tokio::sync::Mutex::new(Some(received)));
        self.slots().insert(id, slot.clone());
        slot
    }

    /// Forgets a finished migration.
    pub fn remove(&self, id: &str) {
        self.slots().remove(id);
    }

    /// How many migrations are held (attached or detached).
    pub fn len(&self) -> usize {
        self.slots().len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Acts on a recovering source's verdict for migration `id`: its QEMU completed (`commit`),
    /// or not. Answers `Running` or `Abandoned`.
    pub async fn resolve(&self, id: &str, commit: bool) -> AgentMessage {
        let slot = self.slots().get(id).cloned();
        if let Some(slot) = slot {
            // The lock is held through the commit or rollback: whoever asks next (the original
            // connection, another recovering source) finds the outcome, never a half-done one.
            let mut guard = slot.lock().await;
            if let Some(received) = guard.as_mut() {
                let reply = if commit {
                    let reply = received.commit().await;
                    received.mark_running();
                    received.release_nbd().await;
                    reply
                } else {
                    received.rollback().await;
                    AgentMessage::Abandoned {
                        reason: format!("migration {id} was rolled back at the source's request"),
                    }
                };
                guard.take();
                self.remove(id);
                return reply;
            }
        }
        // Not held: only a finished hand-over leaves a directory behind.
        let dir = MigrationDir::open(&self.storage, id);
        match dir.as_ref().and_then(|d| d.read_record().map(|r| (d, r))) {
            Some((dir, record)) if record.phase >= Phase::Resuming => {
                if !commit {
                    return AgentMessage::Refused {
                        reason: format!(
                            "migration {id} was handed over and may have run here; the source \
                             cannot take it back"
                        ),
                    };
                }
                // Only a live destination lets the source quit its own copy.
                match read_pid(&dir.path).filter(|pid| super::destination::is_ours(*pid, &dir.path))
                {
                    Some(pid) => AgentMessage::Running {
                        pid,
                        qmp: dir.path.join("qmp.sock").display().to_string(),
                        resumed_at_us: None,
                        allocated_bytes: super::storage::allocated_bytes(&dir.images()),
                    },
                    None => AgentMessage::Refused {
                        reason: format!(
                            "migration {id} was handed over here but its destination QEMU is gone; \
                             its disks are kept in {}: decide by hand which copy to run",
                            dir.path.display()
                        ),
                    },
                }
            }
            _ => AgentMessage::Abandoned {
                reason: format!("no destination of migration {id} exists on this agent"),
            },
        }
    }

    /// Keeps a detached migration until the source settles it; see the module doc.
    pub fn watch(self: &Arc<Self>, id: String, slot: Slot) {
        let registry = self.clone();
        tokio::spawn(async move {
            let since = Instant::now();
            let mut told = false;
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                let mut guard = slot.lock().await;
                let Some(received) = guard.as_mut() else {
                    return;
                };
                if !received.destination_alive() {
                    warn!(migration = %id, "destination QEMU exited before the source settled the migration; rolling back");
                } else {
                    match received.incoming_status().await {
                        Ok(MigrationStatus::Completed) => {
                            if !told {
                                warn!(migration = %id, "destination loaded the whole VM but the source has not settled it; keeping it paused: run `ferry recover` on the source");
                                told = true;
                            }
                            continue;
                        }
                        _ if since.elapsed() < registry.recover_window => continue,
                        status => {
                            let status = status.map(|s| s.to_string()).unwrap_or_default();
                            warn!(migration = %id, %status, "no word from the source within the recover window; rolling back");
                        }
                    }
                }
                if let Some(mut received) = guard.take() {
                    received.rollback().await;
                }
                registry.remove(&id);
                return;
            }
        });
    }

    /// A restarted agent: puts back every migration the journals under `storage` name. Half-made
    /// ones are removed; destinations waiting for a verdict are watched again; hand-overs a
    /// previous agent committed are finished.
    pub async fn resume_journals(self: &Arc<Self>) {
        let Ok(entries) = std::fs::read_dir(&self.storage) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(dir) = MigrationDir::open(&self.storage, &name) else {
                continue;
            };
            let Some(record) = dir.read_record() else {
                warn!(dir = %dir.path.display(), "no readable journal; leaving it alone");
                continue;
            };
            match record.phase {
                Phase::Running => continue,
                Phase::Receiving => {}
                Phase::Started | Phase::Resuming => {
                    if let Some(mut received) = Received::reattach(dir.clone(), record, self).await
                    {
                        if record.phase == Phase::Started && received.no_ram_yet().await {
                            // Started while the disks copied; its source lost this agent
                            // before any RAM flowed, and gave up.
                            info!(migration = %name, "destination never received RAM; rolling it back");
                            received.rollback().await;
                            continue;
                        }
                        if record.phase == Phase::Started {
                            info!(migration = %name, "destination waiting for the source's verdict; watching it again");
                            let slot = self.insert(received);
                            self.watch(name, slot);
                        } else {
                            info!(migration = %name, "finishing a hand-over the previous agent committed");
                            let reply = received.commit().await;
                            received.mark_running();
                            info!(migration = %name, reply = reply.kind(), "hand-over finished");
                        }
                        continue;
                    }
                    if record.phase == Phase::Resuming {
                        warn!(migration = %name, "the destination QEMU of a VM that was started here is gone; keeping its disks");
                        continue;
                    }
                }
            }
            // Receiving, or a destination that died before its guest ever ran here.
            if let Some(pid) = read_pid(&dir.path) {
                super::destination::kill_if_ours(pid, &dir.path);
            }
            match dir.remove() {
                Ok(()) => info!(dir = %dir.path.display(), "removed an unfinished migration"),
                Err(e) => warn!(error = %e, "cannot remove an unfinished migration"),
            }
        }
    }
}
