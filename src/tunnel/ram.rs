//! The source's RAM relay: the source QEMU migrates to a unix socket; each connection it opens
//! (the main channel, then one per multifd channel) goes to the agent's RAM listener inside
//! mutual TLS, one after the other in the order QEMU opened them.
//!
//! Every connection is accepted the moment QEMU opens it; towards the agent it is opened in
//! turn, and handed to its splice only once the agent said [`READY`](super::READY), i.e. once
//! the agent connected it to the destination QEMU; only then is the next one opened. A main
//! channel the relay cannot carry is closed: the source QEMU sees its migration fail and keeps
//! the VM (a multifd channel it cannot carry is treated as one cut later, below).
//!
//! With multifd, a cut must reach QEMU on its main channel, never on a multifd channel: QEMU
//! 10.0's switchover waits, holding its big lock, for every multifd thread to confirm a sync,
//! and a thread that finds its channel broken can exit without confirming — the source QEMU
//! then hangs for good with the guest paused and its monitor silent (seen in the fault matrix:
//! destination QEMU killed at pre-switchover, `--parallel 4`). So when a multifd channel's far
//! side fails, the relay closes the main channel towards QEMU and keeps reading (and dropping)
//! what QEMU still writes on the multifd channel until QEMU closes it: QEMU's multifd threads
//! see nothing wrong, its main channel fails, and it ends the migration the way it does with one
//! stream (`failed`, the guest resumed).

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::UnixStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use super::keeper::Keeper;
use super::{timed, Client, Peer, Running, TunnelError, BUFFER};

/// The RAM relay's accept loop.
pub struct Relay;

impl Relay {
    /// Listens on `path` and carries up to `connections` connections to the agent's RAM
    /// `port`; more are refused (QEMU opens exactly as many as it was told). With
    /// `keeper`, each connection is also handed to it (see [`super::keeper`]).
    pub(crate) fn start(
        path: &Path,
        client: Arc<Client>,
        peer: Peer,
        port: u16,
        connections: u32,
        keeper: Option<Keeper>,
    ) -> Result<Running, TunnelError> {
        let listener = super::listen_unix(path)?;
        let failure = super::Failure::default();
        let failed = failure.clone();
        let task = tokio::spawn(
            async move {
                // Every connection is taken (and handed to the keeper) as soon as QEMU opens
                // it, and carried in order by `carry_in_order`: one left waiting in the
                // listener's backlog would be reset if this process died, breaking a multifd
                // channel while QEMU sets them up. ("duplicate yank instance" from a later
                // `migrate` of the same QEMU, seen twice in the fault matrix before, is QEMU's
                // teardown of the previous migration not being done yet: see
                // `SourceQemu::wait_migration_torn_down`.)
                let (queue, queued) = tokio::sync::mpsc::unbounded_channel();
                let accept = async move {
                    let mut taken = 0u32;
                    loop {
                        let qemu = match listener.accept().await {
                            Ok((qemu, _)) => Held(qemu),
                            Err(e) => {
                                warn!(error = %e, "RAM relay cannot accept; it stops");
                                break;
                            }
                        };
                        if taken >= connections {
                            warn!(connections, "the source QEMU opened more RAM connections than asked for; closed");
                            continue;
                        }
                        taken += 1;
                        // QEMU opens its main channel first, then the multifd channels.
                        let main = taken == 1;
                        if let Some(keeper) = &keeper {
                            if let Err(e) = keeper.hold(std::os::fd::AsFd::as_fd(&qemu.0), main) {
                                warn!(error = %e, "the RAM keeper did not take a connection; a killed ferry migrate may leave a multifd source QEMU stuck");
                            }
                        }
                        if queue.send((qemu, main)).is_err() {
                            break;
                        }
                    }
                    // Dropped here (or with this task): the keeper is told the migration is
                    // settled.
                    drop(keeper);
                };
                tokio::join!(accept, carry_in_order(queued, client, peer, port, failed));
            }
            .instrument(tracing::info_span!("ram-relay")),
        );
        Ok(Running {
            task,
            path: path.to_path_buf(),
            failure,
        })
    }
}

/// Carries the connections `queued` in QEMU's order: connection N+1 is opened to the agent only
/// once the agent connected N to the destination QEMU (see [`super`]).
async fn carry_in_order(
    mut queued: tokio::sync::mpsc::UnboundedReceiver<(Held, bool)>,
    client: Arc<Client>,
    peer: Peer,
    port: u16,
    failed: super::Failure,
) {
    // Cancelled when a multifd channel's far side fails: the main channel goes.
    let broken = CancellationToken::new();
    let mut streams = JoinSet::new();
    loop {
        let (qemu, main) = tokio::select! {
            next = queued.recv() => match next {
                Some(next) => next,
                None => break,
            },
            Some(_) = streams.join_next() => continue,
        };
        let (broken, failed) = (broken.clone(), failed.clone());
        if !main {
            crate::faults::hold("source-ram-channel").await;
        }
        match open(&client, &peer, port).await {
            Ok(tls) => {
                streams.spawn(async move {
                    match carry(qemu, tls, main, &broken).await {
                        Ok((sent, returned)) => {
                            debug!(main, sent, returned, "RAM connection closed")
                        }
                        Err(e) => {
                            warn!(main, error = %e, "RAM connection cut");
                            super::record(
                                &failed,
                                format!("a RAM connection to the agent was cut: {e}"),
                            );
                        }
                    }
                });
            }
            Err(e) => {
                let why = crate::error_chain(&e);
                warn!(error = %why, "cannot carry a RAM connection to the agent; the source QEMU's migration fails");
                super::record(&failed, why);
                if !main {
                    // Like a multifd channel cut later: the main channel goes.
                    broken.cancel();
                    streams.spawn(drain(qemu));
                }
            }
        }
    }
    while streams.join_next().await.is_some() {}
}

