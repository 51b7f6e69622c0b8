//! One migration on the agent side: a control connection from handshake to `Running`, or to a
//! rollback that leaves nothing behind.
//!
//! The session owns everything it creates (directory, NBD server, destination QEMU) in
//! [`Received`]; every exit before the VM runs here goes through [`Received::rollback`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::destination::{Destination, DestinationError};
use super::storage::{self, MigrationDir, Phase};
use super::AgentConfig;
use crate::nbd::{Export, NbdServer, ServerConfig};
use crate::protocol::{self, AgentMessage, ExportInfo, ProtocolError, Signer, SourceMessage};
use crate::vm::argv::{self, RewriteContext};
use crate::vm::VmDescription;

/// How long the handshake may take before the agent hangs up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the incoming migration may take to complete once the source says it switched over.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a session ended without the VM running here.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The control connection failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The agent refused; the text went to the source too.
    #[error("refused: {0}")]
    Refused(String),
    /// The source aborted.
    #[error("source aborted: {0}")]
    Aborted(String),
}

/// Runs one control connection to its end.
pub async fn run(stream: TcpStream, config: &AgentConfig) -> Result<(), SessionError> {
    let local_ip = stream.local_addr().map_err(ProtocolError::from)?.ip();
    let (mut rd, mut wr) = stream.into_split();
    let version = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake(&mut rd, &mut wr, &config.token),
    )
    .await
    {
        Ok(result) => result?,
        Err(_) => return Err(SessionError::Refused("handshake timed out".into())),
    };
    info!(version, "source authenticated");
    let vm = match protocol::read_message(&mut rd).await? {
        SourceMessage::Prepare { vm } => vm,
        other => {
            return Err(refuse(&mut wr, format!("expected Prepare, got {}", kind(&other))).await)
        }
    };
    let mut received = match prepare(&vm, config, local_ip).await {
        Ok(received) => received,
        Err(reason) => return Err(refuse(&mut wr, reason).await),
    };
    let result = drive(&mut rd, &mut wr, &mut received, local_ip).await;
    match result {
        Ok(()) => Ok(()),
        Err(err) => {
            // A dropped connection after the switchover: the destination's own migration state
            // says whether the VM lives here now.
            if received.incoming_completed().await {
                warn!(migration = %received.dir.id, "control connection lost after switchover; finishing here");
                let finished = received
                    .finish()
                    .await
                    .map(|_| ())
                    .map_err(SessionError::Refused);
                received.release_nbd().await;
                finished
            } else {
                received.rollback().await;
                if let SessionError::Refused(reason) = &err {
                    let _ = protocol::write_message(
                        &mut wr,
                        &AgentMessage::Refused {
                            reason: reason.clone(),
                        },
                    )
                    .await;
                }
                Err(err)
            }
        }
    }
}

async fn handshake<R, W>(rd: &mut R, wr: &mut W, token: &[u8]) -> Result<u32, SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let versions = match protocol::read_message(rd).await? {
        SourceMessage::Hello { versions, .. } => versions,
        other => return Err(refuse(wr, format!("expected Hello, got {}", kind(&other))).await),
    };
    let Some(version) = protocol::pick_version(&versions) else {
        let reason = format!(
            "agent speaks control protocol versions {:?}, the source offered {versions:?}: upgrade the older side",
            protocol::SUPPORTED_VERSIONS
        );
        return Err(refuse(wr, reason).await);
    };
    let nonce = protocol::new_nonce();
    protocol::write_message(
        wr,
        &AgentMessage::Challenge {
            version,
            nonce: nonce.clone(),
        },
    )
    .await?;
    let (mac, source_nonce) = match protocol::read_message(rd).await? {
        SourceMessage::Auth { mac, nonce } => (mac, nonce),
        other => return Err(refuse(wr, format!("expected Auth, got {}", kind(&other))).await),
    };
    if !protocol::verify(token, Signer::Source, &nonce, &mac) {
        return Err(refuse(
            wr,
            "authentication failed: the source's token does not match this agent's --token-file"
                .into(),
        )
        .await);
    }
    let mac = protocol::sign(token, Signer::Agent, &source_nonce);
    protocol::write_message(wr, &AgentMessage::Authenticated { mac }).await?;
    Ok(version)
}

