//! `ferry migrate`: the source-side driver. It runs beside the VM's QEMU, drives the whole
//! migration through that QEMU's QMP socket, and talks to `ferry agent` on the destination.
//!
//! ```text
//!  phase            source QEMU (QMP)                 agent                    destination QEMU
//!  discover         query-status, query-block,
//!                   qom-get /machine, /proc/PID/cmdline
//!  negotiate        ─────── TLS, Hello/Challenge/Auth/Prepare ─►  preflight, images, NBD (TLS),
//!                                                             per-migration certificates
//!                   [journal: mirror]                        [journal: receiving]
//!                   NBD relay on tls/<tag>/nbd.sock (crate::tunnel; client key in memory)
//!                   ──────────── StartDestination ──────────►  [journal: started]
//!  mirror           blockdev-add nbd (unix nbd.sock,          spawn -incoming defer -S ─► late-block-activate,
//!                    discard: unmap)                            (while the disks copy)   return-path, migrate-
//!                   blockdev-mirror sync=full ══ relay ══ NBD (TLS) ══►  images          incoming unix:ram.sock
//!                                                             RAM listener (TLS) on IP:0
//!                   ... BLOCK_JOB_READY on every disk   ◄── DestinationReady{its port}
//!                   ────────────────── Synced ──────────────►  background fdatasync
//!  ram              [journal: ram] events, return-path,
//!                   pause-before-switchover, max-bandwidth,
//!                   multifd, tls-creds ""; RAM relay on ram.sock; migrate unix:ram.sock
//!                   ══ relay ═══════ RAM (TLS, per connection in order) ══► listener ══ unix ══►
//!                   ... status pre-switchover (guest stopped)
//!  switchover       block-job-cancel (final sync) ═══ last dirty blocks ═══► images
//!                   migrate-continue ... completed ◄─ return path ─ (incoming completed)
//!  finish (settle)  ───────────────────────── Commit ───────►  fdatasync images,
//!                                                             [journal: resuming] ──────► cont
//!                   blockdev-del nbd, quit ◄──── Running ─────  [journal: running], drop exports,
//!                                                             keys and RAM listener
//!                   [journal removed], relays stopped, tls/<tag>/ removed
//! ```
//!
//! With `--insecure` there are no relays: the nbd nodes connect to the agent's NBD port and the
//! source QEMU migrates to the destination QEMU's own port (`tcp:`), both in the clear.
//!
//! The migration is a value moving through [`PhaseName`]s. Before it changes anything in the
//! source QEMU it journals what it is about to create (see [`journal`]); every failure, and a
//! completed migration too, ends in [`settle`], which decides from the source QEMU's own
//! migration status (and, once that says `completed`, the agent's answer) which copy of the VM
//! lives on, and removes the rest:
//!
//! ```text
//!   discover ─► negotiate ─► [journal: mirror] ─► mirror ─► start-destination
//!      │            │                                │            │
//!      │            │        [journal: ram] ─► ram ─► switchover (pre-switchover, final sync,
//!      │            │                                │            migrate-continue)
//!      ▼            ▼                                ▼            ▼
//!   nothing to undo (the agent rolls back    settle: source QEMU status
//!   when the connection drops)                 not completed ─► source keeps the VM: cancel,
//!                                                               remove jobs/nodes/capabilities,
//!                                                               resume, agent rolls back
//!                                              completed ─► Commit ─► agent: Running ─► quit source
//!                                                                    agent: Abandoned ─► resume source
//!                                                                    no answer ─► paused, journal kept:
//!                                                                                 `ferry recover`
//! ```

pub mod control;
pub mod dry_run;
pub mod error;
pub mod hazards;
pub mod journal;
pub mod mirror;
pub mod prealloc;
pub mod report;
pub mod settle;
pub mod source;
pub mod tls;

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use control::{AgentLink, ControlError};
use error::at;
pub use error::{Failure, MigrateError};
use journal::{Journal, SourcePhase, SourceRecord};
use report::{DestinationInfo, DiskSize, PhaseTimes, Progress, Reporter, Summary};
use settle::{Outcome, Settle};
use source::SourceQemu;

use crate::protocol::{self, AgentMessage};
use crate::status::{MigrationInfo, MigrationStatus, WaitError};

