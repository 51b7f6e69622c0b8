//! One control connection on the agent side: the handshake, then either a new migration
//! (`Prepare` ... `Commit`) or a recovering source's verdict on an earlier one (`Resolve`).
//!
//! The migration itself lives in the [`Registry`], not in the connection: when the connection
//! drops after the destination QEMU started, the migration is detached and kept (see
//! [`super::registry`]) instead of being rolled back with the connection, because only the
//! source QEMU knows whether it completed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::metrics::Outcome;
use super::received::Received;
use super::registry::{Registry, Slot};
use super::storage::Phase;
use super::AgentConfig;
use crate::protocol::{self, AgentMessage, ProtocolError, Signer, SourceMessage};

/// The agent's end of a control connection: TLS 1.3 over TCP.
pub type ControlStream = tokio_rustls::server::TlsStream<TcpStream>;

/// The first byte of every TLS connection: the content type of a handshake record. A control
/// frame of protocol version 2 and before (plaintext) starts with a length's high byte, 0.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How long the handshake may take before the agent hangs up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an authenticated source may take to say what it wants.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// A recovering source settled the migration through another connection.
    #[error("settled through another connection")]
    TakenOver,
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
}

/// What an authenticated source asks for.
pub enum Request {
    /// A new migration of this VM; whether its disks and RAM travel encrypted.
    Prepare(Box<crate::vm::VmDescription>, bool),
    /// `ferry migrate --dry-run`: the checks of a `Prepare`, nothing created.
    Check(Box<crate::vm::VmDescription>, bool),
    /// Storage for a Xen domain's disks, for `ferry xl migrate` (see [`super::xl`]).
    PrepareXl(Box<crate::vm::VmDescription>, bool),
    /// A verdict on an earlier migration.
    Resolve {
        /// The migration.
        migration_id: String,
        /// Whether the source QEMU completed it.
        commit: bool,
    },
    /// `ferry status`: the migrations held here.
    Status,
}

/// Opens a control connection: TLS, then the token handshake bound to it, then the source's
/// request, within [`HANDSHAKE_TIMEOUT`] (the request itself may take a little longer). A peer
/// that speaks plaintext gets a plaintext `Refused` naming the side to upgrade.
pub async fn accept(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
    token: &[u8],
) -> Result<(ControlStream, Request), SessionError> {
    let opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let (mut stream, binding) = open(stream, acceptor).await?;
        let (mut rd, mut wr) = tokio::io::split(&mut stream);
        let version = handshake(&mut rd, &mut wr, token, &binding).await?;
        Ok::<_, SessionError>((stream, version))
    })
    .await;
    let (mut stream, version) = match opened {
        Ok(result) => result?,
        Err(_) => return Err(SessionError::Refused("handshake timed out".into())),
    };
    let (mut rd, mut wr) = tokio::io::split(&mut stream);
    let request = authenticated(&mut rd, &mut wr, version).await?;
    Ok((stream, request))
}

/// TLS over `stream`, and the session's exporter value the proofs are bound to.
async fn open(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
) -> Result<(ControlStream, [u8; crate::tls::EXPORTER_LEN]), SessionError> {
    let mut first = [0u8; 1];
    let peeked = stream.peek(&mut first).await.map_err(ProtocolError::from)?;
    if peeked == 0 {
        return Err(ProtocolError::Io(std::io::ErrorKind::UnexpectedEof.into()).into());
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        return Err(plaintext(stream).await);
    }
    let stream = acceptor
        .accept(stream)
        .await
        .map_err(|e| SessionError::Tls(e.to_string()))?;
    let binding =
        crate::tls::exporter(stream.get_ref().1).map_err(|e| SessionError::Tls(e.to_string()))?;
    Ok((stream, binding))
}

