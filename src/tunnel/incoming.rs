//! The agent's RAM listener: TLS on an ephemeral port, the migration's client certificate
//! required, each connection that passes forwarded to the destination QEMU's unix socket.
//!
//! Hostile peers: a connection from another address than the source's is closed on accept; one
//! without the certificate fails its handshake and is dropped; a handshake has
//! [`HANDSHAKE_TIMEOUT`](super::HANDSHAKE_TIMEOUT) and at most [`MAX_HANDSHAKES`] run at once:
//! a new connection pushes out the oldest pending handshake, so idle connections can neither
//! keep the source out nor make the agent hold more than that many.
//! Handshakes run concurrently; the forwarding to QEMU is sequential, one connection at a time,
//! each confirmed to the source by [`READY`](super::READY) before the source opens the next.
//! After `connections` forwarded connections the port is closed. Nothing is read from a peer
//! outside rustls' own (bounded) handshake parsing, through a read-ahead buffer of
//! [`CIPHERTEXT_BUFFER`](crate::tls::CIPHERTEXT_BUFFER) per connection: at most 16 such buffers
//! (4 MiB) for strangers.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::tls::BufferedTls;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tracing::{debug, info, warn, Instrument};

use super::{timed, TunnelError};

/// How many TLS handshakes may be in progress at once.
pub const MAX_HANDSHAKES: usize = 16;

/// The listener and every stream it forwards; dropping it closes them all.
#[derive(Debug)]
pub struct Listener {
    port: u16,
    task: JoinHandle<()>,
}

impl Listener {
    /// Listens on an ephemeral port of `ip` for at most `connections` connections from `peer`
    /// (any peer when None) that present a certificate `config` accepts, and forwards them to
    /// `socket`.
    pub async fn start(
        ip: IpAddr,
        peer: Option<IpAddr>,
        config: Arc<rustls::ServerConfig>,
        socket: &Path,
        connections: u32,
    ) -> Result<Listener, TunnelError> {
        super::check_socket_path(socket)?;
        let listener = TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .map_err(super::io("listening for the RAM stream"))?;
        let port = listener
            .local_addr()
            .map_err(super::io("listening for the RAM stream"))?
            .port();
        let accept = Accept {
            peer,
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            socket: socket.to_path_buf(),
            connections,
        };
        let task = tokio::spawn(
            accept
                .run(listener)
                .instrument(tracing::info_span!("ram-incoming", port)),
        );
        Ok(Listener { port, task })
    }

    /// The port the source's relay connects to.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Accept {
    peer: Option<IpAddr>,
    acceptor: tokio_rustls::TlsAcceptor,
    socket: PathBuf,
    connections: u32,
}

impl Accept {
    async fn run(self, listener: TcpListener) {
        let mut listener = Some(listener);
        let mut pending: VecDeque<AbortHandle> = VecDeque::new();
        // Unbounded, so that a handshake that passed is never left waiting (and evictable) here;
        // only holders of the client certificate ever get a message in.
        let (done_tx, mut done) = mpsc::unbounded_channel::<(SocketAddr, BufferedTls<TcpStream>)>();
        // Handshakes in progress and streams being carried: aborted with this task.
        let mut tasks = JoinSet::new();
        let mut forwarded = 0u32;
        loop {
            tokio::select! {
                accepted = accept(listener.as_ref()) => {
                    let (tcp, addr) = match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // Out of descriptors, or a peer gone before its accept: try again.
                            warn!(error = %e, "cannot accept a RAM connection");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    if self.peer.is_some_and(|ip| ip != addr.ip().to_canonical()) {
                        warn!(peer = %addr, "a RAM connection from an address other than the source's; closed");
                        continue;
                    }
                    pending.retain(|h| !h.is_finished());
                    if pending.len() >= MAX_HANDSHAKES {
                        if let Some(oldest) = pending.pop_front() {
                            warn!("too many TLS handshakes on the RAM port; the oldest is dropped");
                            oldest.abort();
                        }
                    }
                    let _ = tcp.set_nodelay(true);
                    let (acceptor, done_tx) = (self.acceptor.clone(), done_tx.clone());
                    pending.push_back(tasks.spawn(async move {
                        // Read ahead under rustls, as the NBD server does (a sixth of the
                        // `recv` calls measured on a 2 GiB stream).
                        let shaken = timed("the TLS handshake", async {
                            crate::tls::accept_buffered(&acceptor, tcp).await.map_err(super::io("the TLS handshake"))
                        })
                        .await;
                        match shaken {
                            Ok(tls) => {
                                let _ = done_tx.send((addr, tls));
                            }
                            Err(e) => warn!(peer = %addr, error = %crate::error_chain(&e), "RAM connection refused"),
                        }
                    }));
                }
                Some((addr, tls)) = done.recv() => {
                    match self.forward(tls).await {
                        Ok(carry) => {
                            forwarded += 1;
                            info!(peer = %addr, n = forwarded, "RAM connection forwarded to the destination QEMU");
                            tasks.spawn(carry);
                            if forwarded >= self.connections {
                                // Every channel is here: nobody else gets in.
                                listener = None;
                            }
                        }
                        Err(e) => warn!(peer = %addr, error = %crate::error_chain(&e), "cannot forward a RAM connection"),
                    }
                }
                Some(_) = tasks.join_next() => {}
            }
        }
    }

    /// Connects to the destination QEMU and says READY; returns the splice to run.
    async fn forward(
        &self,
        mut tls: BufferedTls<TcpStream>,
    ) -> Result<impl std::future::Future<Output = ()>, TunnelError> {
        let qemu = timed("connecting to the destination QEMU", async {
            UnixStream::connect(&self.socket)
                .await
                .map_err(super::io("connecting to the destination QEMU's RAM socket"))
        })
        .await?;
        timed("saying READY", async {
            tls.write_all(&[super::READY])
                .await
                .map_err(super::io("saying READY"))?;
            tls.flush().await.map_err(super::io("saying READY"))
        })
        .await?;
        Ok(async move {
            match super::splice(tls, qemu).await {
                Ok((received, returned)) => debug!(received, returned, "RAM connection closed"),
                Err(e) => warn!(error = %e, "RAM connection cut"),
            }
        })
    }
}

/// The next connection, or never once the listener is closed.
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}