/// What `ferry migrate` was asked to do.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The source QEMU's QMP socket.
    pub qmp_socket: PathBuf,
    /// The agent, `HOST:PORT`.
    pub to: String,
    /// The shared token and the control link's TLS.
    pub auth: control::AgentAuth,
    /// Whether the disks and RAM travel encrypted (false: `--insecure`).
    pub tls: bool,
    /// How long the disks may take to reach sync.
    pub mirror_timeout: Duration,
    /// How long the RAM may take to reach the switchover.
    pub ram_timeout: Duration,
    /// Start the mirrors in write-blocking mode (guaranteed convergence, slower guest writes).
    pub sync_writes: bool,
    /// Cap on each mirror's background copy, bytes per second (None: as fast as it goes).
    pub mirror_speed: Option<u64>,
    /// Cap on the RAM stream, bytes per second (None: as fast as the link goes; QEMU's own
    /// default would hold it at 128 MiB/s, and a big guest's RAM would take minutes).
    pub ram_speed: Option<u64>,
    /// The RAM stream's `downtime-limit` (None: QEMU's, 300 ms).
    pub max_downtime: Option<Duration>,
    /// RAM stream connections (multifd channels); 1: one stream, no multifd; None: chosen
    /// from the source QEMU's version, TLS and the cap ([`hazards::QemuBuild::channels`]).
    pub parallel: Option<u32>,
    /// When the agent preallocates the guest's RAM on the destination while the disks copy
    /// (see [`prealloc`]).
    pub prealloc_ram: prealloc::RamPrealloc,
    /// How long a mirror's remaining work may fail to shrink before it goes write-blocking.
    pub converge_after: Duration,
    /// Where the source journal lives.
    pub state_dir: PathBuf,
    /// How long to keep trying to reach the agent when the source QEMU completed and only the
    /// agent can confirm the hand-over.
    pub agent_wait: Duration,
    /// The ferry binary, run as the RAM keeper beside a multifd relay
    /// ([`crate::tunnel::keeper`]); None: no keeper.
    pub keeper: Option<PathBuf>,
}

impl MigrateOptions {
    /// Defaults for everything but the three required values.
    pub fn new(qmp_socket: PathBuf, to: String, auth: control::AgentAuth) -> Self {
        MigrateOptions {
            qmp_socket,
            to,
            auth,
            tls: true,
            mirror_timeout: Duration::from_secs(3600),
            ram_timeout: Duration::from_secs(1800),
            sync_writes: false,
            mirror_speed: None,
            ram_speed: None,
            max_downtime: None,
            parallel: None,
            prealloc_ram: prealloc::RamPrealloc::Auto,
            converge_after: Duration::from_secs(10),
            state_dir: PathBuf::from(journal::DEFAULT_STATE_DIR),
            agent_wait: Duration::from_secs(60),
            keeper: None,
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

/// How often `query-migrate` is polled while the RAM streams, and during the switchover.
const RAM_POLL: Duration = Duration::from_millis(250);
const SWITCH_POLL: Duration = Duration::from_millis(20);
const SWITCH_TIMEOUT: Duration = Duration::from_secs(120);
/// The migration capabilities ferry needs on the source: `events` (the pause at
/// pre-switchover is noticed at once), `pause-before-switchover` (the final disk sync happens
/// with the guest stopped) and `return-path` (the migration completes only once the destination
/// loaded the whole state, and fails, resuming the source, if it could not).
const CAPABILITIES: [&str; 3] = ["events", "pause-before-switchover", "return-path"];

/// ferry's `downtime-limit` when the operator gave none, in ms: QEMU stops the guest only once
/// it expects to send the rest of the RAM in this time. QEMU's own 300 ms lets it stop a guest
/// right after the first pass and send everything dirtied during that pass in the pause; at
/// 50 ms it sends that live in one more pass first, which halved STOP→RESUME in A/B runs
/// (BENCHMARKS.md, issue 12). A guest that does not get there soon gets QEMU's own limit back
/// (see [`RELAX_AFTER_SYNCS`]).
const DEFAULT_DOWNTIME_MS: u64 = 50;
/// Passes over the RAM after which ferry's default downtime limit gives way to the source
/// QEMU's own (normally 300 ms): a guest that rewrites more than 50 ms worth of RAM per pass
/// would never reach the switchover under the tighter one.
const RELAX_AFTER_SYNCS: u64 = 5;

/// The RAM stream's parameters: no bandwidth cap unless the operator set one (QEMU's default
/// of 128 MiB/s would make a big guest's RAM take minutes on a fast link), the downtime limit
/// given or, where the source QEMU handles it ([`hazards`]), ferry's default, the multifd
/// channels if more than one.
fn ram_parameters(opts: &MigrateOptions, tight_default: bool, channels: u32) -> serde_json::Value {
    let mut params = serde_json::json!({"max-bandwidth": opts.ram_speed.unwrap_or(0)});
    let limit = match opts.max_downtime {
        Some(limit) => Some(limit.as_millis() as u64),
        None => tight_default.then_some(DEFAULT_DOWNTIME_MS),
    };
    if let Some(limit) = limit {
        params["downtime-limit"] = serde_json::json!(limit);
    }
    if channels > 1 {
        params["multifd-channels"] = serde_json::json!(channels);
    }
    params
}

/// QEMU's NBD errors say only that a connection failed or closed; when ferry's relay could not
/// carry it to the agent at all, the relay's reason is the operator's error line.
fn explain_nbd(tunnel: Option<&crate::tunnel::Tunnel>, mut failure: Failure) -> Failure {
    if let Some(why) = tunnel.and_then(crate::tunnel::Tunnel::nbd_failure) {
        failure.error = MigrateError::NbdRelay(why);
    }
    failure
}

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
            error: f.line(),
            source_running: f.source_running,
        }),
    }
    result
}