/// A peer that spoke plaintext: a source of protocol version 2 or before. It is told, in its
/// own plaintext framing, which side is old.
async fn plaintext(mut stream: TcpStream) -> SessionError {
    let (mut rd, mut wr) = stream.split();
    let reason = match protocol::read_message::<_, SourceMessage>(&mut rd).await {
        Ok(SourceMessage::Hello { versions, software }) => format!(
            "this agent speaks control protocol versions {:?}, over TLS only; the source ({software}) offered {versions:?} in plaintext: upgrade ferry on the source",
            protocol::SUPPORTED_VERSIONS
        ),
        _ => "this agent speaks the control protocol over TLS only, and the peer sent plaintext: upgrade ferry on the source".to_string(),
    };
    refuse(&mut wr, reason).await
}

/// Reads an authenticated source's request.
async fn authenticated<R, W>(rd: &mut R, wr: &mut W, version: u32) -> Result<Request, SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tracing::debug!(version, "source authenticated");
    let request = tokio::time::timeout(REQUEST_TIMEOUT, protocol::read_message(rd)).await;
    match request {
        Err(_) => Err(refuse(wr, "no request within 30 s of the handshake".into()).await),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(SourceMessage::Prepare { vm, tls })) => Ok(Request::Prepare(Box::new(vm), tls)),
        Ok(Ok(SourceMessage::Check { vm, tls })) => Ok(Request::Check(Box::new(vm), tls)),
        Ok(Ok(SourceMessage::PrepareXl { vm, tls })) => Ok(Request::PrepareXl(Box::new(vm), tls)),
        Ok(Ok(SourceMessage::Resolve {
            migration_id,
            commit,
        })) => Ok(Request::Resolve {
            migration_id,
            commit,
        }),
        Ok(Ok(SourceMessage::Status)) => Ok(Request::Status),
        Ok(Ok(other)) => Err(refuse(
            wr,
            format!(
                "expected Prepare, Check, Resolve or Status, got {}",
                other.kind()
            ),
        )
        .await),
    }
}

/// Serves an authenticated source's request to its end.
pub async fn serve(
    stream: ControlStream,
    request: Request,
    config: &AgentConfig,
    registry: &Arc<Registry>,
) -> Result<(), SessionError> {
    let tcp = stream.get_ref().0;
    let local_ip = tcp.local_addr().map_err(ProtocolError::from)?.ip();
    let source_ip = tcp.peer_addr().map_err(ProtocolError::from)?.ip();
    let (mut rd, mut wr) = tokio::io::split(stream);
    match request {
        Request::Status => {
            let storage = config.storage.clone();
            let listed = tokio::task::spawn_blocking(move || super::inventory::collect(&storage))
                .await
                .unwrap_or_default();
            protocol::write_message(&mut wr, &status_report(listed)).await?;
            Ok(())
        }
        Request::Resolve {
            migration_id,
            commit,
        } => {
            info!(migration = %migration_id, commit, "a recovering source settles a migration");
            let reply = registry.resolve(&migration_id, commit).await;
            info!(migration = %migration_id, reply = reply.kind(), "settled");
            protocol::write_message(&mut wr, &reply).await?;
            Ok(())
        }
        Request::Check(vm, tls) => {
            info!("a dry run checks a migration");
            let checked = match tls_policy(tls, config) {
                Ok(()) => super::received::check(&vm, config, &registry.ledger).await,
                Err(reason) => Err(reason),
            };
            let reply = match checked {
                Ok(checked) => AgentMessage::Checked {
                    argv: checked.argv,
                    storage: config.storage.display().to_string(),
                    free_bytes: super::storage::free_space(&config.storage).unwrap_or(0),
                },
                Err(reason) => return Err(refuse(&mut wr, reason).await),
            };
            protocol::write_message(&mut wr, &reply).await?;
            Ok(())
        }
        Request::PrepareXl(vm, tls) => {
            if !tls && config.require_tls {
                registry.metrics.outcome(Outcome::Refused);
                let reason = "this agent accepts encrypted migrations only (--require-tls): run ferry xl migrate without --insecure".to_string();
                return Err(refuse(&mut wr, reason).await);
            }
            let prepared =
                Received::prepare_xl(&vm, tls, config, registry, local_ip, source_ip).await;
            let received = match prepared {
                Ok(received) => received,
                Err(reason) => {
                    registry.metrics.outcome(Outcome::Refused);
                    return Err(refuse(&mut wr, reason).await);
                }
            };
            super::xl::serve(&mut rd, &mut wr, received, config).await
        }
        Request::Prepare(vm, tls) => {
            if let Err(reason) = tls_policy(tls, config) {
                registry.metrics.outcome(Outcome::Refused);
                return Err(refuse(&mut wr, reason).await);
            }
            let prepared = Received::prepare(&vm, tls, config, registry, local_ip, source_ip).await;
            let received = match prepared {
                Ok(received) => received,
                Err(reason) => {
                    registry.metrics.outcome(Outcome::Refused);
                    return Err(refuse(&mut wr, reason).await);
                }
            };
            let id = received.dir.id.clone();
            let prepared = received.prepared();
            let slot = registry.insert(received);
            let result = drive(&mut rd, &mut wr, &slot, local_ip, prepared, registry).await;
            match result {
                Ok(()) => Ok(()),
                Err(err) => {
                    settle_failed(&id, &slot, &err, registry, &mut wr).await;
                    Err(err)
                }
            }
        }
    }
}

