//! Settling a migration: the one place that decides, from the source QEMU's own migration status
//! and the agent's answer, which copy of the VM lives on, and removes everything else. A failed
//! `ferry migrate` ends here, and so do `ferry recover` and a `ferry migrate` that finds an
//! interrupted migration of the same VM in its journal.
//!
//! The rule (see `docs/protocol.md` for every crash point):
//! - The source QEMU's migration is not `completed` (failed, cancelled, never started, or still
//!   running and then cancelled here): the source owns the VM. Its mirror jobs, NBD nodes, TLS
//!   object and files are removed, the capabilities and parameters ferry set are put back, the guest is resumed if it ran before, and the agent is
//!   told to roll back (or does so by itself when its destination's stream breaks).
//! - It is `completed` (the destination loaded the whole state, thanks to the return path): the
//!   agent decides. `Running`: the source QEMU quits. `Abandoned` (the destination is gone and
//!   never ran, or never existed): the source takes the VM back. No answer: nothing is decided,
//!   the VM stays paused on the source and the journal stays for the next `ferry recover`.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::control::{self, AgentLink, ControlError};
use super::journal::{Journal, SourcePhase, SourceRecord};
use super::mirror;
use super::source::SourceQemu;
use crate::protocol::AgentMessage;
use crate::status::{MigrationInfo, MigrationStatus, WaitError};

/// How long a migration still in flight may take to end after `migrate_cancel`.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between attempts to reach the agent.
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// Who has the VM once settled.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The source: running (or paused, as it was), with nothing of the migration left in it.
    Source {
        /// Why the destination did not take it, for the operator.
        why: String,
    },
    /// The destination (the agent's `Running`); the source QEMU has quit.
    Destination {
        /// The agent's answer.
        running: AgentMessage,
        /// The source QEMU's final `query-migrate`.
        info: Option<MigrationInfo>,
    },
    /// Not decided: the source QEMU completed but the agent could not be asked (or refused to
    /// say). The guest stays paused on the source; the journal stays.
    Undecided {
        /// What happened and what to do.
        why: String,
    },
}

/// What settling needs besides the journal.
pub struct Settle<'a> {
    /// The source QEMU (None when it could not be reached).
    pub qemu: Option<&'a SourceQemu>,
    /// The journal to update and finally remove.
    pub journal: &'a Journal,
    /// The token and TLS configuration, to reach the agent again.
    pub auth: &'a control::AgentAuth,
    /// The control connection, if the driver still has one.
    pub link: Option<AgentLink>,
    /// How long to keep trying to reach the agent when its answer decides the outcome.
    pub agent_wait: Duration,
    /// Why the migration is being settled (for the agent's log and the outcome).
    pub reason: String,
    /// The source QEMU's final `query-migrate`, when the caller already read it: the guest is
    /// paused until the agent hears `commit`, so it is not asked again.
    pub known: Option<MigrationInfo>,
}