/// Connects to the source QEMU's monitor, as a failure of `phase`.
async fn connect(opts: &MigrateOptions, phase: PhaseName) -> Result<SourceQemu, Failure> {
    let qmp = qmp::Qmp::connect_unix(&opts.qmp_socket)
        .await
        .map_err(source::ctx("connecting to its QMP socket"))
        .map_err(at(phase))?;
    Ok(SourceQemu::new(qmp))
}

/// Refuses settings the source QEMU is known to turn into a broken guest ([`hazards`]), before
/// anything is created.
async fn vet_settings(
    qemu: &SourceQemu,
    vm: &crate::vm::VmDescription,
    opts: &MigrateOptions,
) -> Result<hazards::QemuBuild, Failure> {
    let build = qemu.build().await.map_err(at(PhaseName::Discover))?;
    hazards::check_downtime(&build, opts.max_downtime).map_err(|e| {
        let mut failure = at(PhaseName::Discover)(source::DiscoverError::Unsupported(e));
        // Nothing was touched: the VM runs (or stays paused) as before.
        failure.source_running = vm.running;
        failure
    })?;
    Ok(build)
}

/// Refuses a VM whose QEMU still has a migration: running (another tool's), or failed and not
/// yet torn down by QEMU (then a bounded wait usually sees it go): ferry's settings and its
/// `migrate` would race that teardown (see [`SourceQemu::wait_migration_torn_down`]).
pub(crate) async fn no_migration_in_flight(
    qemu: &SourceQemu,
    vm: &crate::vm::VmDescription,
) -> Result<(), Failure> {
    let torn_down = qemu
        .wait_migration_torn_down(Duration::from_secs(10))
        .await
        .map_err(|e| at(PhaseName::Discover)(source::DiscoverError::Qmp(e)))?;
    if torn_down {
        return Ok(());
    }
    let mut failure = at(PhaseName::Discover)(source::DiscoverError::Unsupported(
        "the source QEMU has a migration in progress (or has not finished tearing one down after \
         10 s); nothing was changed: let it end, or stop it with `migrate_cancel`, then run ferry \
         again"
            .into(),
    ));
    // Nothing was touched: the VM runs (or stays paused) as before.
    failure.source_running = vm.running;
    Err(failure)
}