/// The `StatusReport` for `listed`, cut to fit a frame (VM names and disk lists are the
/// source's, of any length).
fn status_report(listed: (Vec<super::inventory::MigrationSummary>, usize)) -> AgentMessage {
    let (mut migrations, mut more) = listed;
    loop {
        let report = AgentMessage::StatusReport {
            migrations: migrations.clone(),
            more,
        };
        let fits = serde_json::to_vec(&report).is_ok_and(|b| b.len() <= protocol::MAX_FRAME);
        if fits || migrations.is_empty() {
            return report;
        }
        let keep = migrations.len() / 2;
        more += migrations.len() - keep;
        migrations.truncate(keep);
    }
}

/// Refuses an `--insecure` migration when the agent requires TLS.
fn tls_policy(tls: bool, config: &AgentConfig) -> Result<(), String> {
    if !tls && config.require_tls {
        return Err("this agent accepts encrypted migrations only (--require-tls): run ferry migrate without --insecure".to_string());
    }
    Ok(())
}

/// A session that ended before the hand-over: roll back, or detach a started destination whose
/// source may still complete (the link dropped: only the source QEMU knows).
async fn settle_failed<W: AsyncWrite + Unpin>(
    id: &str,
    slot: &Slot,
    err: &SessionError,
    registry: &Arc<Registry>,
    wr: &mut W,
) {
    let mut guard = slot.lock().await;
    let Some(received) = guard.as_mut() else {
        return;
    };
    if matches!(err, SessionError::Protocol(_))
        && received.phase() == Phase::Started
        && !received.no_ram_yet().await
    {
        warn!(migration = %id, "control connection lost after the destination started; keeping it paused for the source to settle");
        drop(guard);
        registry.watch(id.to_string(), slot.clone());
        return;
    }
    // The reason goes out first: the source hears why before its NBD connections drop with the
    // rollback (which it would otherwise report as a failed mirror).
    if let SessionError::Refused(reason) = err {
        let _ = protocol::write_message(
            wr,
            &AgentMessage::Refused {
                reason: reason.clone(),
            },
        )
        .await;
    }
    if let Some(mut received) = guard.take() {
        received.rollback().await;
    }
    registry.remove(id);
}

async fn handshake<R, W>(
    rd: &mut R,
    wr: &mut W,
    token: &[u8],
    binding: &[u8],
) -> Result<u32, SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let versions = match protocol::read_message(rd).await? {
        SourceMessage::Hello { versions, .. } => versions,
        other => return Err(refuse(wr, format!("expected Hello, got {}", other.kind())).await),
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
        other => return Err(refuse(wr, format!("expected Auth, got {}", other.kind())).await),
    };
    if !protocol::verify(token, Signer::Source, binding, &nonce, &mac) {
        return Err(refuse(
            wr,
            "authentication failed: the source's token does not match this agent's --token-file, or something between the two relays the connection"
                .into(),
        )
        .await);
    }
    let mac = protocol::sign(token, Signer::Agent, binding, &source_nonce);
    protocol::write_message(wr, &AgentMessage::Authenticated { mac }).await?;
    Ok(version)
}