impl Settle<'_> {
    /// Settles the migration `record` describes. See the module doc.
    pub async fn run(mut self, record: SourceRecord) -> Outcome {
        let status = match self.qemu {
            Some(qemu) => match self.final_status(qemu, &record).await {
                Ok(info) => Some(info),
                Err(why) => return Outcome::Undecided { why },
            },
            None => None,
        };
        let completed = match &status {
            Some(info) => info.status == MigrationStatus::Completed,
            // The source QEMU is gone: the destination may hold the only copy. It can take the VM
            // only if it received the device state, which the agent checks (incoming completed).
            None => record.phase >= SourcePhase::Ram,
        };
        if !completed {
            return self.back_to_source(&record, true).await;
        }
        match self.ask_commit(&record).await {
            Ok(running @ AgentMessage::Running { .. }) => {
                if let Some(qemu) = self.qemu {
                    // Idle since the final sync; one that will not go goes with the QEMU.
                    let _ = mirror::remove_nodes(qemu, &record.jobs).await;
                    if let Err(e) = qemu.quit().await {
                        warn!(error = %crate::error_chain(&e), "source QEMU did not quit");
                    }
                }
                self.forget(&record);
                Outcome::Destination {
                    running,
                    info: status,
                }
            }
            Ok(AgentMessage::Abandoned { reason }) => {
                info!(%reason, "the destination gave the VM back");
                self.link = None;
                self.reason = reason;
                self.back_to_source(&record, false).await
            }
            Ok(other) => Outcome::Undecided {
                why: format!("the agent answered {} to the hand-over", other.kind()),
            },
            Err(ControlError::Refused(reason)) => Outcome::Undecided {
                why: format!(
                    "the agent refused the hand-over: {reason}; the VM stays paused on the source"
                ),
            },
            Err(e) => Outcome::Undecided {
                why: format!(
                    "the source QEMU completed migration {} but the agent at {} did not confirm \
                     the hand-over ({e}); the VM is paused here: run `ferry recover --qmp SOCKET` \
                     once the agent answers",
                    record.migration_id, record.to
                ),
            },
        }
    }

    /// The source QEMU's migration status once it can no longer change: a migration still in
    /// flight is cancelled first (which may still end `completed`, if it was past the point of
    /// no return).
    async fn final_status(
        &self,
        qemu: &SourceQemu,
        record: &SourceRecord,
    ) -> Result<MigrationInfo, String> {
        let qmp_err = |e: &(dyn std::error::Error + 'static)| {
            format!(
                "cannot read the source QEMU's migration status ({}); nothing was changed: run \
                 `ferry recover --qmp SOCKET` again",
                crate::error_chain(e)
            )
        };
        if let Some(info) = self.known.as_ref().filter(|i| i.status.is_final()) {
            return Ok(info.clone());
        }
        let mut info = qemu.query_migrate().await.map_err(|e| qmp_err(&e))?;
        if info.status.is_final() || record.phase < SourcePhase::Ram {
            return Ok(info);
        }
        if matches!(
            info.status,
            MigrationStatus::Device | MigrationStatus::Cancelling
        ) {
            // Past the point where only the device state is left to send: the outcome is a
            // moment away, and cancelling now would throw away a hand-over about to succeed.
            let waited = qemu
                .wait_migration(CANCEL_TIMEOUT, Duration::from_millis(20), |s| s.is_final())
                .await;
            match waited {
                Ok(info) => return Ok(info),
                Err(WaitError::Timeout { last, .. }) => info.status = last,
                Err(e) => return Err(qmp_err(&e)),
            }
        }
        info!(status = %info.status, "cancelling the RAM migration");
        if let Err(e) = qemu.migrate_cancel().await {
            warn!(error = %crate::error_chain(&e), "migrate_cancel");
        }
        qemu.wait_migration(CANCEL_TIMEOUT, Duration::from_millis(20), |s| s.is_final())
            .await
            .map_err(|e| qmp_err(&e))
    }

    /// Asks the agent to hand the VM over: on the driver's link if it still works, else on
    /// fresh connections until `agent_wait` passes.
    async fn ask_commit(&mut self, record: &SourceRecord) -> Result<AgentMessage, ControlError> {
        if let Some(link) = self.link.as_mut() {
            match link.commit().await {
                Err(ControlError::Lost(e)) => {
                    warn!(error = %e, "lost the agent at the hand-over; reconnecting");
                }
                other => return other,
            }
        }
        self.link = None;
        let deadline = Instant::now() + self.agent_wait;
        loop {
            match control::resolve(&record.to, self.auth, &record.migration_id, true).await {
                // A TLS handshake cut short is as transient as a refused connect: a restarted
                // agent accepts before it is ready to answer.
                Err(
                    e @ (ControlError::Lost(_)
                    | ControlError::Connect { .. }
                    | ControlError::Tls { .. }),
                ) if Instant::now() + RETRY_EVERY < deadline => {
                    info!(error = %e, "agent not reachable yet; retrying");
                    tokio::time::sleep(RETRY_EVERY).await;
                }
                other => return other,
            }
        }
    }

    /// The source keeps the VM: remove what the migration left in its QEMU, tell the agent,
    /// resume the guest if it ran before.
    async fn back_to_source(mut self, record: &SourceRecord, tell_agent: bool) -> Outcome {
        let Some(qemu) = self.qemu else {
            // Without its QEMU the source has nothing to resume; the destination never loaded
            // the VM (the agent would have taken it). Nothing is left to run.
            if tell_agent {
                self.tell_agent_abort(record).await;
            }
            self.forget(record);
            return Outcome::Undecided {
                why: format!(
                    "the source QEMU is gone and the destination never received the whole VM \
                     (migration {}): the VM is not running anywhere; start it again from its \
                     source disks",
                    record.migration_id
                ),
            };
        };
        let mut left = mirror::abandon(qemu, &record.jobs).await;
        for capability in &record.capabilities {
            if let Err(e) = qemu.set_capability(capability, false).await {
                warn!(%capability, error = %crate::error_chain(&e), "cannot turn a migration capability back off");
                left.push(format!("capability {capability}"));
            }
        }
        if let Some(parameters) = &record.parameters {
            if let Err(e) = qemu.set_migration_parameters(parameters).await {
                warn!(error = %crate::error_chain(&e), "cannot restore the migration parameters");
                left.push(format!("migration parameters {parameters}"));
            }
        }
        if tell_agent {
            self.tell_agent_abort(record).await;
        }
        let mut why = self.reason.clone();
        if record.resume {
            match qemu.status().await {
                Ok((false, state)) => {
                    info!(%state, "resuming the source guest");
                    if let Err(e) = qemu.cont().await {
                        why = format!(
                            "{why}; and the source guest could not be resumed: {}",
                            crate::error_chain(&e)
                        );
                    }
                }
                Ok((true, _)) => {}
                Err(e) => warn!(error = %crate::error_chain(&e), "query-status"),
            }
        }
        if left.is_empty() {
            self.forget(record);
        } else {
            // The journal stays so that `ferry recover` can finish the clean-up later.
            why = format!(
                "{why}; still in the source QEMU: {} (run `ferry recover` once they can go)",
                left.join(", ")
            );
        }
        Outcome::Source { why }
    }

    /// The agent rolls back by itself when its destination's stream breaks or its window
    /// passes, but not a destination that loaded the whole VM (only the source can say whether
    /// its own migration completed): that one waits for this word. So it is said on the
    /// driver's link and then once more on a fresh connection: the link may lead to an agent
    /// that was killed since (writing into a connection whose peer is gone can still succeed)
    /// while a restarted agent holds the migration. An agent that already rolled back answers
    /// the second with `Abandoned`.
    async fn tell_agent_abort(&mut self, record: &SourceRecord) {
        if let Some(link) = self.link.take() {
            link.abort(&self.reason).await;
        }
        let tell = control::resolve(&record.to, self.auth, &record.migration_id, false);
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(10), tell).await {
            info!(error = %e, "could not tell the agent to roll back; it will on its own unless its destination loaded the whole VM");
        }
    }

    /// The migration is settled: its journal and its relays' socket directory go.
    fn forget(&self, record: &SourceRecord) {
        if let Some(tls) = &record.tls {
            tls.remove_files();
        }
        remove_files(&record.files);
        if let Err(e) = self.journal.remove() {
            warn!(path = %self.journal.path().display(), error = %e, "cannot remove the journal");
        }
    }
}

/// Removes a migration's other files (see [`SourceRecord::files`]); a missing one is fine.
pub fn remove_files(files: &[std::path::PathBuf]) {
    for file in files {
        match std::fs::remove_file(file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(file = %file.display(), error = %e, "cannot remove"),
        }
    }
}
