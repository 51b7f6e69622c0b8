//! `ferry migrate`: the source-side driver. It runs beside the VM's QEMU, drives the whole
//! migration through that QEMU's QMP socket, and talks to `ferry agent` on the destination.
//!
//! ```text
//!  phase            source QEMU (QMP)                 agent                    destination QEMU
//!  discover         query-status, query-block,
//!                   qom-get /machine, /proc/PID/cmdline
//!  negotiate        ─────────── Hello/Challenge/Auth/Prepare ──►  preflight, images, NBD
//!  mirror           blockdev-add nbd (discard: unmap)
//!                   blockdev-mirror sync=full ═══ NBD writes ═══►  images
//!                   ... BLOCK_JOB_READY on every disk
//!  start-destination ──────────── StartDestination ──────────►  spawn -incoming defer -S ─► late-block-activate
//!                                                                                         migrate-incoming tcp:IP:0
//!  ram              pause-before-switchover, migrate ═══ RAM ═════════════════════════════►
//!                   ... status pre-switchover (guest stopped)
//!  switchover       block-job-cancel (final sync) ═══ last dirty blocks ═══► images
//!                   migrate-continue ... completed            (incoming completed)
//!  finish           ───────────────────────── Switched ─────►  fdatasync images ────► cont
//!                   blockdev-del nbd, quit ◄──── Running ─────  drop exports
//! ```
//!
//! The migration is a value moving through [`PhaseName`]s; what a failure undoes depends only on
//! how far it got. Until the source QEMU reports `completed` the source owns the VM: a failure
//! cancels the jobs and the migration, removes the NBD nodes, tells the agent to roll back, and
//! resumes the guest if ferry paused it. From `completed` on the destination owns it: the source is
//! never resumed.

pub mod control;
pub mod mirror;
pub mod report;
pub mod source;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use control::AgentLink;
use mirror::MirrorJob;
use report::{DestinationInfo, DiskSize, PhaseTimes, Progress, Reporter, Summary};
use source::{InitialState, SourceQemu};

use crate::protocol::{AgentMessage, SourceMessage};

/// What `ferry migrate` was asked to do.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The source QEMU's QMP socket.
    pub qmp_socket: PathBuf,
    /// The agent, `HOST:PORT`.
    pub to: String,
    /// The shared token.
    pub token: Vec<u8>,
    /// How long the disks may take to reach sync.
    pub mirror_timeout: Duration,
    /// How long the RAM may take to reach the switchover.
    pub ram_timeout: Duration,
    /// Start the mirrors in write-blocking mode (guaranteed convergence, slower guest writes).
    pub sync_writes: bool,
    /// Cap on each mirror's background copy, bytes per second (None: as fast as it goes).
    pub mirror_speed: Option<u64>,
    /// How long a mirror's remaining work may fail to shrink before it goes write-blocking.
    pub converge_after: Duration,
}

impl MigrateOptions {
    /// Defaults for everything but the three required values.
    pub fn new(qmp_socket: PathBuf, to: String, token: Vec<u8>) -> Self {
        MigrateOptions {
            qmp_socket,
            to,
            token,
            mirror_timeout: Duration::from_secs(3600),
            ram_timeout: Duration::from_secs(1800),
            sync_writes: false,
            mirror_speed: None,
            converge_after: Duration::from_secs(10),
        }
    }
}

/// The phases of a migration, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PhaseName {
    /// Reading the VM from its QEMU.
    Discover,
    /// Handshake and storage preparation with the agent.
    Negotiate,
    /// Disks copying until in sync.
    Mirror,
    /// Destination QEMU starting.
    StartDestination,
    /// RAM copying until pre-switchover.
    Ram,
    /// Guest stopped: final disk sync, device state.
    Switchover,
    /// After `completed`: handing over to the destination.
    Finish,
}

impl std::fmt::Display for PhaseName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PhaseName::Discover => "discover",
            PhaseName::Negotiate => "negotiate",
            PhaseName::Mirror => "mirror",
            PhaseName::StartDestination => "start-destination",
            PhaseName::Ram => "ram",
            PhaseName::Switchover => "switchover",
            PhaseName::Finish => "finish",
        })
    }
}

/// A failed migration: the phase and one line of what went wrong.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{phase}: {error}")]
pub struct Failure {
    /// Where it failed.
    pub phase: PhaseName,
    /// What went wrong.
    pub error: String,
    /// Whether the source VM runs (filled in after the rollback).
    pub source_running: bool,
}

