//! One migration on the agent: everything it created on this host (directory, images, NBD
//! exports, destination QEMU) and the transitions between its journaled [`Phase`]s.
//!
//! ```text
//!  Receiving ──start_destination──► Started ──commit──► Resuming ──cont, reply──► Running
//!      │                               │   (incoming completed,
//!      │                               │    images fdatasynced)
//!      └────────── rollback ◄──────────┘ (abort, QEMU dead: it never ran)
//! ```
//!
//! Each transition is journaled before it is acted on. `rollback` (kill the destination, stop
//! serving, remove the directory) is allowed only while the guest cannot have run here: this
//! agent knows whether it sent `cont`; a restarted agent that finds `Resuming` cannot, so from
//! there nothing of the migration is ever removed. A paused VM goes from `Started` straight to
//! `Running` (there is no `cont`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::agent::destination::{Destination, DestinationError, Incoming};
use crate::agent::inventory::MigrationInfo;
use crate::agent::metrics::Tracked;
use crate::agent::registry::Registry;
use crate::agent::space::Reservation;
use crate::agent::storage::{self, MigrationDir, Phase, Record};
use crate::agent::AgentConfig;
use crate::nbd::{Export, NbdServer, ServerConfig};
use crate::protocol::{self, AgentMessage, ExportInfo};
use crate::status::MigrationStatus;
use crate::tls::migration::MigrationCredentials;
use crate::vm::argv::{self, RewriteContext};
use crate::vm::VmDescription;

mod handover;

/// Everything one migration created on this host.
pub struct Received {
    /// The migration's directory (its name is the migration id).
    pub dir: MigrationDir,
    argv: Vec<String>,
    ctx: RewriteContext,
    /// Disk names, in the VM description's order; `images` and `exports` follow it.
    disks: Vec<String>,
    images: Vec<PathBuf>,
    exports: Vec<String>,
    nbd: Option<NbdServer>,
    destination: Option<Destination>,
    /// This migration's certificates, when its disks and RAM travel encrypted.
    credentials: Option<MigrationCredentials>,
    /// The source host's address: the only peer the NBD server and the RAM listener serve.
    source: Option<IpAddr>,
    /// The TLS listener that feeds the destination QEMU's RAM socket (encrypted migrations).
    ram_tunnel: Option<crate::tunnel::incoming::Listener>,
    record: Record,
    /// Whether this agent may have started the guest: `cont` sent, or a previous agent's
    /// `Resuming` it cannot see past. Until then a dead destination never ran.
    may_have_run: bool,
    /// Its share of the storage's free space, released when this value goes.
    reservation: Option<Reservation>,
    /// Its metrics: NBD counters, phase clock, outcome.
    tracked: Tracked,
}

impl Received {
    /// Preflight, then directory, images and NBD exports. Refusals leave nothing behind.
    pub async fn prepare(
        vm: &VmDescription,
        tls: bool,
        config: &AgentConfig,
        registry: &Registry,
        ip: IpAddr,
        source: IpAddr,
    ) -> Result<Received, String> {
        // First: a migration refused for space must not have cost a certificate or a directory.
        let reservation = registry
            .ledger
            .reserve(vm, config.space_check)
            .map_err(|e| crate::error_chain(&e))?;
        let binary = check_vm(vm, config).await?.binary;
        let mut received =
            Received::admit(vm, tls, config, registry, reservation, &binary, ip, source).await?;
        match argv::rewrite(vm, &received.ctx) {
            Ok(rewritten) => received.argv = rewritten.argv,
            Err(e) => {
                received.tracked.discard();
                received.rollback().await;
                return Err(e.to_string());
            }
        }
        Ok(received)
    }

    /// For `xl migrate`: preflight (space), then directory, images and NBD exports, as
    /// [`prepare`](Self::prepare) but without a command line: `xl migrate-receive` starts the
    /// device model. Refusals leave nothing behind.
    pub async fn prepare_xl(
        vm: &VmDescription,
        tls: bool,
        config: &AgentConfig,
        registry: &Registry,
        ip: IpAddr,
        source: IpAddr,
    ) -> Result<Received, String> {
        let reservation = registry
            .ledger
            .reserve(vm, config.space_check)
            .map_err(|e| crate::error_chain(&e))?;
        Received::admit(vm, tls, config, registry, reservation, "", ip, source).await
    }