/// Sends `Refused` (best effort) and returns the matching error.
async fn refuse<W: AsyncWrite + Unpin>(wr: &mut W, reason: String) -> SessionError {
    warn!(%reason, "refusing migration");
    let _ = protocol::write_message(
        wr,
        &AgentMessage::Refused {
            reason: reason.clone(),
        },
    )
    .await;
    SessionError::Refused(reason)
}

fn kind(msg: &SourceMessage) -> &'static str {
    match msg {
        SourceMessage::Hello { .. } => "Hello",
        SourceMessage::Auth { .. } => "Auth",
        SourceMessage::Prepare { .. } => "Prepare",
        SourceMessage::StartDestination => "StartDestination",
        SourceMessage::Switched => "Switched",
        SourceMessage::Abort { .. } => "Abort",
    }
}

/// Everything one migration created on this host.
struct Received {
    dir: MigrationDir,
    argv: Vec<String>,
    ctx: RewriteContext,
    /// Disk names, in the VM description's order; `images` and `exports` follow it.
    disks: Vec<String>,
    images: Vec<PathBuf>,
    exports: Vec<String>,
    nbd: Option<NbdServer>,
    destination: Option<Destination>,
    /// Whether to start the guest after the switchover (it was running on the source).
    resume: bool,
}

/// Preflight, then directory, images and NBD exports. Refusals leave nothing behind.
async fn prepare(vm: &VmDescription, config: &AgentConfig, ip: IpAddr) -> Result<Received, String> {
    storage::preflight(&config.storage, vm).map_err(|e| e.to_string())?;
    let binary = config
        .policy
        .binary_for(vm)
        .await
        .map_err(|e| e.to_string())?;
    // Dry run with the final paths' shape, so an argv we cannot run is refused before anything
    // is created.
    let probe = context(&binary, &config.storage.join("probe"), vm);
    argv::rewrite(vm, &probe).map_err(|e| format!("the VM's command line: {e}"))?;
    config
        .policy
        .check_host_files(vm)
        .map_err(|e| e.to_string())?;

    let dir = MigrationDir::create(&config.storage).map_err(|e| e.to_string())?;
    let ctx = context(&binary, &dir.path, vm);
    let mut received = Received {
        argv: Vec::new(),
        ctx,
        disks: Vec::new(),
        images: Vec::new(),
        exports: Vec::new(),
        nbd: None,
        destination: None,
        resume: vm.running,
        dir,
    };
    if let Err(e) = received.create_storage(vm, ip).await {
        received.rollback().await;
        return Err(e);
    }
    Ok(received)
}

fn context(binary: &str, dir: &Path, vm: &VmDescription) -> RewriteContext {
    let images: HashMap<String, PathBuf> = vm
        .disks
        .iter()
        .map(|d| {
            (
                d.name.clone(),
                dir.join(format!("disk-{}.raw", crate::vm::safe_name(&d.name))),
            )
        })
        .collect();
    RewriteContext {
        binary: binary.to_string(),
        dir: dir.to_path_buf(),
        images,
    }
}

async fn drive<R, W>(
    rd: &mut R,
    wr: &mut W,
    received: &mut Received,
    ip: IpAddr,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let nbd_port = received
        .nbd
        .as_ref()
        .map(|n| n.local_addr().port())
        .unwrap_or(0);
    let exports = received
        .disks
        .iter()
        .zip(&received.exports)
        .map(|(disk, export)| ExportInfo {
            disk: disk.clone(),
            export: export.clone(),
        })
        .collect();
    protocol::write_message(
        wr,
        &AgentMessage::Prepared {
            migration_id: received.dir.id.clone(),
            nbd_port,
            exports,
        },
    )
    .await?;

    match protocol::read_message(rd).await? {
        SourceMessage::StartDestination => {}
        SourceMessage::Abort { reason } => return Err(SessionError::Aborted(reason)),
        other => {
            return Err(SessionError::Refused(format!(
                "expected StartDestination, got {}",
                kind(&other)
            )))
        }
    }
    let migration_port = received
        .start_destination(ip)
        .await
        .map_err(|e| SessionError::Refused(e.to_string()))?;
    protocol::write_message(wr, &AgentMessage::DestinationReady { migration_port }).await?;

    match protocol::read_message(rd).await? {
        SourceMessage::Switched => {}
        SourceMessage::Abort { reason } => return Err(SessionError::Aborted(reason)),
        other => {
            return Err(SessionError::Refused(format!(
                "expected Switched, got {}",
                kind(&other)
            )))
        }
    }
    let running = received.finish().await.map_err(SessionError::Refused)?;
    // The VM runs here now whatever happens to the connection: a lost reply is only logged.
    if let Err(e) = protocol::write_message(wr, &running).await {
        warn!(error = %crate::error_chain(&e), "could not tell the source the VM runs here");
    }
    received.release_nbd().await;
    Ok(())
}

