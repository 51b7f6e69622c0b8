//! The disk phase: one NBD target node and one `blockdev-mirror` job per disk, then wait until
//! every job is READY (in sync, copying new guest writes as they happen).
//!
//! Convergence: a guest that writes faster than the network can keep a background mirror from
//! ever becoming READY. When the remaining work has not shrunk for `--converge-after` (10 s by
//! default, [`MigrateOptions::converge_after`]), the job is
//! switched to write-blocking mode (`block-job-change`, QEMU 9.1+): guest writes then complete
//! only once they reached the destination, which bounds the backlog. On older QEMU the switch is
//! refused and ferry keeps waiting until the `--mirror-timeout`; `--sync-writes` starts every
//! job in write-blocking mode from the beginning instead.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::control::{AgentLink, ControlError};
use super::error::{Failure, MigrateError};
use super::report::{Progress, Reporter};
use super::source::SourceQemu;
use super::{MigrateOptions, PhaseName};
use crate::vm::DiskDescription;

/// How often job progress is polled and reported.
const POLL: Duration = Duration::from_millis(250);

/// One disk's mirror.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MirrorJob {
    /// The disk.
    pub disk: String,
    /// QEMU job id.
    pub job: String,
    /// The NBD target node on the source QEMU.
    pub node: String,
}

/// Names for the nodes and jobs of one migration: unique per migration, so two ferry runs (or a
/// leftover of a killed one) never collide.
pub fn plan(disks: &[DiskDescription], tag: &str) -> Vec<MirrorJob> {
    disks
        .iter()
        .enumerate()
        .map(|(i, d)| MirrorJob {
            disk: d.name.clone(),
            job: format!("ferry-{tag}-mirror{i}"),
            node: format!("ferry-{tag}-nbd{i}"),
        })
        .collect()
}

/// Per-job convergence tracking.
struct Tracker {
    window: Duration,
    best_remaining: u64,
    since: Instant,
    write_blocking: bool,
}

/// How long a failed mirror waits for the agent's explanation (see [`wait_ready`]).
const AGENT_EXPLAINS: Duration = Duration::from_secs(1);

/// The failure for an agent that ended the migration while the disks copied: a refusal before
/// its `DestinationReady` means the destination QEMU did not start, which is what the operator
/// must hear.
fn agent_failure(agent: &AgentLink, error: ControlError) -> Failure {
    let phase = if agent.awaiting_destination() && matches!(error, ControlError::Refused(_)) {
        PhaseName::StartDestination
    } else {
        PhaseName::Mirror
    };
    Failure::new(phase, MigrateError::from(error))
}