impl Failure {
    /// A failure in `phase`.
    pub fn new(phase: PhaseName, error: impl Into<String>) -> Self {
        Failure {
            phase,
            error: error.into(),
            source_running: false,
        }
    }
}

/// How often `query-migrate` is polled while the RAM streams, and during the switchover.
const RAM_POLL: Duration = Duration::from_millis(250);
const SWITCH_POLL: Duration = Duration::from_millis(5);
const SWITCH_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs a whole migration. On failure the rollback has already happened when this returns; the
/// last event reported is `Completed` or `Failed`.
pub async fn migrate(
    opts: &MigrateOptions,
    reporter: &mut dyn Reporter,
    cancel: &CancellationToken,
) -> Result<Summary, Failure> {
    let result = run(opts, reporter, cancel).await;
    match &result {
        Ok(summary) => reporter.report(&Progress::Completed(summary.clone())),
        Err(f) => reporter.report(&Progress::Failed {
            phase: f.phase.to_string(),
            error: f.error.clone(),
            source_running: f.source_running,
        }),
    }
    result
}

async fn run(
    opts: &MigrateOptions,
    reporter: &mut dyn Reporter,
    cancel: &CancellationToken,
) -> Result<Summary, Failure> {
    let started = Instant::now();
    let discover = |e: String| Failure::new(PhaseName::Discover, e);
    let qmp = qmp::Qmp::connect_unix(&opts.qmp_socket)
        .await
        .map_err(|e| discover(crate::error_chain(&e)))?;
    let qemu = SourceQemu { qmp };
    let (vm, initial) = qemu
        .discover()
        .await
        .map_err(|e| discover(crate::error_chain(&e)))?;
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let mut m = Migration {
        jobs: mirror::plan(&vm.disks, &tag),
        qemu,
        initial,
        link: None,
        nodes_added: Vec::new(),
        migration_started: false,
        capability_set: false,
        phases: PhaseTimes::default(),
    };
    match m.forward(opts, &vm, reporter, cancel, started).await {
        Ok(summary) => Ok(summary),
        Err(mut failure) => {
            if failure.phase < PhaseName::Finish {
                m.rollback(&failure.error).await;
            }
            failure.source_running = m
                .qemu
                .status()
                .await
                .map(|(running, _)| running)
                .unwrap_or(false);
            Err(failure)
        }
    }
}

/// One migration's state on the source: what exists and must be undone on failure.
struct Migration {
    qemu: SourceQemu,
    initial: InitialState,
    link: Option<AgentLink>,
    jobs: Vec<MirrorJob>,
    nodes_added: Vec<String>,
    migration_started: bool,
    capability_set: bool,
    phases: PhaseTimes,
}