/// Sends `Refused` (best effort) and returns the matching error.
pub async fn refuse<W: AsyncWrite + Unpin>(wr: &mut W, reason: String) -> SessionError {
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

/// Reads the next message, which must be `want` (or `Abort`).
async fn expect<R: AsyncRead + Unpin>(rd: &mut R, want: &str) -> Result<(), SessionError> {
    receive(rd, want, |msg| (msg.kind() == want).then_some(())).await
}

/// Reads the next message, which must be `want` (or `Abort`), and takes from it what `take`
/// finds; anything else ends the session, naming what was expected.
async fn receive<R, T>(
    rd: &mut R,
    want: &str,
    take: impl FnOnce(&SourceMessage) -> Option<T>,
) -> Result<T, SessionError>
where
    R: AsyncRead + Unpin,
{
    match protocol::read_message(rd).await? {
        SourceMessage::Abort { reason } => Err(SessionError::Aborted(reason)),
        msg => take(&msg)
            .ok_or_else(|| SessionError::Refused(format!("expected {want}, got {}", msg.kind()))),
    }
}

async fn drive<R, W>(
    rd: &mut R,
    wr: &mut W,
    slot: &Slot,
    ip: IpAddr,
    prepared: AgentMessage,
    registry: &Registry,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    protocol::write_message(wr, &prepared).await?;
    // Sent once the source's mirrors run; no timeout on the reads from here (a mirror may take hours),
    // TCP keepalive notices a dead peer.
    let (parallel, prealloc_ram) = receive(rd, "StartDestination", |msg| match msg {
        SourceMessage::StartDestination {
            parallel,
            prealloc_ram,
        } => Some((*parallel, *prealloc_ram)),
        _ => None,
    })
    .await?;
    if !(1..=protocol::MAX_PARALLEL).contains(&parallel) {
        return Err(SessionError::Refused(format!(
            "{parallel} RAM stream connections asked for; 1 to {} are allowed",
            protocol::MAX_PARALLEL
        )));
    }
    let migration_port = {
        let mut guard = slot.lock().await;
        let received = guard.as_mut().ok_or(SessionError::TakenOver)?;
        received
            .start_destination(ip, parallel, prealloc_ram)
            .await
            .map_err(SessionError::Refused)?
    };
    protocol::write_message(wr, &AgentMessage::DestinationReady { migration_port }).await?;

    // The mirror may take hours: no timeout on this read either.
    expect(rd, "Synced").await?;
    {
        let guard = slot.lock().await;
        let received = guard.as_ref().ok_or(SessionError::TakenOver)?;
        received.flush_in_background();
    }

    expect(rd, "Commit").await?;
    // Committed under the slot's lock, taken out only once done: a recovering source that asks
    // meanwhile waits and then reads the outcome from the journal.
    let mut guard = slot.lock().await;
    let received = guard.as_mut().ok_or(SessionError::TakenOver)?;
    let reply = received.commit().await;
    let mut received = guard.take().ok_or(SessionError::TakenOver)?;
    registry.remove(&received.dir.id);
    drop(guard);
    // The VM runs here now whatever happens to the connection: a lost reply is only logged (a
    // recovering source gets the same answer from the journal).
    if let Err(e) = protocol::write_message(wr, &reply).await {
        warn!(error = %crate::error_chain(&e), "could not tell the source the outcome");
    }
    match reply {
        AgentMessage::Running { .. } => {
            received.mark_running();
            received.release_nbd().await;
            Ok(())
        }
        AgentMessage::Abandoned { reason } | AgentMessage::Refused { reason } => {
            Err(SessionError::Refused(reason))
        }
        other => Err(SessionError::Refused(format!(
            "unexpected {}",
            other.kind()
        ))),
    }
}