/// Waits for every job to be READY, reporting progress (the agent's `DestinationReady` may
/// arrive meanwhile: the link keeps it). Fails on a job error, a cancelled token, the timeout,
/// or any other message or a hang-up from the agent.
pub async fn wait_ready(
    qemu: &SourceQemu,
    jobs: &[MirrorJob],
    events: &mut qmp::Events,
    reporter: &mut dyn Reporter,
    cancel: &CancellationToken,
    agent: &mut AgentLink,
    opts: &MigrateOptions,
) -> Result<u64, Failure> {
    let (timeout, sync_writes) = (opts.mirror_timeout, opts.sync_writes);
    let fail = |e: MigrateError| Failure::new(PhaseName::Mirror, e);
    let deadline = Instant::now() + timeout;
    let mut ready: HashMap<String, bool> = jobs.iter().map(|j| (j.job.clone(), false)).collect();
    let mut trackers: HashMap<String, Tracker> = jobs
        .iter()
        .map(|j| {
            (
                j.job.clone(),
                Tracker {
                    best_remaining: u64::MAX,
                    since: Instant::now(),
                    write_blocking: sync_writes,
                    window: opts.converge_after,
                },
            )
        })
        .collect();
    let mut tick = tokio::time::interval(POLL);
    loop {
        if ready.values().all(|r| *r) {
            // A job may become READY before the first poll: read the final offsets once more.
            let mut copied = 0u64;
            if let Ok(list) = qemu.block_jobs().await {
                copied = list
                    .iter()
                    .filter(|j| jobs.iter().any(|job| job.job == j.id))
                    .fold(0, |sum, j| sum.saturating_add(j.offset));
            }
            return Ok(copied);
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(fail(MigrateError::Cancelled)),
            error = agent.watch() => return Err(agent_failure(agent, error)),
            _ = tokio::time::sleep_until(deadline) => {
                let waiting: Vec<&str> = jobs.iter().filter(|j| !ready[&j.job]).map(|j| j.disk.as_str()).collect();
                return Err(fail(MigrateError::MirrorTimeout { disks: waiting.join(", "), secs: timeout.as_secs() }));
            }
            event = events.next() => {
                let event = event.map_err(|e| fail(MigrateError::SourceEvents(e)))?;
                let job_id = event.data.get("device").and_then(Value::as_str).unwrap_or("");
                let Some(job) = jobs.iter().find(|j| j.job == job_id) else { continue };
                match event.name.as_str() {
                    "BLOCK_JOB_READY" if !ready.insert(job.job.clone(), true).unwrap_or(true) => {
                        reporter.report(&Progress::MirrorReady { disk: job.disk.clone() });
                    }
                    "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => {
                        // An agent that gives up (its destination QEMU failed to start) says why
                        // and then closes the exports, which fails the mirror: its reason, not
                        // the I/O error it caused, is what the operator must hear.
                        if let Ok(error) = tokio::time::timeout(AGENT_EXPLAINS, agent.watch()).await {
                            return Err(agent_failure(agent, error));
                        }
                        let why = event.data.get("error").and_then(Value::as_str).unwrap_or("the job ended early").to_string();
                        return Err(fail(MigrateError::Mirror { disk: job.disk.clone(), why }));
                    }
                    "BLOCK_JOB_ERROR" => {
                        let op = event.data.get("operation").and_then(Value::as_str).unwrap_or("I/O");
                        warn!(disk = %job.disk, op, "mirror I/O error");
                    }
                    _ => {}
                }
            }
            _ = tick.tick() => {
                let list = qemu.block_jobs().await.map_err(|e| fail(e.into()))?;
                for job in jobs {
                    let Some(info) = list.iter().find(|j| j.id == job.job) else {
                        return Err(fail(MigrateError::Mirror { disk: job.disk.clone(), why: "the job disappeared".into() }));
                    };
                    reporter.report(&Progress::Mirror { disk: job.disk.clone(), done: info.offset, total: info.len });
                    if info.ready && !ready[&job.job] {
                        ready.insert(job.job.clone(), true);
                        reporter.report(&Progress::MirrorReady { disk: job.disk.clone() });
                    }
                    if let Some(t) = trackers.get_mut(&job.job) {
                        converge(qemu, job, t, info.remaining(), ready[&job.job], reporter).await;
                    }
                }
            }
        }
    }
}

async fn converge(
    qemu: &SourceQemu,
    job: &MirrorJob,
    t: &mut Tracker,
    remaining: u64,
    ready: bool,
    reporter: &mut dyn Reporter,
) {
    if ready || t.write_blocking {
        return;
    }
    if remaining < t.best_remaining {
        t.best_remaining = remaining;
        t.since = Instant::now();
        return;
    }
    if t.since.elapsed() < t.window {
        return;
    }
    // Not converging. Whether or not QEMU can switch, try only once.
    t.write_blocking = true;
    match qemu.make_write_blocking(&job.job).await {
        Ok(()) => {
            info!(disk = %job.disk, "mirror switched to write-blocking");
            reporter.report(&Progress::MirrorWriteBlocking {
                disk: job.disk.clone(),
            });
        }
        Err(e) => {
            warn!(disk = %job.disk, error = %crate::error_chain(&e), "cannot switch mirror to write-blocking")
        }
    }
}

