//! The source's NBD relay: QEMU's nbd nodes connect to a unix socket, and each connection goes
//! to the agent's NBD server inside TLS.
//!
//! ```text
//!  QEMU (unix)                 relay                          agent's NBD server (TCP)
//!     │                          │◄── NBDMAGIC IHAVEOPT flags ──│
//!     │◄── the same 18 bytes ────│                              │
//!     │── client flags ─────────►│── client flags ─────────────►│
//!     │                          │── NBD_OPT_STARTTLS ─────────►│
//!     │                          │◄── NBD_REP_ACK ──────────────│
//!     │                          │══ TLS handshake (client cert) │
//!     │── options (GO, …), then transmission, spliced both ways inside TLS ──►
//! ```
//!
//! QEMU believes it talks to a server that needs no TLS; the agent's server sees a client that
//! started TLS before any other option, which is what it requires. Nothing QEMU sends is parsed:
//! the relay only reads the server's fixed-size greeting and its reply to STARTTLS.

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinSet;
use tracing::{debug, warn, Instrument};

use super::{timed, Client, Peer, Running, TunnelError};
use crate::nbd::wire::{opt, NBDMAGIC, OPTION_REPLY_MAGIC};

/// `IHAVEOPT`: the greeting's second magic, and the prefix of every option.
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Handshake flag: fixed newstyle (the server understands options and replies to them).
const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Option reply: acknowledged.
const REP_ACK: u32 = 1;
/// Option replies with this bit set are errors.
const REP_ERROR_BIT: u32 = 1 << 31;
/// The most of an error reply's message the relay reads (the agent's are short sentences).
const MAX_ERROR_TEXT: u32 = 4096;

/// The NBD relay's accept loop.
pub struct Relay;

impl Relay {
    /// Listens on `path` and relays each connection to the agent's NBD server at `port`.
    pub(crate) fn start(
        path: &Path,
        client: Arc<Client>,
        peer: Peer,
        port: u16,
    ) -> Result<Running, TunnelError> {
        let listener = super::listen_unix(path)?;
        let failure = super::Failure::default();
        let failed = failure.clone();
        let task = tokio::spawn(
            async move {
                // Owned by this task: aborting the relay aborts every connection.
                let mut connections = JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((mut qemu, _)) => {
                                let (client, peer) = (client.clone(), peer.clone());
                                let failed = failed.clone();
                                connections.spawn(async move {
                                    // QEMU only sees its socket close: the reason is kept for
                                    // the operator's error line before QEMU can report it.
                                    let tls = match open(&mut qemu, &client, &peer, port).await {
                                        Ok(tls) => tls,
                                        Err(e) => {
                                            let why = crate::error_chain(&e);
                                            warn!(error = %why, "cannot carry an NBD connection to the agent; the mirror fails");
                                            super::record(&failed, why);
                                            return;
                                        }
                                    };
                                    // Once carried, a cut is the mirror's I/O error, which the
                                    // driver explains from the agent's side when it can; the
                                    // normal end (the node removed, the server stopped) also
                                    // lands here.
                                    match super::splice(qemu, tls).await {
                                        Ok((up, down)) => debug!(up, down, "NBD connection closed"),
                                        Err(e) => debug!(error = %e, "NBD connection ended"),
                                    }
                                });
                            }
                            Err(e) => {
                                warn!(error = %e, "NBD relay cannot accept; it stops");
                                break;
                            }
                        },
                        Some(_) = connections.join_next() => {}
                    }
                }
                while connections.join_next().await.is_some() {}
            }
            .instrument(tracing::info_span!("nbd-relay")),
        );
        Ok(Running {
            task,
            path: path.to_path_buf(),
            failure,
        })
    }
}

/// One connection up to TLS with the agent: TCP, the greeting, STARTTLS, the handshake.
async fn open(
    qemu: &mut UnixStream,
    client: &Client,
    peer: &Peer,
    port: u16,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TunnelError> {
    let mut tcp = peer.connect(port).await?;
    timed("the NBD greeting", start_tls(qemu, &mut tcp)).await?;
    client.handshake(tcp).await
}

/// Passes the greeting and QEMU's flags through, then starts TLS with the agent.
async fn start_tls(qemu: &mut UnixStream, tcp: &mut TcpStream) -> Result<(), TunnelError> {
    let mut greeting = [0u8; 18];
    tcp.read_exact(&mut greeting)
        .await
        .map_err(super::io("reading the agent's NBD greeting"))?;
    let magic = u64::from_be_bytes(greeting[0..8].try_into().unwrap_or_default());
    let ihaveopt = u64::from_be_bytes(greeting[8..16].try_into().unwrap_or_default());
    let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if magic != NBDMAGIC || ihaveopt != IHAVEOPT || flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(TunnelError::Protocol(
            "the agent's NBD port did not greet as a fixed-newstyle NBD server: is it a ferry agent of the same version?".into(),
        ));
    }
    qemu.write_all(&greeting)
        .await
        .map_err(super::io("passing the NBD greeting to QEMU"))?;
    let mut client_flags = [0u8; 4];
    qemu.read_exact(&mut client_flags)
        .await
        .map_err(super::io("reading QEMU's NBD client flags"))?;
    let mut out = Vec::with_capacity(20);
    out.extend_from_slice(&client_flags);
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt::STARTTLS.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    tcp.write_all(&out)
        .await
        .map_err(super::io("asking the agent for NBD_OPT_STARTTLS"))?;
    let mut reply = [0u8; 20];
    tcp.read_exact(&mut reply)
        .await
        .map_err(super::io("reading the agent's STARTTLS reply"))?;
    let magic = u64::from_be_bytes(reply[0..8].try_into().unwrap_or_default());
    let option = u32::from_be_bytes(reply[8..12].try_into().unwrap_or_default());
    let kind = u32::from_be_bytes(reply[12..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(reply[16..20].try_into().unwrap_or_default());
    if magic != OPTION_REPLY_MAGIC || option != opt::STARTTLS {
        return Err(TunnelError::Protocol(
            "the agent's NBD server answered STARTTLS with something else".into(),
        ));
    }
    if kind & REP_ERROR_BIT != 0 {
        let mut text = vec![0u8; len.min(MAX_ERROR_TEXT) as usize];
        let _ = tcp.read_exact(&mut text).await;
        return Err(TunnelError::Protocol(format!(
            "the agent's NBD server refused STARTTLS (reply {kind:#x}: {})",
            String::from_utf8_lossy(&text)
        )));
    }
    if kind != REP_ACK || len != 0 {
        return Err(TunnelError::Protocol(format!(
            "the agent's NBD server answered STARTTLS with reply {kind:#x} of {len} bytes, not an acknowledgement"
        )));
    }
    Ok(())
}