async fn run(
    opts: &MigrateOptions,
    reporter: &mut dyn Reporter,
    cancel: &CancellationToken,
) -> Result<Summary, Failure> {
    let started = Instant::now();
    let qemu = connect(opts, PhaseName::Discover).await?;
    let vm = qemu.discover().await.map_err(at(PhaseName::Discover))?;
    let journal = Journal::for_socket(&opts.state_dir, &opts.qmp_socket);
    let interrupted = journal.read().map_err(|source| MigrateError::Journal {
        path: journal.path().to_path_buf(),
        source,
    });
    if let Some(record) = interrupted.map_err(at(PhaseName::Discover))? {
        return Err(Failure::new(
            PhaseName::Discover,
            MigrateError::Interrupted {
                migration_id: record.migration_id,
                socket: opts.qmp_socket.clone(),
            },
        ));
    }
    no_migration_in_flight(&qemu, &vm).await?;
    let build = vet_settings(&qemu, &vm, opts).await?;
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let mut m = Migration::new(qemu, journal, started);
    m.tight_downtime = !build.low_downtime_corrupts();
    m.channels = channels(&build, opts);
    let forward = m.forward(opts, &vm, &tag, reporter, cancel).await;
    let Some(record) = m.record.take() else {
        // Nothing was created in the source QEMU; dropping the connection makes the agent roll
        // back whatever it prepared.
        let mut failure = forward
            .err()
            .unwrap_or_else(|| Failure::new(PhaseName::Negotiate, MigrateError::Cancelled));
        failure.source_running = m.source_running().await;
        return Err(failure);
    };
    let (reason, known) = match &forward {
        Ok(info) => ("completed".to_string(), Some(info.clone())),
        Err(f) => (format!("{}: {}", f.phase, f.line()), None),
    };
    let switch_start = Instant::now();
    let outcome = Settle {
        qemu: Some(&m.qemu),
        journal: &m.journal,
        auth: &opts.auth,
        link: m.link.take(),
        agent_wait: opts.agent_wait,
        reason,
        known,
    }
    .run(record)
    .await;
    match (forward, outcome) {
        (
            _,
            Outcome::Destination {
                running:
                    AgentMessage::Running {
                        pid,
                        qmp,
                        resumed_at_us,
                        allocated_bytes,
                    },
                info,
            },
        ) => {
            m.phases.switchover = m
                .phases
                .switchover
                .saturating_add(switch_start.elapsed().as_millis() as u64);
            let stop_us = m
                .stops
                .wait_for(|e| e.name == "STOP", Duration::from_millis(100))
                .await
                .ok()
                .map(|e| e.timestamp.as_micros());
            let info = info.unwrap_or_else(|| MigrationInfo::from_json(&serde_json::Value::Null));
            Ok(Summary {
                downtime_ms: info.downtime_ms,
                stop_to_resume_ms: match (stop_us, resumed_at_us) {
                    (Some(stop), Some(resume)) => Some(resume.saturating_sub(stop) as f64 / 1000.0),
                    _ => None,
                },
                total_ms: started.elapsed().as_millis() as u64,
                phases_ms: m.phases.clone(),
                disk_bytes: m.disk_bytes,
                ram_bytes: info.ram_transferred,
                destination_allocated_bytes: allocated_bytes,
                destination: DestinationInfo { pid, qmp },
                encrypted: m.encrypted,
            })
        }
        (Err(mut failure), Outcome::Source { pending, .. }) => {
            failure.source_running = m.source_running().await;
            Err(failure.with_pending(pending))
        }
        (Ok(_), Outcome::Source { why, pending }) => Err(Failure {
            phase: PhaseName::Finish,
            error: MigrateError::NotTaken(why),
            source_running: m.source_running().await,
        }
        .with_pending(pending)),
        (forward, Outcome::Undecided { why }) => {
            let phase = forward.err().map_or(PhaseName::Finish, |f| f.phase);
            Err(Failure::new(phase, MigrateError::Undecided(why)))
        }
        (_, Outcome::Destination { running, .. }) => Err(Failure::new(
            PhaseName::Finish,
            ControlError::Unexpected(running.kind().to_string()),
        )),
    }
}

/// The RAM stream's connections for this migration (the same rule for a dry run).
fn channels(build: &hazards::QemuBuild, opts: &MigrateOptions) -> u32 {
    build.channels(opts.parallel, opts.tls, opts.ram_speed.is_some())
}

/// What the agent is asked to prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ask {
    /// Storage and a destination QEMU (`Prepare`).
    Qemu,
    /// Storage only, for `xl migrate-receive` (`PrepareXl`).
    Xl,
}

async fn prepare(
    link: &mut AgentLink,
    vm: &crate::vm::VmDescription,
    tls: bool,
    ask: Ask,
) -> Result<(control::Prepared, Vec<protocol::ImageInfo>), ControlError> {
    match ask {
        Ask::Qemu => Ok((link.prepare(vm, tls).await?, Vec::new())),
        Ask::Xl => link.prepare_xl(vm, tls).await,
    }
}

/// The mirrors running, and what they need next.
pub(crate) struct Mirrors {
    /// The NBD nodes and jobs.
    pub jobs: Vec<mirror::MirrorJob>,
    /// What the journal holds.
    pub record: SourceRecord,
    /// The agent's host.
    pub host: String,
    /// Where each disk's image is on the agent's host (xl only).
    pub images: Vec<protocol::ImageInfo>,
    /// The source QEMU's events, subscribed before the first job started (none is missed).
    pub events: qmp::Events,
}

/// One migration on the source: what exists and the journal that names it.
pub(crate) struct Migration {
    pub(crate) qemu: SourceQemu,
    pub(crate) journal: Journal,
    /// What the journal holds (None until something is created in the source QEMU).
    pub(crate) record: Option<SourceRecord>,
    pub(crate) link: Option<AgentLink>,
    /// The relays of an encrypted migration (the streams are cut when it goes).
    pub(crate) tunnel: Option<crate::tunnel::Tunnel>,
    /// Subscribed before the migration, so the source's STOP event is not missed.
    stops: qmp::Events,
    phases: PhaseTimes,
    pub(crate) disk_bytes: u64,
    /// Whether the disks and RAM travel encrypted (known once the agent prepared).
    pub(crate) encrypted: bool,
    /// When the migration started (the negotiation's time is measured from it).
    started: Instant,
    /// Whether ferry's own downtime limit applies when the operator gave none (not on a source
    /// QEMU that a tight limit breaks, see [`hazards`]).
    pub(crate) tight_downtime: bool,
    /// RAM stream connections: the operator's `--parallel`, or the default for this source.
    pub(crate) channels: u32,
}

