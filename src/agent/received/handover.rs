//! The hand-over's end on the agent (`commit`: incoming completed, images durable, `cont`) and
//! its undoing (`rollback`), kept apart from how a migration is received and prepared.

use std::time::Duration;

use tracing::{error, info, warn};

use super::{read_pid, Received};
use crate::agent::destination;
use crate::agent::metrics::Outcome;
use crate::agent::storage::{self, Phase, Record};
use crate::protocol::AgentMessage;

/// How long the incoming migration may take to complete once the source says it switched over
/// (with the return path on it has normally completed already).
const SWITCH_TIMEOUT: Duration = Duration::from_secs(60);

impl Received {
    /// The source's QEMU completed the migration: hand the VM to the destination QEMU. Answers
    /// `Running`, or `Abandoned` (after rolling back) when the destination cannot take it and
    /// never ran, so the source may resume. Also finishes a hand-over a previous agent left in
    /// `Resuming`. Call [`mark_running`](Self::mark_running) once the answer is sent.
    pub async fn commit(&mut self) -> AgentMessage {
        match self.try_commit().await {
            Ok(running) => {
                self.tracked.finish(Outcome::Completed);
                running
            }
            Err(reason) if !self.may_have_run => {
                warn!(migration = %self.dir.id, %reason, "cannot hand the VM over here; the source keeps it");
                self.rollback().await;
                AgentMessage::Abandoned {
                    reason: format!(
                        "the destination cannot take the VM ({reason}); it never ran there"
                    ),
                }
            }
            Err(reason) => {
                // Past `Resuming` the guest may have run here: never undone, never abandoned.
                error!(migration = %self.dir.id, %reason, "hand-over failed after the guest was started here");
                self.tracked.finish(Outcome::Failed);
                self.forget_credentials();
                AgentMessage::Refused {
                    reason: format!(
                        "the VM was started on the destination but then failed ({reason}); \
                         its disks are kept in {}",
                        self.dir.path.display()
                    ),
                }
            }
        }
    }

    async fn try_commit(&mut self) -> Result<AgentMessage, String> {
        crate::faults::hold("agent-commit").await;
        let dest = self.destination.as_ref().ok_or("no destination QEMU")?;
        if !dest.alive() {
            return Err("the destination QEMU is gone".into());
        }
        // The hand-over's steps are in the guest's pause: timed, for FERRY_LOG=debug.
        let asked = std::time::Instant::now();
        let mut incoming_ms = 0.0;
        let mut durable_ms = 0.0;
        if self.record.phase < Phase::Resuming {
            dest.wait_incoming(SWITCH_TIMEOUT)
                .await
                .map_err(|e| crate::error_chain(&e))?;
            incoming_ms = asked.elapsed().as_secs_f64() * 1e3;
            // The point of no return on this host: from here the guest may run here. Recording
            // it and making the images durable (every mirror write was answered before the
            // source let its migration complete, so they hold the final data) are both needed
            // before `cont`, and independent: both at once, in the guest's pause.
            let record = Record {
                phase: if self.record.resume {
                    Phase::Resuming
                } else {
                    Phase::Running
                },
                ..self.record
            };
            let dir = self.dir.clone();
            let journal = tokio::task::spawn_blocking(move || dir.record(record));
            let flush = storage::sync_files(self.images.clone());
            let at = std::time::Instant::now();
            let (journaled, flushed) = tokio::join!(journal, flush);
            durable_ms = at.elapsed().as_secs_f64() * 1e3;
            match journaled {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(e) => return Err(format!("journal task failed: {e}")),
            }
            flushed.map_err(|e| crate::error_chain(&e))?;
            self.record = record;
            self.tracked.phase(record.phase);
        } else {
            // A restarted agent finishing a hand-over: the flush may not have happened.
            storage::sync_files(self.images.clone())
                .await
                .map_err(|e| crate::error_chain(&e))?;
        }
        crate::faults::hold("agent-resuming").await;
        let mut resumed_at_us = None;
        let dest = self.destination.as_ref().ok_or("no destination QEMU")?;
        if self.record.resume {
            // This agent started the destination paused and never resumed it; a restarted one
            // asks QEMU (a guest already running needs no `cont`).
            let running = if self.may_have_run {
                dest.running().await.map_err(|e| crate::error_chain(&e))?
            } else {
                false
            };
            if !running {
                // A QEMU that died before `cont` never ran the guest: the source may take it
                // back. Past this check a failed `cont` may or may not have reached it.
                if !dest.alive() {
                    return Err("the destination QEMU is gone".into());
                }
                self.may_have_run = true;
                resumed_at_us = dest.resume().await.map_err(|e| crate::error_chain(&e))?;
            }
        }
        tracing::debug!(
            incoming_ms,
            durable_ms,
            total_ms = asked.elapsed().as_secs_f64() * 1e3,
            "hand-over timings (ms): incoming completed, journal and images durable, total"
        );
        info!(migration = %self.dir.id, pid = dest.pid, "VM running on this host");
        Ok(AgentMessage::Running {
            pid: dest.pid,
            qmp: dest.qmp_path.display().to_string(),
            resumed_at_us,
            allocated_bytes: storage::allocated_bytes(&self.images),
        })
    }

    /// Records that the hand-over is done (after the answer went out: this write is not in the
    /// guest's pause). A crash before it leaves `Resuming`, which a restarted agent finishes.
    pub fn mark_running(&mut self) {
        if self.record.phase == Phase::Resuming {
            if let Err(e) = self.journal(Phase::Running) {
                warn!(error = %e, "recording phase running");
            }
        }
        self.forget_credentials();
    }

    /// Drops this migration's keys and closes its RAM listener: once the hand-over is settled
    /// nothing may use them again (the keys never were on disk).
    pub fn forget_credentials(&mut self) {
        self.credentials = None;
        self.ram_tunnel = None;
    }

    /// Stops serving the disks (after the switchover: the source's mirrors are done).
    pub async fn release_nbd(&mut self) {
        self.release_nbd_later().await
    }

    /// What [`release_nbd`](Self::release_nbd) does, as a future that owns what it needs (to
    /// run beside other work).
    pub fn release_nbd_later(&mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let nbd = self.nbd.take();
        let exports = self.exports.clone();
        async move {
            if let Some(nbd) = nbd {
                for export in &exports {
                    if let Err(e) = nbd.remove_export(export).await {
                        warn!(%export, error = %e, "removing export");
                    }
                }
                if let Err(e) = nbd.shutdown().await {
                    warn!(error = %e, "stopping NBD server");
                }
            }
        }
    }

    /// Undo everything: kill the destination QEMU, stop serving, remove the directory. Refused
    /// (logged) from `Resuming` on: the guest may have run here.
    pub async fn rollback(&mut self) {
        if self.may_have_run || self.record.phase == Phase::Running {
            error!(migration = %self.dir.id, "refusing to roll back a VM that may have run here");
            return;
        }
        if let Some(dest) = self.destination.take() {
            dest.kill();
            // The images must not be removed while QEMU may still write them.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while dest.alive() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } else if let Some(pid) = read_pid(&self.dir.path) {
            destination::kill_if_ours(pid, &self.dir.path);
        }
        self.ram_tunnel = None;
        if let Some(nbd) = self.nbd.take() {
            let _ = nbd.shutdown().await;
        }
        if let Err(e) = self.dir.remove() {
            warn!(error = %e, "rollback");
        }
        self.tracked.finish(Outcome::RolledBack);
        self.reservation = None;
        info!(migration = %self.dir.id, phase = "rolled_back", "phase");
    }
}