    /// What both preparations share once the checks passed: the credentials, the directory with
    /// its `migration.json`, the images and the NBD exports; the reservation then follows what
    /// the images allocate. Refusals leave nothing behind.
    #[allow(clippy::too_many_arguments)] // one private step of the two `prepare`s
    async fn admit(
        vm: &VmDescription,
        tls: bool,
        config: &AgentConfig,
        registry: &Registry,
        reservation: Reservation,
        binary: &str,
        ip: IpAddr,
        source: IpAddr,
    ) -> Result<Received, String> {
        let credentials = if tls {
            let made = tokio::task::spawn_blocking(MigrationCredentials::generate)
                .await
                .map_err(|e| format!("certificate task failed: {e}"))?;
            Some(made.map_err(|e| format!("cannot make this migration's certificates: {e}"))?)
        } else {
            None
        };
        let dir = MigrationDir::create(&config.storage, vm.running).map_err(|e| e.to_string())?;
        let tracked = registry.metrics.track(&dir.id, Phase::Receiving);
        let ctx = context(binary, &dir.path, vm);
        let mut received = Received {
            reservation: None,
            tracked,
            argv: Vec::new(),
            ctx,
            disks: Vec::new(),
            images: Vec::new(),
            exports: Vec::new(),
            nbd: None,
            destination: None,
            credentials,
            source: Some(source.to_canonical()),
            ram_tunnel: None,
            record: Record {
                phase: Phase::Receiving,
                resume: vm.running,
            },
            may_have_run: false,
            dir,
        };
        let info = MigrationInfo::new(vm, reservation.bytes);
        received.reservation = Some(reservation);
        let made = match info.write(&received.dir) {
            Ok(()) => received.create_storage(vm, ip, source).await,
            Err(e) => Err(format!(
                "cannot write {}: {e}",
                received
                    .dir
                    .path
                    .join(super::inventory::INFO_NAME)
                    .display()
            )),
        };
        if let Err(e) = made {
            received.tracked.discard();
            received.rollback().await;
            return Err(e);
        }
        if let Some(reservation) = &received.reservation {
            reservation.track(received.images.clone());
        }
        info!(
            migration = %received.dir.id,
            vm = info.vm.as_deref().unwrap_or("-"),
            disks = received.disks.len(),
            bytes = vm.total_disk_bytes(),
            reserved = info.reserved,
            "admitted"
        );
        Ok(received)
    }

    /// Each disk's image path on this host, in the disks' order.
    pub fn image_paths(&self) -> Vec<protocol::ImageInfo> {
        self.disks
            .iter()
            .zip(&self.images)
            .map(|(disk, path)| protocol::ImageInfo {
                disk: disk.clone(),
                path: path.display().to_string(),
            })
            .collect()
    }

    /// The images' paths.
    pub fn images(&self) -> &[PathBuf] {
        &self.images
    }

    /// `xl`'s point of no return passed (the go message goes to `xl migrate-receive` next): the
    /// images belong to the domain from here, journaled before the message is passed on, and are
    /// never removed by the agent again.
    pub fn hand_over_to_domain(&mut self) -> Result<(), String> {
        self.may_have_run = true;
        self.journal(Phase::Running)?;
        self.forget_credentials();
        Ok(())
    }

    /// After the point of no return, `xl migrate-receive` reported that it could not start the
    /// domain and destroyed its copy (the source resumes its own): the images are nobody's.
    pub fn remove_after_receiver_gave_up(&mut self) {
        if let Err(e) = self.dir.remove() {
            warn!(error = %e, "removing the images of a domain the receiver destroyed");
        }
    }

    /// A migration a previous agent left in `record.phase`, with its destination QEMU
    /// reattached; `None` when that QEMU is gone.
    /// It takes back the space its migration reserved (as recorded in `migration.json`).
    pub async fn reattach(
        dir: MigrationDir,
        record: Record,
        registry: &Registry,
    ) -> Option<Received> {
        let pid = read_pid(&dir.path)?;
        let ctx = RewriteContext {
            binary: String::new(),
            dir: dir.path.clone(),
            images: HashMap::new(),
        };
        let destination = Destination::attach(pid, &dir.path, &ctx.qmp_socket()).await?;
        let images = dir.images();
        let reservation = MigrationInfo::read(&dir).map(|info| {
            let held = registry.ledger.hold(info.reserved);
            held.track(images.clone());
            held
        });
        Some(Received {
            reservation,
            tracked: registry.metrics.track(&dir.id, record.phase),
            images,
            argv: Vec::new(),
            ctx,
            disks: Vec::new(),
            exports: Vec::new(),
            nbd: None,
            destination: Some(destination),
            credentials: None,
            source: None,
            ram_tunnel: None,
            may_have_run: record.phase >= Phase::Resuming,
            record,
            dir,
        })
    }