impl Migration {
    /// A migration of the VM behind `qemu`, journaled in `journal`, that began at `started`;
    /// nothing created yet.
    pub(crate) fn new(qemu: SourceQemu, journal: Journal, started: Instant) -> Migration {
        Migration {
            stops: qemu.events(),
            qemu,
            journal,
            record: None,
            link: None,
            tunnel: None,
            phases: PhaseTimes::default(),
            disk_bytes: 0,
            encrypted: false,
            started,
            tight_downtime: false,
            channels: 1,
        }
    }

    /// Journals `record` before acting on it: a failure to write stops the migration.
    pub(crate) fn journal(
        &mut self,
        record: SourceRecord,
        phase: PhaseName,
    ) -> Result<(), Failure> {
        self.journal.write(&record).map_err(|source| {
            Failure::new(
                phase,
                MigrateError::Journal {
                    path: self.journal.path().to_path_buf(),
                    source,
                },
            )
        })?;
        self.record = Some(record);
        Ok(())
    }

    pub(crate) async fn source_running(&self) -> bool {
        self.qemu
            .status()
            .await
            .map(|(running, _)| running)
            .unwrap_or(false)
    }

    /// Whether the destination preallocates the guest's RAM (`--preallocate-ram`; `auto`
    /// decides from the guest's RAM and the disks' data, see [`prealloc`]). A source that
    /// cannot report its RAM size gets no preallocation under `auto`: it is only a speed-up.
    async fn prealloc_ram(&self, opts: &MigrateOptions, vm: &crate::vm::VmDescription) -> bool {
        if opts.prealloc_ram != prealloc::RamPrealloc::Auto {
            return opts.prealloc_ram.decide(None);
        }
        let data = |d: &crate::vm::DiskDescription| d.allocated.unwrap_or(d.size);
        let estimate = match self.qemu.ram_size().await {
            Ok(ram_bytes) => Some(prealloc::Estimate {
                ram_bytes,
                disk_bytes: vm.disks.iter().map(data).fold(0, u64::saturating_add),
                largest_disk_bytes: vm.disks.iter().map(data).max().unwrap_or(0),
                mirror_speed: opts.mirror_speed,
            }),
            Err(e) => {
                tracing::debug!(error = %crate::error_chain(&e), "no RAM size; not preallocating");
                None
            }
        };
        let decided = opts.prealloc_ram.decide(estimate);
        if let Some(e) = estimate {
            tracing::debug!(
                mirror_s = e.mirror_s(),
                prealloc_s = e.prealloc_s(),
                decided,
                "preallocate the destination's RAM?"
            );
        }
        decided
    }

