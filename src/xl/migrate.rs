//! The driver of `ferry xl migrate`: mirrors a Xen domain's qdisk disks to the agent while the
//! guest runs, then runs `xl migrate` with ferry as its transport and holds the stream's END
//! record until every disk is final.
//!
//! ```text
//!  ferry xl migrate            device model (QMP)       agent                 xl (source)
//!  xl domid DOMAIN ───────────────────────────────────────────────────────────► domid
//!  qmp-libxl-<domid>: query-status, query-block (qdisk nodes <vdev>-<format>)
//!  PrepareXl, mirrors to READY (shared with ferry migrate) ─► images, NBD
//!  Synced ──────────────────────────────────────────────────►
//!  config with the agent's image paths; private socket
//!  spawn: xl migrate -s "ferry xl relay --via SOCK" -C CFG DOMAIN HOST ──────► sh -c relay
//!  ◄──────────────── relay: its argv (the migrate-receive options) ────────────┘
//!  XlReceive{options} ──────────────────────────────────────► xl migrate-receive
//!  stream mode: bytes both ways; the sender's parsed (stream.rs)
//!  ... first libxl record after the libxc stream: the guest is suspended and libxl is done
//!      with QMP (finish.rs, beside the stream) ...
//!    reconnect; device model still running (PV/PVH)? stop it (HVM: libxl stopped it)
//!    final sync of every mirror
//!    Final ─────────────────────────────────────────────────► flush, close exports
//!    NBD nodes removed; QMP released
//!  ... libxl END record seen: hold it until the final sync is done ...
//!    Barrier ───────────────────────────────────────────────► waits for the flush
//!    END ═══════════════════════════════════════════════════► receiver starts the domain
//!  "domain received" ◄══════════════════════════════════════
//!  before the go message: Go ───────────────────────────────► journal: the domain's images
//!  "cleared to unpause" ════════════════════════════════════► (point of no return)
//! ```
//!
//! Both directions are served by one loop, one chunk at a time: the receiver's side of xl's
//! protocol is a few messages of under a hundred bytes, so neither end can block the other.
//!
//! Before the go message every failure ends in [`Settle`]: the mirrors and nodes go, the agent
//! rolls back, the device model is resumed if ferry stopped it, and xl, whose transport broke,
//! resumes the domain on the source. After it the domain belongs to the destination; xl's own
//! report says whether it started there (if not, xl resumes it here, and ferry resumes the
//! device model it stopped).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::process::Child;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::stream::{Found, SenderStream};
use super::wire::{self, Chunk};
use crate::migrate::error::{Failure, MigrateError};
use crate::migrate::journal::Journal;
use crate::migrate::report::Reporter;
use crate::migrate::settle::{Outcome, Settle};
use crate::migrate::source::SourceQemu;
use crate::migrate::{mirror, Ask, MigrateOptions, Migration, PhaseName};
use crate::protocol::SourceMessage;

/// How long xl may take to exit once the stream ended.
const XL_EXIT_WAIT: Duration = Duration::from_secs(60);

/// What `ferry xl migrate` was asked to do.
#[derive(Debug, Clone)]
pub struct XlOptions {
    /// The agent link, storage and mirror settings; `qmp_socket` is found from the domain.
    pub base: MigrateOptions,
    /// The `xl` to run on this host.
    pub xl: PathBuf,
    /// Where libxl keeps the device models' QMP sockets (`/var/run/xen`).
    pub run_dir: PathBuf,
    /// The domain, by name or id.
    pub domain: String,
    /// The domain's config file (xl.cfg), rewritten for the destination and given to `-C`.
    pub config: PathBuf,
    /// Options passed on to `xl migrate` (`-e`, `-p`, `-D`, `--debug`, `-F`).
    pub xl_flags: Vec<String>,
    /// How to run the relay: this program and its `xl relay` words.
    pub relay: Vec<String>,
}

/// What a finished `ferry xl migrate` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct XlSummary {
    /// The agent's migration id.
    pub migration_id: String,
    /// Bytes the mirrors copied before READY.
    pub disk_bytes: u64,
    /// Whether ferry stopped the device model itself (PV/PVH: nothing else does).
    pub stopped_device_model: bool,
    /// The final sync of every mirror, guest stopped, in milliseconds.
    pub final_sync_ms: f64,
    /// How long the END record was held: stop (if ferry's), final sync, node removal, the
    /// agent's flush; what ferry adds to the guest's pause.
    pub end_held_ms: f64,
    /// When the disks were final (µs since the epoch): the destination may open them after.
    pub disks_final_at_us: u64,
    /// The whole run, in milliseconds.
    pub total_ms: u64,
}