impl Migration {
    async fn forward(
        &mut self,
        opts: &MigrateOptions,
        vm: &crate::vm::VmDescription,
        reporter: &mut dyn Reporter,
        cancel: &CancellationToken,
        started: Instant,
    ) -> Result<Summary, Failure> {
        let negotiate = |e: String| Failure::new(PhaseName::Negotiate, e);
        let interrupted = |phase| Failure::new(phase, "interrupted");
        let link = tokio::select! {
            _ = cancel.cancelled() => return Err(interrupted(PhaseName::Negotiate)),
            link = AgentLink::connect(&opts.to, &opts.token) => link.map_err(|e| negotiate(e.to_string()))?,
        };
        let link = self.link.insert(link);
        let (migration_id, nbd_port, exports) = tokio::select! {
            _ = cancel.cancelled() => return Err(interrupted(PhaseName::Negotiate)),
            prepared = link.prepare(vm) => prepared.map_err(|e| negotiate(e.to_string()))?,
        };
        info!(%migration_id, nbd_port, "agent prepared storage");
        reporter.report(&Progress::Prepared {
            migration_id,
            disks: vm
                .disks
                .iter()
                .map(|d| DiskSize {
                    disk: d.name.clone(),
                    size: d.size,
                })
                .collect(),
        });
        self.phases.negotiation = started.elapsed().as_millis() as u64;

        // Mirror every disk.
        let mirror_start = Instant::now();
        let mut events = self.qemu.qmp.events();
        let mut stops = self.qemu.qmp.events();
        let host = link.host.clone();
        let fail_mirror = |e: String| Failure::new(PhaseName::Mirror, e);
        for job in &self.jobs {
            let export = exports.iter().find(|x| x.disk == job.disk).ok_or_else(|| {
                fail_mirror(format!(
                    "the agent prepared no export for disk {}",
                    job.disk
                ))
            })?;
            self.qemu
                .add_nbd_target(&job.node, &host, nbd_port, &export.export)
                .await
                .map_err(|e| fail_mirror(crate::error_chain(&e)))?;
            self.nodes_added.push(job.node.clone());
            let disk = vm
                .disks
                .iter()
                .find(|d| d.name == job.disk)
                .ok_or_else(|| fail_mirror("disk list changed".into()))?;
            self.qemu
                .start_mirror(
                    &job.job,
                    disk,
                    &job.node,
                    opts.sync_writes,
                    opts.mirror_speed,
                )
                .await
                .map_err(|e| fail_mirror(crate::error_chain(&e)))?;
        }
        let link = self
            .link
            .as_mut()
            .ok_or_else(|| fail_mirror("lost the agent".into()))?;
        let disk_bytes = mirror::wait_ready(
            &self.qemu,
            &self.jobs,
            &mut events,
            reporter,
            cancel,
            link,
            opts,
        )
        .await?;
        self.phases.mirror = mirror_start.elapsed().as_millis() as u64;

        // Destination QEMU and the RAM.
        let ram_start = Instant::now();
        let start_fail = |e: String| Failure::new(PhaseName::StartDestination, e);
        let port = tokio::select! {
            _ = cancel.cancelled() => return Err(interrupted(PhaseName::StartDestination)),
            port = link.start_destination() => port.map_err(|e| start_fail(e.to_string()))?,
        };
        let ram_fail = |e: String| Failure::new(PhaseName::Ram, e);
        // `events` makes QEMU announce each status change (MIGRATION), so the pause at
        // pre-switchover is noticed at once instead of at the next progress poll.
        for capability in ["events", "pause-before-switchover"] {
            self.qemu
                .set_capability(capability, true)
                .await
                .map_err(|e| ram_fail(crate::error_chain(&e)))?;
            self.capability_set = true;
        }
        self.qemu
            .migrate(&host, port)
            .await
            .map_err(|e| ram_fail(crate::error_chain(&e)))?;
        self.migration_started = true;
        self.wait_pre_switchover(opts, &mut events, reporter, cancel)
            .await?;
        self.phases.ram = ram_start.elapsed().as_millis() as u64;

        // Switchover: the guest is stopped from here until it resumes on the destination.
        let switch_start = Instant::now();
        reporter.report(&Progress::Switchover);
        let switch_fail = |e: String| Failure::new(PhaseName::Switchover, e);
        mirror::final_sync(&self.qemu, &self.jobs, &mut events, SWITCH_TIMEOUT).await?;
        self.qemu
            .migrate_continue()
            .await
            .map_err(|e| switch_fail(crate::error_chain(&e)))?;
        let info = self.wait_completed().await?;

        // The destination owns the VM now. Nothing below may resume the source. The agent is told
        // first: the idle NBD nodes are removed once the guest runs again, off the pause.
        let finish_fail = |e: String| Failure::new(PhaseName::Finish, e);
        let link = self
            .link
            .as_mut()
            .ok_or_else(|| finish_fail("lost the agent".into()))?;
        let running = link.switched().await.map_err(|e| {
            finish_fail(format!(
                "{e}; the VM has switched over and the agent finishes it on its own (the source stays paused)"
            ))
        })?;
        self.phases.switchover = switch_start.elapsed().as_millis() as u64;
        for node in std::mem::take(&mut self.nodes_added) {
            if let Err(e) = self.qemu.del_node(&node).await {
                warn!(%node, error = %crate::error_chain(&e), "removing NBD node after switchover");
            }
        }
        let stop_us = stops
            .wait_for(|e| e.name == "STOP", Duration::from_millis(100))
            .await
            .ok()
            .map(|e| e.timestamp.as_micros());
        if let Err(e) = self.qemu.quit().await {
            warn!(error = %crate::error_chain(&e), "source QEMU did not quit");
        }
        let AgentMessage::Running {
            pid,
            qmp,
            resumed_at_us,
            allocated_bytes,
        } = running
        else {
            return Err(finish_fail("agent sent an unexpected reply".into()));
        };
        Ok(Summary {
            downtime_ms: info.get("downtime").and_then(Value::as_u64),
            stop_to_resume_ms: match (stop_us, resumed_at_us) {
                (Some(stop), Some(resume)) => Some((resume - stop) as f64 / 1000.0),
                _ => None,
            },
            total_ms: started.elapsed().as_millis() as u64,
            phases_ms: self.phases.clone(),
            disk_bytes,
            ram_bytes: info
                .get("ram")
                .and_then(|r| r.get("transferred"))
                .and_then(Value::as_u64)
                .unwrap_or(0),
            destination_allocated_bytes: allocated_bytes,
            destination: DestinationInfo { pid, qmp },
        })
    }