    /// The journaled phase.
    pub fn phase(&self) -> Phase {
        self.record.phase
    }

    /// The `Prepared` message for the source.
    pub fn prepared(&self) -> AgentMessage {
        AgentMessage::Prepared {
            migration_id: self.dir.id.clone(),
            nbd_port: self
                .nbd
                .as_ref()
                .map(|n| n.local_addr().port())
                .unwrap_or(0),
            exports: self
                .disks
                .iter()
                .zip(&self.exports)
                .map(|(disk, export)| ExportInfo {
                    disk: disk.clone(),
                    export: export.clone(),
                })
                .collect(),
            tls: self
                .credentials
                .as_ref()
                .map(|c| Box::new(c.client_bundle())),
        }
    }

    fn journal(&mut self, phase: Phase) -> Result<(), String> {
        let record = Record {
            phase,
            ..self.record
        };
        self.dir.record(record).map_err(|e| e.to_string())?;
        self.record = record;
        self.tracked.phase(phase);
        Ok(())
    }

    /// Images and their exports, served on `ip` to `source` only.
    async fn create_storage(
        &mut self,
        vm: &VmDescription,
        ip: IpAddr,
        source: IpAddr,
    ) -> Result<(), String> {
        let tls = match &self.credentials {
            Some(credentials) => Some(
                credentials
                    .nbd_server_config()
                    .map_err(|e| format!("cannot set up TLS for the NBD server: {e}"))?,
            ),
            None => None,
        };
        let config = ServerConfig {
            allowed_peer: Some(source.to_canonical()),
            stats: self.tracked.stats.clone(),
            tls,
            ..ServerConfig::default()
        };
        let nbd = NbdServer::bind(SocketAddr::new(ip, 0), config)
            .await
            .map_err(|e| format!("cannot start the NBD server: {e}"))?;
        self.nbd = Some(nbd.clone());
        for disk in &vm.disks {
            let path = self
                .dir
                .create_image(&disk.name, disk.size)
                .map_err(|e| e.to_string())?;
            let export = protocol::new_nonce();
            nbd.add_export(Export {
                name: export.clone(),
                path: path.clone(),
                read_only: false,
            })
            .map_err(|e| format!("cannot export {}: {e}", path.display()))?;
            self.disks.push(disk.name.clone());
            self.images.push(path);
            self.exports.push(export);
        }
        Ok(())
    }

    /// Starts the destination QEMU paused, waiting for the RAM; returns the port the source
    /// sends it to (see [`Self::listen_for_ram`]). Journaled `Started` first, so that a
    /// restarted agent looks for that QEMU. Runs while the disks copy: QEMU opens the images
    /// inactive and does not touch them before the hand-over.
    /// With `prealloc_ram` its RAM is preallocated before the answer (see
    /// [`Destination::preallocate_ram`]): the source reads that answer only once its disks are
    /// in sync, so the time is hidden behind the mirror unless the mirror is shorter.
    pub async fn start_destination(
        &mut self,
        ip: IpAddr,
        parallel: u32,
        prealloc_ram: bool,
    ) -> Result<u16, String> {
        self.journal(Phase::Started)?;
        let _ = std::fs::write(self.dir.path.join("argv"), self.argv.join("\n"));
        let (pidfile, qmp_socket) = (self.ctx.pidfile(), self.ctx.qmp_socket());
        let dest = Destination::start(&self.argv, &self.dir.path, &pidfile, &qmp_socket)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        let listened = self.listen_for_ram(&dest, ip, parallel).await;
        if prealloc_ram && listened.is_ok() {
            // Only a speed-up: a destination that cannot preallocate still receives the RAM the
            // usual way (allocating on first touch).
            if let Err(e) = dest.preallocate_ram().await {
                warn!(error = %crate::error_chain(&e), "could not preallocate the guest's RAM; receiving it without");
            }
        }
        self.destination = Some(dest);
        listened
    }