pub(super) fn xl_err(phase: PhaseName, what: impl Into<String>) -> Failure {
    Failure::new(phase, MigrateError::Xl(what.into()))
}

/// Runs one `ferry xl migrate`. On failure the domain runs on the source and nothing of the
/// migration is left when this returns (unless the message says otherwise).
pub async fn migrate(
    opts: &XlOptions,
    reporter: &mut dyn Reporter,
    cancel: &CancellationToken,
) -> Result<XlSummary, Failure> {
    let started = Instant::now();
    let super::domain::Found {
        socket,
        qemu,
        vm,
        vdevs,
        config,
    } = super::domain::find(opts).await?;
    let mut base = opts.base.clone();
    base.qmp_socket = socket;

    let journal = Journal::for_socket(&base.state_dir, &base.qmp_socket);
    if let Ok(Some(record)) = journal.read() {
        return Err(Failure::new(
            PhaseName::Discover,
            MigrateError::Interrupted {
                migration_id: record.migration_id,
                socket: base.qmp_socket.clone(),
            },
        ));
    }
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let mut m = Migration::new(qemu, journal, started);
    let mut run = Run {
        opts,
        base: &base,
        tag,
        vdevs,
        config,
        relay_socket: None,
        config_file: None,
        xl: None,
        stopped: false,
        finisher: None,
        cleaner: None,
    };
    let mirrored = run.mirror(&mut m, &vm, reporter, cancel).await;
    let mirrors = match mirrored {
        Ok(mirrors) => mirrors,
        Err(failure) => {
            return Err(settle_on_source(
                failure,
                Some(m.qemu),
                &m.journal,
                m.record,
                m.link,
                &base,
            )
            .await)
        }
    };
    // libxl talks to the device model over this same socket (logdirty, stop, saving its state,
    // resume), and QEMU serves one client at a time: ferry lets go of it while xl runs and
    // comes back only while END is held and libxl is done with it.
    let Migration {
        qemu,
        journal,
        record,
        link,
        tunnel,
        disk_bytes,
        ..
    } = m;
    drop(qemu);
    let mut held = Held {
        journal,
        record,
        link,
        _tunnel: tunnel,
        disk_bytes,
    };
    let result = run.stream(&mut held, mirrors, cancel, started).await;
    run.cleanup_files();
    let (mut failure, went) = match result {
        Ok(summary) => return Ok(summary),
        Err((f, went)) => (f, went),
    };
    if went {
        // Past the point of no return: nothing of the migration is left in the device model (the
        // nodes went before END); the journal goes.
        held.forget();
        failure.source_running = source_running(&base.qmp_socket).await;
        return Err(failure);
    }
    if let Some(finisher) = run.finisher.take() {
        // Its QMP connection must be gone before the settlement resumes the domain.
        finisher.abort();
        let _ = finisher.await;
    }
    if let Some(cleaner) = run.cleaner.take() {
        let _ = cleaner.await;
    }
    if let Some(mut xl) = run.xl.take() {
        // Its transport is gone: xl resumes the domain and exits, and lets go of the QMP socket.
        wait_exit(&mut xl).await;
    }
    let qemu = super::finish::reconnect(&base.qmp_socket).await.ok();
    Err(settle_on_source(failure, qemu, &held.journal, held.record, held.link, &base).await)
}

/// The source keeps the domain: [`Settle`] removes jobs and nodes, tells the
/// agent, and resumes the device model if the domain ran before and it is stopped.
async fn settle_on_source(
    mut failure: Failure,
    qemu: Option<SourceQemu>,
    journal: &Journal,
    record: Option<crate::migrate::journal::SourceRecord>,
    link: Option<crate::migrate::control::AgentLink>,
    base: &MigrateOptions,
) -> Failure {
    if let Some(record) = record {
        let outcome = Settle {
            qemu: qemu.as_ref(),
            journal,
            auth: &base.auth,
            link,
            agent_wait: base.agent_wait,
            reason: format!("{}: {}", failure.phase, failure.line()),
            known: None,
        }
        .run(record)
        .await;
        match outcome {
            Outcome::Source { why, pending } => {
                info!(%why, "settled on the source");
                failure = failure.with_pending(pending);
            }
            Outcome::Undecided { why } => info!(%why, "settled on the source"),
            Outcome::Destination { .. } => {}
        }
    }
    drop(qemu);
    failure.source_running = source_running(&base.qmp_socket).await;
    failure
}