    /// Drives the migration up to the source QEMU's `completed` (its final `query-migrate`).
    /// Whatever this returns, the caller settles it.
    async fn forward(
        &mut self,
        opts: &MigrateOptions,
        vm: &crate::vm::VmDescription,
        tag: &str,
        reporter: &mut dyn Reporter,
        cancel: &CancellationToken,
    ) -> Result<MigrationInfo, Failure> {
        let mirror_start = Instant::now();
        let Mirrors {
            jobs,
            mut record,
            host,
            mut events,
            ..
        } = self
            .start_mirrors(opts, vm, tag, reporter, cancel, Ask::Qemu)
            .await?;
        let fail_mirror = at::<MigrateError>(PhaseName::Mirror);
        let interrupted = |phase| Failure::new(phase, MigrateError::Cancelled);
        // The destination QEMU starts while the disks copy: off the critical path. (Asked once
        // the mirrors run, so that a destination that cannot start is reported as such, not
        // as the NBD connections its rollback closes.)
        let prealloc_ram = self.prealloc_ram(opts, vm).await;
        let link = self
            .link
            .as_mut()
            .ok_or_else(|| fail_mirror(ControlError::Lost("no connection".into()).into()))?;
        link.start_destination(self.channels, prealloc_ram)
            .await
            .map_err(at::<ControlError>(PhaseName::StartDestination))?;
        self.disk_bytes =
            mirror::wait_ready(&self.qemu, &jobs, &mut events, reporter, cancel, link, opts)
                .await
                .map_err(|f| explain_nbd(self.tunnel.as_ref(), f))?;
        self.phases.mirror = mirror_start.elapsed().as_millis() as u64;

        // Destination QEMU and the RAM.
        let ram_start = Instant::now();
        link.send(&protocol::SourceMessage::Synced)
            .await
            .map_err(at::<ControlError>(PhaseName::StartDestination))?;
        let port = tokio::select! {
            _ = cancel.cancelled() => return Err(interrupted(PhaseName::StartDestination)),
            port = link.destination_ready() => port.map_err(at::<ControlError>(PhaseName::StartDestination))?,
        };
        let ram_fail = at::<source::SourceError>(PhaseName::Ram);
        let mut capabilities = CAPABILITIES.to_vec();
        if self.channels > 1 {
            capabilities.push("multifd");
        }
        record.capabilities = self
            .qemu
            .capabilities_off(&capabilities)
            .await
            .map_err(&ram_fail)?;
        let parameters = ram_parameters(opts, self.tight_downtime, self.channels);
        let names: Vec<&str> = parameters
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        record.parameters = Some(
            self.qemu
                .migration_parameters(&names)
                .await
                .map_err(&ram_fail)?,
        );
        record.phase = SourcePhase::Ram;
        self.journal(record.clone(), PhaseName::Ram)?;
        for capability in &record.capabilities {
            self.qemu
                .set_capability(capability, true)
                .await
                .map_err(&ram_fail)?;
        }
        self.qemu
            .set_migration_parameters(&parameters)
            .await
            .map_err(&ram_fail)?;
        crate::faults::hold("source-ram").await;
        self.qemu.clear_migration_tls().await.map_err(&ram_fail)?;
        let to = match self.tunnel.as_mut() {
            Some(tunnel) => source::Endpoint::Unix(
                tunnel
                    .ram(port, crate::tunnel::ram_connections(self.channels))
                    .map_err(|e| at::<MigrateError>(PhaseName::Ram)(e.into()))?,
            ),
            None => source::Endpoint::Tcp {
                host: host.clone(),
                port,
            },
        };
        self.qemu.migrate(&to).await.map_err(&ram_fail)?;
        if let Err(mut failure) = self
            .wait_pre_switchover(opts, &mut events, reporter, cancel)
            .await
        {
            // QEMU's own error is only "connection closed"; the relay knows why.
            if let Some(why) = self.tunnel.as_ref().and_then(|t| t.ram_failure()) {
                failure.error = MigrateError::RamRelay(why);
            }
            return Err(failure);
        }
        self.phases.ram = ram_start.elapsed().as_millis() as u64;

        // Switchover: the guest is stopped from here until it resumes on the destination.
        let switch_start = Instant::now();
        reporter.report(&Progress::Switchover);
        crate::faults::hold("source-pre-switchover").await;
        let switch_fail = at::<MigrateError>(PhaseName::Switchover);
        mirror::final_sync(&self.qemu, &jobs, &mut events, SWITCH_TIMEOUT).await?;
        // A RAM connection already cut (destination QEMU or agent gone, link down): cancelling
        // at pre-switchover is clean; continuing would make QEMU find it out mid-switchover, which
        // its multifd threads do not always survive (see `crate::tunnel::ram`).
        if let Some(why) = self.tunnel.as_ref().and_then(|t| t.ram_failure()) {
            return Err(switch_fail(MigrateError::RamRelay(why)));
        }
        self.qemu
            .migrate_continue()
            .await
            .map_err(|e| switch_fail(e.into()))?;
        crate::faults::hold("source-continued").await;
        let info = self
            .wait_final(&mut events)
            .await
            .map_err(|e| switch_fail(e.into()))?;
        self.phases.switchover = switch_start.elapsed().as_millis() as u64;
        if info.status != MigrationStatus::Completed {
            let why = format!("{} at the switchover", info.why());
            return Err(switch_fail(MigrateError::Migration {
                status: info.status,
                why,
            }));
        }
        crate::faults::hold("source-completed").await;
        Ok(info)
    }