    async fn wait_pre_switchover(
        &mut self,
        opts: &MigrateOptions,
        events: &mut qmp::Events,
        reporter: &mut dyn Reporter,
        cancel: &CancellationToken,
    ) -> Result<(), Failure> {
        let fail = |e: String| Failure::new(PhaseName::Ram, e);
        let deadline = Instant::now() + opts.ram_timeout;
        let mut tick = tokio::time::interval(RAM_POLL);
        loop {
            let link = self
                .link
                .as_mut()
                .ok_or_else(|| fail("lost the agent".into()))?;
            tokio::select! {
                _ = cancel.cancelled() => return Err(fail("interrupted".into())),
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(fail(format!("RAM did not converge within {} s", opts.ram_timeout.as_secs())));
                }
                msg = link.recv() => {
                    return Err(fail(msg.map_or_else(|e| e.to_string(), |_| "the agent sent a message out of turn".into())));
                }
                // The guest is already stopped at pre-switchover: react to the event at once
                // rather than at the next poll.
                event = events.next() => {
                    let event = event.map_err(|e| fail(format!("source QEMU: {}", crate::error_chain(&e))))?;
                    if event.name == "MIGRATION" && event.data.get("status").and_then(Value::as_str) == Some("pre-switchover") {
                        return Ok(());
                    }
                }
                _ = tick.tick() => {
                    let info = self.qemu.query_migrate().await.map_err(|e| fail(crate::error_chain(&e)))?;
                    let status = info.get("status").and_then(Value::as_str).unwrap_or("").to_string();
                    let ram = info.get("ram");
                    let field = |k: &str| ram.and_then(|r| r.get(k)).and_then(Value::as_u64).unwrap_or(0);
                    reporter.report(&Progress::Ram {
                        status: status.clone(),
                        transferred: field("transferred"),
                        remaining: field("remaining"),
                        total: field("total"),
                    });
                    match status.as_str() {
                        "pre-switchover" => return Ok(()),
                        "failed" | "cancelled" | "cancelling" => {
                            let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                            return Err(fail(format!("RAM migration {status}: {why}")));
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    async fn wait_completed(&mut self) -> Result<Value, Failure> {
        let fail = |e: String| Failure::new(PhaseName::Switchover, e);
        let deadline = Instant::now() + SWITCH_TIMEOUT;
        loop {
            let info = self
                .qemu
                .query_migrate()
                .await
                .map_err(|e| fail(crate::error_chain(&e)))?;
            match info.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => return Ok(info),
                "failed" | "cancelled" => {
                    let why = info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(fail(format!("migration failed at the switchover: {why}")));
                }
                _ if Instant::now() >= deadline => {
                    return Err(fail("the switchover did not complete".into()))
                }
                _ => tokio::time::sleep(SWITCH_POLL).await,
            }
        }
    }

    /// Undo everything before the switchover. Each step runs whatever the others did.
    async fn rollback(&mut self, reason: &str) {
        warn!(%reason, "rolling back");
        if self.migration_started {
            if let Err(e) = self.qemu.migrate_cancel().await {
                warn!(error = %crate::error_chain(&e), "rollback: migrate_cancel");
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                match self.qemu.query_migrate().await {
                    Ok(info)
                        if !matches!(
                            info.get("status").and_then(Value::as_str),
                            Some("active" | "cancelling" | "pre-switchover" | "device" | "setup")
                        ) =>
                    {
                        break
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    Err(_) => break,
                }
            }
        }
        mirror::abandon(&self.qemu, &self.jobs, &self.nodes_added).await;
        self.nodes_added.clear();
        if self.capability_set {
            for capability in ["pause-before-switchover", "events"] {
                let _ = self.qemu.set_capability(capability, false).await;
            }
        }
        if let Some(mut link) = self.link.take() {
            // Wait for the agent to hang up: it has then killed the destination QEMU, so resuming
            // the source below can never make two copies run.
            if link
                .send(&SourceMessage::Abort {
                    reason: reason.to_string(),
                })
                .await
                .is_ok()
            {
                let _ = tokio::time::timeout(Duration::from_secs(15), async {
                    while link.recv().await.is_ok() {}
                })
                .await;
            }
        }
        if self.initial.running {
            if let Ok((false, state)) = self.qemu.status().await {
                info!(%state, "resuming the source guest");
                if let Err(e) = self.qemu.cont().await {
                    warn!(error = %crate::error_chain(&e), "rollback: cannot resume the source guest");
                }
            }
        }
    }
}