/// One of the source QEMU's RAM connections. The keeper may hold a copy of it, so closing this
/// copy alone would not end it: dropping it shuts the connection down.
struct Held(UnixStream);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = socket2::SockRef::from(&self.0).shutdown(std::net::Shutdown::Both);
    }
}

/// One connection, carried until both sides end it. The main channel is closed at once when a
/// multifd channel broke; a multifd channel whose far side fails first tells the main channel
/// to close and then takes and drops what QEMU still writes on it until QEMU closes it (see the
/// module doc).
async fn carry<R>(
    mut qemu: Held,
    mut remote: R,
    main: bool,
    broken: &CancellationToken,
) -> std::io::Result<(u64, u64)>
where
    R: AsyncRead + AsyncWrite + Unpin,
{
    if main {
        return tokio::select! {
            carried = super::splice(&mut qemu.0, &mut remote) => carried,
            _ = broken.cancelled() => Err(std::io::Error::other(
                "a multifd channel to the agent broke; the main channel was closed so that the \
                 source QEMU fails the migration on it",
            )),
        };
    }
    let carried = super::splice(&mut qemu.0, &mut remote).await;
    if carried.is_err() {
        broken.cancel();
        drop(remote);
        drain(qemu).await;
    }
    carried
}

/// Reads and drops what the source QEMU writes on a multifd channel until it closes it.
async fn drain(mut qemu: Held) {
    let mut sink = vec![0u8; BUFFER];
    let mut dropped = 0u64;
    while let Ok(n @ 1..) = qemu.0.read(&mut sink).await {
        dropped += n as u64;
    }
    debug!(
        dropped,
        "drained a multifd channel until the source QEMU closed it"
    );
}

/// How long a link that is down is waited out while a RAM connection is opened. The
/// connections of a multifd stream are opened one after the other while the RAM already flows;
/// a cut of a few seconds between two of them must not fail the migration when the same cut
/// under an open connection is ridden out by TCP (fault matrix: RAM / link down 5 s).
const CUT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// A TCP connection to the agent, tried again while the link looks cut (no route to it, or no
/// answer: with a default route the SYNs go elsewhere until the link is back) for at most
/// [`CUT_PATIENCE`]; any other failure (refused: the agent is gone) fails at once.
async fn connect_patiently(peer: &Peer, port: u16) -> Result<tokio::net::TcpStream, TunnelError> {
    let deadline = tokio::time::Instant::now() + CUT_PATIENCE;
    loop {
        let result = peer.connect(port).await;
        let cut = match &result {
            Err(TunnelError::Connect { source, .. }) => matches!(
                source.kind(),
                std::io::ErrorKind::NetworkUnreachable | std::io::ErrorKind::HostUnreachable
            ),
            Err(TunnelError::Timeout(_)) => true,
            _ => false,
        };
        if !cut || tokio::time::Instant::now() >= deadline {
            return result;
        }
        if let Err(e) = &result {
            debug!(error = %e, "the link to the agent looks cut; trying again");
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// The most a RAM connection holds unsent in the kernel (`TCP_NOTSENT_LOWAT`). Without a bound
/// the kernel lets megabytes queue behind a slow link or a busy receiver; QEMU counts them as
/// sent, so it pauses the guest for the switchover thinking that little is left, and the guest
/// then waits for the queue to drain as well. Measured (BENCHMARKS.md, session 9): the guest's
/// pause at the switchover 207 → 120 ms over 4 channels at 400 Mbit/s, 85 → 40 ms over one,
/// 70-82 → 21-31 ms on loopback; total times unchanged. The bound stays well above what a
/// fast link drains between two wake-ups of the relay (128 KiB is 100 µs at 10 Gbit/s).
const UNSENT: u32 = 128 * 1024;

/// TCP, TLS with the client certificate, and the agent's READY.
async fn open(
    client: &Client,
    peer: &Peer,
    port: u16,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, TunnelError> {
    let tcp = connect_patiently(peer, port).await?;
    if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_notsent_lowat(UNSENT) {
        debug!(error = %e, "TCP_NOTSENT_LOWAT refused; the kernel's unsent queue grows as it likes");
    }
    let mut tls = client.handshake(tcp).await?;
    let ready = timed("waiting for the agent to connect the RAM stream", async {
        tls.read_u8()
            .await
            .map_err(super::io("waiting for the agent's READY"))
    })
    .await?;
    if ready != super::READY {
        return Err(TunnelError::Protocol(format!(
            "the agent's RAM port sent {ready:#04x} instead of READY"
        )));
    }
    Ok(tls)
}