    /// Everything up to running mirrors: the agent link, its storage, the journal, the TLS
    /// object and the NBD nodes and mirror jobs (shared by `ferry migrate` and
    /// `ferry xl migrate`, which differ in what follows: QEMU's RAM migration, or xl's stream).
    pub(crate) async fn start_mirrors(
        &mut self,
        opts: &MigrateOptions,
        vm: &crate::vm::VmDescription,
        tag: &str,
        reporter: &mut dyn Reporter,
        cancel: &CancellationToken,
        ask: Ask,
    ) -> Result<Mirrors, Failure> {
        let negotiate = at::<ControlError>(PhaseName::Negotiate);
        let interrupted = |phase| Failure::new(phase, MigrateError::Cancelled);
        let link = tokio::select! {
            _ = cancel.cancelled() => return Err(interrupted(PhaseName::Negotiate)),
            link = AgentLink::connect(&opts.to, &opts.auth) => link.map_err(&negotiate)?,
        };
        let link = self.link.insert(link);
        let (
            control::Prepared {
                migration_id,
                nbd_port,
                exports,
                tls: bundle,
            },
            images,
        ) = tokio::select! {
            _ = cancel.cancelled() => return Err(interrupted(PhaseName::Negotiate)),
            prepared = prepare(link, vm, opts.tls, ask) => prepared.map_err(&negotiate)?,
        };
        let host = link.host.clone();
        let link_local = link.local_ip;
        info!(%migration_id, nbd_port, "agent prepared storage");
        reporter.report(&Progress::Prepared {
            migration_id: migration_id.clone(),
            disks: vm
                .disks
                .iter()
                .map(|d| DiskSize {
                    disk: d.name.clone(),
                    size: d.size,
                })
                .collect(),
        });
        self.phases.negotiation = self.started.elapsed().as_millis() as u64;

        // Mirror every disk.
        let fail_mirror = at::<MigrateError>(PhaseName::Mirror);
        let jobs = mirror::plan(&vm.disks, tag);
        let record = SourceRecord {
            phase: SourcePhase::Mirror,
            migration_id,
            to: opts.to.clone(),
            jobs: jobs.clone(),
            capabilities: Vec::new(),
            resume: vm.running,
            qemu_pid: self.qemu.pid(),
            parameters: None,
            tls: bundle
                .as_ref()
                .map(|_| tls::SourceTls::plan(&opts.state_dir, tag)),
            files: Vec::new(),
            agent_told: false,
        };
        self.journal(record.clone(), PhaseName::Mirror)?;
        self.encrypted = record.tls.is_some();
        // Encrypted: the nodes connect to the relay's socket, which carries them over TLS.
        let server = match (&record.tls, &bundle) {
            (Some(tls), Some(bundle)) => {
                tls.create()
                    .map_err(|e| fail_mirror(MigrateError::Tls(e)))?;
                let mut tunnel = crate::tunnel::Tunnel::new(&tls.dir, bundle, &host)
                    .map_err(|e| fail_mirror(e.into()))?
                    .from_address(link_local);
                if let Some(program) = &opts.keeper {
                    tunnel = tunnel.with_keeper(program.clone());
                }
                let path = tunnel.nbd(nbd_port).map_err(|e| fail_mirror(e.into()))?;
                self.tunnel = Some(tunnel);
                source::Endpoint::Unix(path)
            }
            _ => source::Endpoint::Tcp {
                host: host.clone(),
                port: nbd_port,
            },
        };
        let events = self.qemu.events();
        for job in &jobs {
            let no_export = || {
                fail_mirror(MigrateError::NoExport {
                    disk: job.disk.clone(),
                })
            };
            let export = exports
                .iter()
                .find(|x| x.disk == job.disk)
                .ok_or_else(no_export)?;
            self.qemu
                .add_nbd_target(&job.node, &server, &export.export)
                .await
                .map_err(|e| explain_nbd(self.tunnel.as_ref(), fail_mirror(e.into())))?;
            let disk = vm
                .disks
                .iter()
                .find(|d| d.name == job.disk)
                .ok_or_else(no_export)?;
            self.qemu
                .start_mirror(
                    &job.job,
                    disk,
                    &job.node,
                    opts.sync_writes,
                    opts.mirror_speed,
                )
                .await
                .map_err(|e| fail_mirror(e.into()))?;
        }
        Ok(Mirrors {
            jobs,
            record,
            host,
            images,
            events,
        })
    }

    /// Waits for the migration's final status after `migrate-continue`, the guest paused: woken
    /// by QEMU's `MIGRATION` event, with a poll as the fallback.
    async fn wait_final(&self, events: &mut qmp::Events) -> Result<MigrationInfo, WaitError> {
        let deadline = Instant::now() + SWITCH_TIMEOUT;
        loop {
            let info = self.qemu.query_migrate().await.map_err(|e| e.source)?;
            if info.status.is_final() {
                return Ok(info);
            }
            if Instant::now() >= deadline {
                return Err(WaitError::Timeout {
                    last: info.status,
                    secs: SWITCH_TIMEOUT.as_secs(),
                });
            }
            let _ = events
                .wait_for(|e| e.name == "MIGRATION", SWITCH_POLL)
                .await;
        }
    }