/// Whether the device model runs (a short connection: libxl may need the socket next).
async fn source_running(socket: &Path) -> bool {
    match super::finish::reconnect(socket).await {
        Ok(q) => q
            .status()
            .await
            .map(|(running, _)| running)
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// What a migration holds once ferry let go of the device model's QMP socket.
struct Held {
    journal: Journal,
    record: Option<crate::migrate::journal::SourceRecord>,
    link: Option<crate::migrate::control::AgentLink>,
    /// The NBD relay of an encrypted migration: the mirrors go through it until they are done.
    _tunnel: Option<crate::tunnel::Tunnel>,
    disk_bytes: u64,
}

impl Held {
    /// Settled: the journal and the relay's socket directory go.
    fn forget(&self) {
        if let Some(record) = &self.record {
            if let Some(tls) = &record.tls {
                tls.remove_files();
            }
            crate::migrate::settle::remove_files(&record.files);
        }
        if let Err(e) = self.journal.remove() {
            warn!(error = %e, "removing the journal");
        }
    }
}

async fn wait_exit(xl: &mut Child) -> Option<std::process::ExitStatus> {
    match tokio::time::timeout(XL_EXIT_WAIT, xl.wait()).await {
        Ok(Ok(status)) => Some(status),
        _ => {
            warn!("xl migrate did not exit; killing it");
            let _ = xl.kill().await;
            None
        }
    }
}

/// One run's state beyond the shared [`Migration`].
struct Run<'a> {
    opts: &'a XlOptions,
    base: &'a MigrateOptions,
    tag: String,
    /// Disk name → vdev.
    vdevs: HashMap<String, String>,
    config: String,
    relay_socket: Option<PathBuf>,
    config_file: Option<PathBuf>,
    xl: Option<Child>,
    /// Whether ferry stopped the device model.
    stopped: bool,
    /// The final sync, running from the moment the guest is suspended (see [`super::finish::finish_disks`]).
    finisher: Option<tokio::task::JoinHandle<Result<super::finish::Finished, Failure>>>,
    /// Removes the NBD nodes once END went (off the guest's pause).
    cleaner: Option<tokio::task::JoinHandle<()>>,
}

impl Run<'_> {
    fn cleanup_files(&mut self) {
        for path in [self.relay_socket.take(), self.config_file.take()]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(path);
        }
    }

    /// The final sync ended: on success, tell the agent (`Final`: it flushes the images and
    /// closes the exports) and remove the NBD nodes in the background.
    async fn disks_final<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        finished: Result<Result<super::finish::Finished, Failure>, tokio::task::JoinError>,
        agent_wr: &mut W,
        summary: &mut XlSummary,
        jobs: &[mirror::MirrorJob],
    ) -> Result<(), (Failure, bool)> {
        let finished = finished
            .map_err(|e| {
                (
                    xl_err(PhaseName::Switchover, format!("final sync task: {e}")),
                    false,
                )
            })?
            .map_err(|f| (f, false))?;
        self.stopped = finished.stopped;
        summary.stopped_device_model = finished.stopped;
        summary.final_sync_ms = finished.final_sync_ms;
        summary.disks_final_at_us = finished.final_at_us;
        wire::write_chunk(agent_wr, &Chunk::Final)
            .await
            .map_err(|e| {
                (
                    xl_err(PhaseName::Switchover, format!("agent link: {e}")),
                    false,
                )
            })?;
        self.cleaner = Some(tokio::spawn(super::finish::remove_nodes(
            finished.qemu,
            jobs.to_vec(),
        )));
        Ok(())
    }

    /// Mirrors every disk to READY and tells the agent (`Synced`).
    async fn mirror(
        &mut self,
        m: &mut Migration,
        vm: &crate::vm::VmDescription,
        reporter: &mut dyn Reporter,
        cancel: &CancellationToken,
    ) -> Result<crate::migrate::Mirrors, Failure> {
        let mut mirrors = m
            .start_mirrors(self.base, vm, &self.tag, reporter, cancel, Ask::Xl)
            .await?;
        let link = m
            .link
            .as_mut()
            .ok_or_else(|| xl_err(PhaseName::Mirror, "no agent link"))?;
        m.disk_bytes = mirror::wait_ready(
            &m.qemu,
            &mirrors.jobs,
            &mut mirrors.events,
            reporter,
            cancel,
            link,
            self.base,
        )
        .await?;
        link.send(&SourceMessage::Synced)
            .await
            .map_err(|e| Failure::new(PhaseName::Mirror, e))?;
        Ok(mirrors)
    }

    /// xl with ferry as its transport, to the end of its stream. The error says whether the go
    /// message went.
    async fn stream(
        &mut self,
        m: &mut Held,
        mirrors: crate::migrate::Mirrors,
        cancel: &CancellationToken,
        started: Instant,
    ) -> Result<XlSummary, (Failure, bool)> {
        let before = |f: Failure| (f, false);
        let jobs = mirrors.jobs;
        let migration_id = mirrors.record.migration_id.clone();
        // The config for the receiver, and xl with ferry as its transport.
        let images: HashMap<String, String> = mirrors
            .images
            .iter()
            .filter_map(|i| Some((self.vdevs.get(&i.disk)?.clone(), i.path.clone())))
            .collect();
        let config = super::config::rewrite(&self.config, &images)
            .map_err(|e| before(xl_err(PhaseName::Ram, e.to_string())))?;
        let dir = self.base.state_dir.join("xl");
        super::transport::private_dir(&dir).map_err(|e| before(xl_err(PhaseName::Ram, e)))?;
        let cfg_path = dir.join(format!("{}.cfg", self.tag));
        let sock_path = dir.join(format!("{}.sock", self.tag));
        // Journaled before they exist, so that whoever settles the migration removes them.
        if let Some(record) = m.record.as_mut() {
            record.files = vec![cfg_path.clone(), sock_path.clone()];
            m.journal.write(record).map_err(|e| {
                before(xl_err(
                    PhaseName::Ram,
                    format!(
                        "cannot write the journal {}: {e}; check --state-dir",
                        m.journal.path().display()
                    ),
                ))
            })?;
        }
        self.config_file = Some(cfg_path.clone());
        super::transport::write_private(&cfg_path, config.as_bytes())
            .map_err(|e| before(xl_err(PhaseName::Ram, e)))?;
        let _ = std::fs::remove_file(&sock_path);
        let listener = UnixListener::bind(&sock_path).map_err(|e| {
            before(xl_err(
                PhaseName::Ram,
                format!("cannot listen on {}: {e}", sock_path.display()),
            ))
        })?;
        self.relay_socket = Some(sock_path.clone());
        let (mut relay_rd, mut relay_wr, options) = super::transport::start(
            super::transport::XlCommand {
                xl: &self.opts.xl,
                relay: &self.opts.relay,
                flags: &self.opts.xl_flags,
                domain: &self.opts.domain,
                host: &self.base.to,
                config: &cfg_path,
            },
            listener,
            &sock_path,
            &mut self.xl,
            cancel,
        )
        .await
        .map_err(before)?;
        let link = m
            .link
            .take()
            .ok_or_else(|| before(xl_err(PhaseName::Ram, "no agent link")))?;
        let (mut agent_rd, mut agent_wr) = link
            .xl_receive(options)
            .await
            .map_err(|e| before(Failure::new(PhaseName::Ram, e)))?;
        info!(%migration_id, "xl's stream flows");

        // Stream mode.
        let mut parser = SenderStream::new();
        let mut up_buf = vec![0u8; 256 * 1024];
        let mut up_out: Vec<u8> = Vec::new();
        let (mut up_done, mut down_done, mut went) = (false, false, false);
        let mut summary = XlSummary {
            migration_id,
            disk_bytes: m.disk_bytes,
            stopped_device_model: false,
            final_sync_ms: 0.0,
            end_held_ms: 0.0,
            disks_final_at_us: 0,
            total_ms: 0,
        };
        let lost = |went: bool, what: String| (xl_err(PhaseName::Switchover, what), went);
        let mut final_sent = false;
        while !(up_done && down_done) {
            tokio::select! {
                _ = cancel.cancelled(), if !went => {
                    return Err((Failure::new(PhaseName::Switchover, MigrateError::Cancelled), false));
                }
                n = relay_rd.read(&mut up_buf), if !down_done => {
                    let n = n.map_err(|e| lost(went, format!("reading xl's stream: {e}")))?;
                    if n == 0 {
                        down_done = true;
                        wire::write_chunk(&mut agent_wr, &Chunk::Eof).await.map_err(|e| lost(went, format!("agent link: {e}")))?;
                        if !parser.ended() {
                            return Err(lost(false, "xl's stream ended before its END record: xl failed, see its messages".into()));
                        }
                        continue;
                    }
                    let data = &up_buf[..n];
                    if parser.ended() {
                        if !went {
                            // The go message: the point of no return. The journal goes first, so
                            // that a `ferry recover` after a crash from here on cannot take the
                            // domain back on the source.
                            m.forget();
                            wire::write_chunk(&mut agent_wr, &Chunk::Go)
                                .await
                                .map_err(|e| lost(true, format!("agent link at the go message: {e}")))?;
                            went = true;
                            info!("point of no return: the domain belongs to the destination");
                        }
                        wire::send_data(&mut agent_wr, data).await.map_err(|e| lost(went, e))?;
                        continue;
                    }
                    let found = parser.feed(data).map_err(|e| lost(false, e.to_string()))?;
                    if parser.suspended() && self.finisher.is_none() {
                        self.finisher = Some(tokio::spawn(super::finish::finish_disks(
                            self.base.qmp_socket.clone(),
                            jobs.clone(),
                        )));
                    }
                    match found {
                        Found::Nothing => wire::send_data(&mut agent_wr, data).await.map_err(|e| lost(false, e))?,
                        Found::End(at) => {
                            wire::send_data(&mut agent_wr, &data[..at]).await.map_err(|e| lost(false, e))?;
                            let held = Instant::now();
                            if !final_sent {
                                let finisher = self.finisher.take().ok_or_else(|| lost(false, "no final sync started".into()))?;
                                let finished = finisher.await;
                                self.disks_final(finished, &mut agent_wr, &mut summary, &jobs).await?;
                                final_sent = true;
                            }
                            // What follows reaches the receiver only once the agent's images are
                            // flushed and no longer served.
                            wire::write_chunk(&mut agent_wr, &Chunk::Barrier).await.map_err(|e| lost(false, format!("agent link: {e}")))?;
                            wire::send_data(&mut agent_wr, &data[at..]).await.map_err(|e| lost(false, e))?;
                            summary.end_held_ms = held.elapsed().as_secs_f64() * 1000.0;
                            info!(held_ms = summary.end_held_ms, final_sync_ms = summary.final_sync_ms, "END forwarded");
                        }
                    }
                }
                // The final sync done while the stream flows (HVM): the agent can flush and close
                // its exports meanwhile, and END will only wait for the barrier.
                finished = wait_task(&mut self.finisher), if self.finisher.is_some() && !final_sent => {
                    self.finisher = None;
                    self.disks_final(finished, &mut agent_wr, &mut summary, &jobs).await?;
                    final_sent = true;
                }
                chunk = wire::read_chunk(&mut agent_rd), if !up_done => {
                    match chunk {
                        Ok(Chunk::Data(bytes)) => {
                            if up_out.len() < 4096 {
                                up_out.extend_from_slice(&bytes);
                            }
                            relay_wr.write_all(&bytes).await.map_err(|e| lost(went, format!("writing to xl: {e}")))?;
                        }
                        Ok(Chunk::Eof) => {
                            up_done = true;
                            let _ = relay_wr.shutdown().await;
                        }
                        Ok(other) => return Err(lost(went, format!("the agent sent {other:?} in stream mode"))),
                        Err(e) => {
                            if went {
                                up_done = true;
                                down_done = true;
                            } else {
                                return Err(lost(false, format!("lost the agent: {}", crate::error_chain(&e))));
                            }
                        }
                    }
                }
            }
        }
        if let Some(cleaner) = self.cleaner.take() {
            let _ = cleaner.await;
        }
        let status = match self.xl.as_mut() {
            Some(xl) => wait_exit(xl).await,
            None => None,
        };
        let receiver = super::stream::receiver_report(&up_out);
        if !went {
            return Err(lost(
                false,
                "xl's stream ended before the go message".into(),
            ));
        }
        if receiver.is_some_and(|s| s != 0) && self.stopped {
            // The receiver could not start the domain and destroyed its copy; xl resumes the
            // domain here, and the device model ferry stopped must run with it.
            if let Ok(q) = super::finish::reconnect(&self.base.qmp_socket).await {
                let _ = q.cont().await;
            }
        }
        match (status, receiver) {
            (Some(s), Some(0)) if s.success() => {
                summary.total_ms = started.elapsed().as_millis() as u64;
                Ok(summary)
            }
            (_, Some(code)) if code != 0 => Err(lost(
                true,
                format!("the destination could not start the domain (status {code}); xl resumes it here"),
            )),
            (status, _) => Err(lost(
                true,
                format!(
                    "xl migrate failed after the point of no return ({}): check the domain on both hosts, as xl says",
                    status.map(|s| s.to_string()).unwrap_or_else(|| "did not exit".into())
                ),
            )),
        }
    }
}

/// Waits for a spawned task in `slot` (pending forever when there is none).
async fn wait_task<T>(
    slot: &mut Option<tokio::task::JoinHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    match slot.as_mut() {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}