/// At pre-switchover (guest stopped): soft-cancel every READY job, which copies what is still
/// dirty and completes the job without pivoting; wait until each has completed.
pub async fn final_sync(
    qemu: &SourceQemu,
    jobs: &[MirrorJob],
    events: &mut qmp::Events,
    timeout: Duration,
) -> Result<(), Failure> {
    let fail = |e: MigrateError| Failure::new(PhaseName::Switchover, e);
    for job in jobs {
        qemu.cancel_job(&job.job, false)
            .await
            .map_err(|e| fail(e.into()))?;
    }
    let mut pending: Vec<&MirrorJob> = jobs.iter().collect();
    let deadline = Instant::now() + timeout;
    while !pending.is_empty() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let event = events
            .wait_for(
                |e| e.name == "BLOCK_JOB_COMPLETED" || e.name == "BLOCK_JOB_CANCELLED",
                remaining,
            )
            .await
            .map_err(|e| fail(MigrateError::FinalSyncWait(e)))?;
        let id = event
            .data
            .get("device")
            .and_then(Value::as_str)
            .unwrap_or("");
        let Some(pos) = pending.iter().position(|j| j.job == id) else {
            continue;
        };
        let why = match event.data.get("error").and_then(Value::as_str) {
            Some(err) => Some(err.to_string()),
            None if event.name == "BLOCK_JOB_CANCELLED" => Some("the job was cancelled".into()),
            None => None,
        };
        if let Some(why) = why {
            let disk = pending[pos].disk.clone();
            return Err(fail(MigrateError::FinalSync { disk, why }));
        }
        pending.remove(pos);
    }
    Ok(())
}

/// How long a force-cancelled mirror may take to end. Its writes in flight to the destination
/// must finish first: behind a cut link that is when TCP delivers or gives up on them.
const ABANDON_TIMEOUT: Duration = Duration::from_secs(180);

/// Rollback: abandon the jobs that still exist (force-cancel) and remove the NBD nodes that
/// still exist. Best effort: each step is tried whatever the previous one did. Returns what is
/// left (a job that would not end in time, and its node).
pub async fn abandon(qemu: &SourceQemu, jobs: &[MirrorJob]) -> Vec<String> {
    let ours = |list: &[crate::status::BlockJob]| -> Vec<MirrorJob> {
        jobs.iter()
            .filter(|job| list.iter().any(|j| j.id == job.job))
            .cloned()
            .collect()
    };
    let mut running = qemu
        .block_jobs()
        .await
        .map(|l| ours(&l))
        .unwrap_or_default();
    for job in &running {
        if let Err(e) = qemu.cancel_job(&job.job, true).await {
            warn!(disk = %job.disk, error = %crate::error_chain(&e), "cannot cancel mirror");
        }
    }
    let start = Instant::now();
    let mut said = false;
    while !running.is_empty() && start.elapsed() < ABANDON_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Ok(list) = qemu.block_jobs().await {
            running = ours(&list);
        }
        if !said && start.elapsed() > Duration::from_secs(10) && !running.is_empty() {
            let disks: Vec<&str> = running.iter().map(|j| j.disk.as_str()).collect();
            warn!(disks = %disks.join(", "), "waiting for cancelled mirrors to end: their writes to the destination are still in flight (is the network to it down?)");
            said = true;
        }
    }
    let mut left: Vec<String> = running
        .iter()
        .map(|j| format!("mirror job {}", j.job))
        .collect();
    left.extend(remove_nodes(qemu, jobs).await);
    left
}

/// Removes the NBD nodes of `jobs` that exist (after the switchover, or in a rollback); returns
/// the ones that could not be removed.
pub async fn remove_nodes(qemu: &SourceQemu, jobs: &[MirrorJob]) -> Vec<String> {
    // Deleting a node that is not there is an error: ask first (all of them if QEMU won't say).
    let existing = qemu.node_names().await.ok();
    let exists = |node: &String| existing.as_ref().is_none_or(|e| e.contains(node));
    let mut left = Vec::new();
    for job in jobs.iter().filter(|j| exists(&j.node)) {
        if let Err(e) = qemu.del_node(&job.node).await {
            warn!(node = %job.node, error = %crate::error_chain(&e), "cannot remove NBD node");
            left.push(format!("NBD node {}", job.node));
        }
    }
    left
}