    async fn wait_pre_switchover(
        &mut self,
        opts: &MigrateOptions,
        events: &mut qmp::Events,
        reporter: &mut dyn Reporter,
        cancel: &CancellationToken,
    ) -> Result<(), Failure> {
        let fail = at::<MigrateError>(PhaseName::Ram);
        let deadline = Instant::now() + opts.ram_timeout;
        let mut tick = tokio::time::interval(RAM_POLL);
        // ferry's own default limit, relaxed to the source's own once the RAM does not converge
        // under it; one the operator chose stays.
        let mut relax = match opts.max_downtime {
            Some(_) => None,
            None if !self.tight_downtime => None,
            None => self
                .record
                .as_ref()
                .and_then(|r| r.parameters.as_ref())
                .and_then(|p| p.get("downtime-limit"))
                .cloned(),
        };
        loop {
            let link = self
                .link
                .as_mut()
                .ok_or_else(|| fail(ControlError::Lost("no connection".into()).into()))?;
            tokio::select! {
                _ = cancel.cancelled() => return Err(fail(MigrateError::Cancelled)),
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(fail(MigrateError::RamTimeout { secs: opts.ram_timeout.as_secs() }));
                }
                msg = link.recv() => {
                    let error = msg.err().unwrap_or_else(|| ControlError::Unexpected("message out of turn".into()));
                    return Err(fail(error.into()));
                }
                // The guest is already stopped at pre-switchover: react to the event at once
                // rather than at the next poll.
                event = events.next() => {
                    let event = event.map_err(|e| fail(MigrateError::SourceEvents(e)))?;
                    if event.name == "MIGRATION" && event.data.get("status").and_then(serde_json::Value::as_str) == Some("pre-switchover") {
                        return Ok(());
                    }
                }
                _ = tick.tick() => {
                    let info = self.qemu.query_migrate().await.map_err(|e| fail(e.into()))?;
                    reporter.report(&Progress::Ram {
                        status: info.status.to_string(),
                        transferred: info.ram_transferred,
                        remaining: info.ram_remaining,
                        total: info.ram_total,
                    });
                    if info.dirty_syncs >= RELAX_AFTER_SYNCS {
                        if let Some(own) = relax.take() {
                            info!(passes = info.dirty_syncs, limit = %own, "the RAM does not converge under ferry's downtime limit; back to the source QEMU's own");
                            self.qemu
                                .set_migration_parameters(&serde_json::json!({"downtime-limit": own}))
                                .await
                                .map_err(|e| fail(e.into()))?;
                        }
                    }
                    match info.status {
                        MigrationStatus::PreSwitchover => return Ok(()),
                        MigrationStatus::Failed | MigrationStatus::Cancelled | MigrationStatus::Cancelling => {
                            let why = info.why().to_string();
                            return Err(fail(MigrateError::Migration { status: info.status, why }));
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// What `ferry recover` did.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovered {
    /// The interrupted migration.
    pub migration_id: String,
    /// Who has the VM now.
    pub outcome: Outcome,
}

/// Settles an interrupted migration of the VM behind `opts.qmp_socket` from its journal:
/// `Ok(None)` when there is none. `to` overrides the journaled agent address.
pub async fn recover(opts: &MigrateOptions, to: Option<&str>) -> Result<Option<Recovered>, String> {
    let journal = Journal::for_socket(&opts.state_dir, &opts.qmp_socket);
    let mut record = match journal.read() {
        Ok(Some(record)) => record,
        Ok(None) => return Ok(None),
        Err(e) => {
            return Err(format!(
                "cannot read the journal {}: {e}",
                journal.path().display()
            ))
        }
    };
    if let Some(to) = to {
        record.to = to.to_string();
    }
    // Only the agent's word is left of a returned migration with nothing in its QEMU: the
    // monitor (perhaps busy with another client) is not needed.
    let agent_only = record.phase == SourcePhase::Returned && !record.names_qemu_state();
    let mut qemu = if agent_only {
        None
    } else {
        match connect(opts, PhaseName::Discover).await {
            Ok(qemu) => Some(qemu),
            Err(_) if !record.qemu_pid.is_some_and(pid_exists) => None,
            Err(f) => {
                return Err(format!(
                    "cannot reach the source QEMU ({}); nothing was changed: is another QMP \
                     client connected to {}?",
                    f.line(),
                    opts.qmp_socket.display()
                ))
            }
        }
    };
    let restarted = match (&qemu, record.qemu_pid) {
        (Some(q), Some(pid)) => q.pid().is_some_and(|p| p != pid),
        _ => false,
    };
    let mut reason = "an interrupted migration was recovered".to_string();
    if restarted {
        // The QEMU behind the socket is not the one that migrated: whatever the old one did, this
        // one owns its VM now, the old one's nodes and jobs went with it, and the destination
        // must not start. Only the agent is left to tell.
        record.phase = SourcePhase::Returned;
        record.forget_qemu_state();
        qemu = None;
        reason = "the source QEMU was restarted since".into();
    } else if record.phase == SourcePhase::Returned {
        reason = "the source took the VM back earlier".into();
    }
    let migration_id = record.migration_id.clone();
    let outcome = Settle {
        qemu: qemu.as_ref(),
        journal: &journal,
        auth: &opts.auth,
        link: None,
        agent_wait: opts.agent_wait,
        reason,
        known: None,
    }
    .run(record)
    .await;
    Ok(Some(Recovered {
        migration_id,
        outcome,
    }))
}

fn pid_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