    /// Has `dest` listen for the RAM; returns the port the source connects to. Encrypted: QEMU
    /// on a unix socket of the migration directory, fed by the agent's TLS listener on `ip`,
    /// which takes only the source's certificate (crate::tunnel). `--insecure`: QEMU's own port.
    async fn listen_for_ram(
        &mut self,
        dest: &Destination,
        ip: IpAddr,
        parallel: u32,
    ) -> Result<u16, String> {
        let Some(credentials) = &self.credentials else {
            return dest
                .listen(&Incoming::Tcp(ip), parallel)
                .await
                .map_err(|e| crate::error_chain(&e))?
                .ok_or_else(|| "the destination QEMU reported no RAM port".to_string());
        };
        let config = credentials
            .nbd_server_config()
            .map_err(|e| format!("cannot set up TLS for the RAM stream: {e}"))?;
        let socket = self.ctx.ram_socket();
        dest.listen(&Incoming::Unix(socket.clone()), parallel)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        let connections = crate::tunnel::ram_connections(parallel);
        let listener =
            crate::tunnel::incoming::Listener::start(ip, self.source, config, &socket, connections)
                .await
                .map_err(|e| crate::error_chain(&e))?;
        let port = listener.port();
        self.ram_tunnel = Some(listener);
        Ok(port)
    }

    /// The mirrors are in sync: flush the bulk of the data now, in the background, so that the
    /// flush at the switchover (guest paused) has only the last few blocks to write.
    pub fn flush_in_background(&self) {
        let images = self.images.clone();
        tokio::spawn(async move {
            if let Err(e) = storage::sync_files(images.clone()).await {
                warn!(error = %e, "early flush of the images");
                return;
            }
            // Clean now: dropping them here keeps that work out of `cont` (see drop_cached).
            if let Err(e) = storage::drop_cached(images).await {
                warn!(error = %e, "dropping the images' cached pages");
            }
        });
    }

    /// Whether the destination QEMU still exists (false before it was started).
    pub fn destination_alive(&self) -> bool {
        self.destination.as_ref().is_some_and(Destination::alive)
    }

    /// Whether the destination QEMU has not seen the RAM stream yet (incoming `none`/`setup`).
    /// Such a destination can be rolled back when its source is lost: without it the source
    /// QEMU cannot complete, and a source whose driver lost the link before the RAM phase gives
    /// up. The destination starts while the disks copy, so a link lost during the mirror ends
    /// here instead of in the recover window.
    pub async fn no_ram_yet(&self) -> bool {
        matches!(
            self.incoming_status().await,
            Ok(MigrationStatus::None | MigrationStatus::Setup)
        )
    }

    /// The destination's incoming migration status.
    pub async fn incoming_status(&self) -> Result<MigrationStatus, DestinationError> {
        match &self.destination {
            Some(dest) => dest.incoming_status().await,
            None => Ok(MigrationStatus::None),
        }
    }
}

/// What [`check`] found: the binary the destination would run and its command line, with
/// [`protocol::CHECK_DIR`] standing for the migration directory.
pub struct Checked {
    /// The QEMU binary the policy picked.
    pub binary: String,
    /// The rewritten command line.
    pub argv: Vec<String>,
}

/// Every check of a `Prepare` (free space against the reservations of the migrations in
/// progress, binary, command line, host files), creating and reserving nothing: what
/// `ferry migrate --dry-run` asks for (`Check`). `prepare` reserves the space, then runs the rest.
pub async fn check(
    vm: &VmDescription,
    config: &AgentConfig,
    ledger: &crate::agent::space::Ledger,
) -> Result<Checked, String> {
    ledger
        .check(vm, config.space_check)
        .map_err(|e| crate::error_chain(&e))?;
    check_vm(vm, config).await
}

/// The checks of [`check`] other than space (`prepare` reserves the space instead).
async fn check_vm(vm: &VmDescription, config: &AgentConfig) -> Result<Checked, String> {
    let binary = config
        .policy
        .binary_for(vm)
        .await
        .map_err(|e| e.to_string())?;
    // The rewrite with the final paths' shape, so an argv we cannot run is refused before
    // anything is created.
    let probe = context(&binary, &config.storage.join(protocol::CHECK_DIR), vm);
    let argv = argv::rewrite(vm, &probe)
        .map_err(|e| format!("the VM's command line: {e}"))?
        .argv;
    config
        .policy
        .check_host_files(vm)
        .map_err(|e| e.to_string())?;
    Ok(Checked { binary, argv })
}

/// The destination QEMU's pid from its pid file.
pub fn read_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

fn context(binary: &str, dir: &Path, vm: &VmDescription) -> RewriteContext {
    let images: HashMap<String, PathBuf> = vm
        .disks
        .iter()
        .map(|d| (d.name.clone(), dir.join(storage::image_file_name(&d.name))))
        .collect();
    RewriteContext {
        binary: binary.to_string(),
        dir: dir.to_path_buf(),
        images,
    }
}