impl Received {
    async fn create_storage(&mut self, vm: &VmDescription, ip: IpAddr) -> Result<(), String> {
        let nbd = NbdServer::bind(SocketAddr::new(ip, 0), ServerConfig::default())
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
        self.argv = argv::rewrite(vm, &self.ctx)
            .map_err(|e| e.to_string())?
            .argv;
        Ok(())
    }

    async fn start_destination(&mut self, ip: IpAddr) -> Result<u16, DestinationError> {
        let _ = std::fs::write(self.dir.path.join("argv"), self.argv.join("\n"));
        // Flush the bulk of the mirrored data now, while QEMU starts: the flush at the switchover
        // (guest paused) then has only the last few blocks to write.
        let preflush = storage::sync_files(self.images.clone());
        let (pidfile, qmp_socket) = (self.ctx.pidfile(), self.ctx.qmp_socket());
        let start = Destination::start(&self.argv, &self.dir.path, &pidfile, &qmp_socket);
        let (flushed, dest) = tokio::join!(preflush, start);
        if let Err(e) = flushed {
            warn!(error = %e, "early flush of the images");
        }
        let dest = dest?;
        let port = dest.listen(ip).await;
        self.destination = Some(dest);
        port
    }

    async fn incoming_completed(&self) -> bool {
        match &self.destination {
            Some(dest) => matches!(dest.incoming_status().await.as_deref(), Ok("completed")),
            None => false,
        }
    }

    /// The source switched over: wait for the device state, make the images durable, start the
    /// guest. Everything here happens while the guest is paused, so it is kept to the minimum;
    /// the NBD server is torn down afterwards by [`Received::release_nbd`].
    async fn finish(&mut self) -> Result<AgentMessage, String> {
        let dest = self.destination.as_ref().ok_or("no destination QEMU")?;
        dest.wait_incoming(SWITCH_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        // Every mirror write was answered before the source let the migration complete, so the
        // images hold the final data; make it durable before the guest can build on it.
        storage::sync_files(self.images.clone())
            .await
            .map_err(|e| e.to_string())?;
        let resumed_at_us = if self.resume {
            dest.resume().await.map_err(|e| e.to_string())?
        } else {
            None
        };
        if let Err(e) = self.dir.set_phase(Phase::Running) {
            warn!(error = %e, "recording phase");
        }
        info!(migration = %self.dir.id, pid = dest.pid, "VM running on this host");
        Ok(AgentMessage::Running {
            pid: dest.pid,
            qmp: dest.qmp_path.display().to_string(),
            resumed_at_us,
            allocated_bytes: storage::allocated_bytes(&self.images),
        })
    }

    /// Stops serving the disks (after the switchover: the source's mirrors are done).
    async fn release_nbd(&mut self) {
        if let Some(nbd) = self.nbd.take() {
            for export in &self.exports {
                if let Err(e) = nbd.remove_export(export).await {
                    warn!(%export, error = %e, "removing export");
                }
            }
            if let Err(e) = nbd.shutdown().await {
                warn!(error = %e, "stopping NBD server");
            }
        }
    }

    /// Undo everything: kill the destination QEMU, stop serving, remove the directory.
    async fn rollback(&mut self) {
        if let Some(dest) = self.destination.take() {
            dest.kill();
        }
        if let Some(nbd) = self.nbd.take() {
            let _ = nbd.shutdown().await;
        }
        if let Err(e) = self.dir.remove() {
            warn!(error = %e, "rollback");
        }
        info!(migration = %self.dir.id, "rolled back");
    }
}
