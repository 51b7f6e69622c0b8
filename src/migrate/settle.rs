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
//!   A destination that loaded the whole VM waits for that word (only the source knows its own
//!   migration failed): when the agent cannot be told, the journal stays, marked
//!   [`SourcePhase::Returned`], and `ferry recover` tells it later.
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
/// How long telling the agent to roll back may take. An unreachable agent fails sooner (the
/// connection has its own 10 s); one that is reached answers once its rollback is done, which
/// waits on its destination QEMU: a QEMU wedged in a cut incoming multifd stream costs the
/// agent's 15 s bound per call before it is killed (fault matrix: pre-switchover / SIGKILL
/// ferry migrate took more than 10 s), and an answer cut short reads as "not told".
const TELL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long QEMU may take to tear an ended migration down before its channels are yanked (it
/// normally takes milliseconds; see `SourceQemu::wait_ended_migration_torn_down`).
const TEARDOWN_PATIENCE: Duration = Duration::from_secs(5);
/// Pause between attempts to reach the agent.
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// Who has the VM once settled.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The source: running (or paused, as it was), with nothing of the migration left in it.
    Source {
        /// Why the destination did not take it, for the operator.
        why: String,
        /// What is still to do, when the journal stays: the agent was not told to roll back,
        /// or something of the migration could not be removed from the source QEMU.
        pending: Option<String>,
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
        if record.phase == SourcePhase::Returned {
            // The VM ran here since: whatever the source QEMU's status says now, it is not
            // handed over any more; only the clean-up and the agent's word are left.
            let tell = !record.agent_told;
            return self.back_to_source(&record, tell).await;
        }
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
    /// resume the guest if it ran before. What could not be done stays in the journal, marked
    /// [`SourcePhase::Returned`], for `ferry recover`.
    async fn back_to_source(mut self, record: &SourceRecord, tell_agent: bool) -> Outcome {
        let returned = record.phase == SourcePhase::Returned;
        let Some(qemu) = self.qemu else {
            let told = if tell_agent {
                self.tell_agent_abort(record).await
            } else {
                Ok(())
            };
            if returned {
                // It ran here after it was taken back and has quit since: the operator's doing.
                let mut rest = record.clone();
                rest.forget_qemu_state();
                let pending = self.keep_or_forget(rest, Vec::new(), told);
                return Outcome::Source {
                    why: self.reason.clone(),
                    pending,
                };
            }
            // Without its QEMU the source has nothing to resume; the destination never loaded
            // the VM (the agent would have taken it). Nothing is left to run.
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
        let mut rest = record.clone();
        if left.is_empty() {
            rest.jobs.clear();
        }
        // The capabilities and parameters go back only once QEMU has torn its migration down:
        // changed before, they can crash the source QEMU (see
        // `SourceQemu::wait_migration_torn_down`). If it does not within the bound, they stay
        // as they are and in the journal, for `ferry recover`: a setting left over is harmless,
        // a crashed source is the VM lost.
        let torn_down = match qemu
            .wait_ended_migration_torn_down(TEARDOWN_PATIENCE, CANCEL_TIMEOUT)
            .await
        {
            Ok(done) => done,
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "cannot tell whether the source QEMU tore its migration down");
                false
            }
        };
        if torn_down {
            rest.capabilities.clear();
            for capability in &record.capabilities {
                if let Err(e) = qemu.set_capability(capability, false).await {
                    warn!(%capability, error = %crate::error_chain(&e), "cannot turn a migration capability back off");
                    left.push(format!("capability {capability}"));
                    rest.capabilities.push(capability.clone());
                }
            }
            if let Some(parameters) = &record.parameters {
                match qemu.set_migration_parameters(parameters).await {
                    Ok(()) => rest.parameters = None,
                    Err(e) => {
                        warn!(error = %crate::error_chain(&e), "cannot restore the migration parameters");
                        left.push(format!("migration parameters {parameters}"));
                    }
                }
            }
        } else {
            warn!("the source QEMU has not torn its migration down; its migration settings stay as the migration left them");
            left.extend(
                record
                    .capabilities
                    .iter()
                    .map(|c| format!("capability {c}")),
            );
            if let Some(parameters) = &record.parameters {
                left.push(format!("migration parameters {parameters}"));
            }
        }
        let told = if tell_agent {
            self.tell_agent_abort(record).await
        } else {
            Ok(())
        };
        let mut why = self.reason.clone();
        // A guest the source took back earlier is the operator's since: it stays as it is.
        if record.resume && !returned {
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
        let pending = self.keep_or_forget(rest, left, told);
        Outcome::Source { why, pending }
    }

    /// After the source took the VM back: the journal goes if nothing is left to do, else it
    /// stays as `rest`, marked [`SourcePhase::Returned`] (never handed over from then on), and
    /// the returned line says what is left. Before the RAM phase the agent's word is not
    /// needed: a destination that never received the VM is rolled back by the agent itself.
    fn keep_or_forget(
        &self,
        mut rest: SourceRecord,
        left: Vec<String>,
        told: Result<(), String>,
    ) -> Option<String> {
        let needs_word = rest.phase >= SourcePhase::Ram && !rest.agent_told;
        let untold = told.err().filter(|_| needs_word).map(|e| {
            format!(
                "the agent at {} could not be told to roll back migration {} ({e}): a paused \
                 copy of the VM may stay there",
                rest.to, rest.migration_id
            )
        });
        if left.is_empty() && untold.is_none() {
            self.forget(&rest);
            return None;
        }
        rest.agent_told = untold.is_none();
        let mut pending: Vec<String> = untold.into_iter().collect();
        if !left.is_empty() {
            pending.push(format!("still in the source QEMU: {}", left.join(", ")));
        }
        rest.phase = SourcePhase::Returned;
        let kept = match self.journal.write(&rest) {
            Ok(()) => format!(
                "run `ferry recover --qmp SOCKET` to finish (the journal {} stays; if the \
                 agent's host is gone for good, remove that file)",
                self.journal.path().display()
            ),
            Err(e) => format!(
                "and the journal {} could not be updated ({e}): finish by hand",
                self.journal.path().display()
            ),
        };
        Some(format!("{}; {kept}", pending.join("; ")))
    }

    /// The agent rolls back by itself when its destination's stream breaks or its window
    /// passes, but not a destination that loaded the whole VM (only the source can say whether
    /// its own migration completed): that one waits for this word. So it is said on the
    /// driver's link and then once more on a fresh connection: the link may lead to an agent
    /// that was killed since (writing into a connection whose peer is gone can still succeed)
    /// while a restarted agent holds the migration. An agent that already rolled back answers
    /// the second with `Abandoned`.
    ///
    /// `Err` says why the agent could not be told (no answer on the fresh connection).
    async fn tell_agent_abort(&mut self, record: &SourceRecord) -> Result<(), String> {
        if let Some(link) = self.link.take() {
            link.abort(&self.reason).await;
        }
        let tell = control::resolve(&record.to, self.auth, &record.migration_id, false);
        match tokio::time::timeout(TELL_TIMEOUT, tell).await {
            // It answered: rolled back now, or earlier (or it refuses, which is its word).
            Ok(Ok(_) | Err(ControlError::Refused(_))) => Ok(()),
            Ok(Err(e)) => {
                info!(error = %e, "could not tell the agent to roll back");
                Err(e.to_string())
            }
            Err(_) => Err(format!("no answer within {} s", TELL_TIMEOUT.as_secs())),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn returned(to: &str, agent_told: bool) -> SourceRecord {
        SourceRecord {
            phase: SourcePhase::Returned,
            migration_id: "m1-0".into(),
            to: to.into(),
            jobs: Vec::new(),
            capabilities: Vec::new(),
            resume: true,
            qemu_pid: None,
            parameters: None,
            tls: None,
            files: Vec::new(),
            agent_told,
        }
    }

    async fn settle(journal: &Journal, record: SourceRecord) -> Outcome {
        let auth = control::AgentAuth::with_token(b"0123456789abcdef0123456789abcdef".to_vec());
        Settle {
            qemu: None,
            journal,
            auth: &auth,
            link: None,
            agent_wait: Duration::from_secs(1),
            reason: "an interrupted migration was recovered".into(),
            known: None,
        }
        .run(record)
        .await
    }

    /// A journal under `state` holding `record`.
    fn journaled(state: &std::path::Path, record: &SourceRecord) -> Journal {
        let journal = Journal::for_socket(state, std::path::Path::new("/run/vm/qmp"));
        journal.write(record).expect("write");
        journal
    }

    /// A port nobody listens on: the agent cannot be told.
    fn nobody() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        addr.to_string()
    }

    #[tokio::test]
    async fn a_returned_vm_is_never_handed_over_and_its_journal_waits_for_the_agent() {
        let state = tempfile::tempdir().expect("tempdir");
        let record = returned(&nobody(), false);
        let journal = journaled(state.path(), &record);
        // The source QEMU has quit since it took the VM back: without the `returned` mark this
        // record (phase `ram`, no QEMU) would ask the agent to start its copy.
        match settle(&journal, record.clone()).await {
            Outcome::Source {
                pending: Some(pending),
                ..
            } => {
                assert!(
                    pending.contains("could not be told to roll back migration m1-0"),
                    "{pending}"
                );
                assert!(pending.contains("ferry recover"), "{pending}");
            }
            other => panic!("expected the source with something pending: {other:?}"),
        }
        assert_eq!(journal.read().expect("read"), Some(record));
    }

    #[tokio::test]
    async fn a_returned_record_whose_agent_heard_it_is_forgotten() {
        let state = tempfile::tempdir().expect("tempdir");
        let record = returned(&nobody(), true);
        let journal = journaled(state.path(), &record);
        match settle(&journal, record).await {
            Outcome::Source { pending: None, .. } => {}
            other => panic!("expected the source, nothing pending: {other:?}"),
        }
        assert_eq!(journal.read().expect("read"), None);
    }
}
