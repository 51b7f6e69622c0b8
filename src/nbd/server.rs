//! The server: a listener, a bounded set of connection tasks, exports added and removed at run
//! time, and a graceful stop.
//!
//! Lifecycle of a connection: accepted (refused at once when `max_connections` are open) →
//! handshake (with `tls` configured: STARTTLS and the TLS handshake first), bounded by
//! `handshake_timeout` → transmission until the client leaves or its export is stopped.
//! Stopping an export (removal) or the server (shutdown) cancels a token: handshakes are
//! dropped, transmissions stop reading and finish what they already read (over TLS the session
//! then ends with `close_notify`). Only then is the file flushed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use super::backend::Backend;
use super::connection::{self, Bounds};
use super::export::{ExportState, Registry};
use super::handshake::{self, Outcome, Policy};
use super::wire::{MAX_PAYLOAD, MAX_STRING};

/// An export to serve: an existing raw file or block device under a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub name: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// Server limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections open at once (handshaking or transmitting); more are closed on accept.
    pub max_connections: usize,
    /// A client that has not reached the transmission phase by then is dropped.
    pub handshake_timeout: Duration,
    /// Requests one connection may have in flight; the socket is not read beyond that.
    pub max_requests_per_connection: usize,
    /// Bytes of write payloads and read data one connection may hold (at least 32 MiB).
    pub max_buffered_bytes_per_connection: usize,
    /// How long a stopping connection may take to hand its last replies to the client.
    pub shutdown_grace: Duration,
    /// Whether `NBD_OPT_LIST` names the exports. Off by default: where export names are
    /// unguessable (the agent's), the name is the only thing between a client and a disk, and a
    /// list would hand it out. `ferry nbd-serve` turns it on (its operator picked the names).
    pub list_exports: bool,
    /// The only address clients may connect from (the agent's: the source host's), or any.
    /// Others are closed on accept, before the handshake: an export name is a secret, but it
    /// should not be the only thing between a stranger and a disk.
    pub allowed_peer: Option<std::net::IpAddr>,
    /// TLS, required of every client when set: before `NBD_OPT_STARTTLS` every option is
    /// refused (`NBD_REP_ERR_TLS_REQD`) and `NBD_OPT_EXPORT_NAME` closes the connection. A
    /// configuration with a client verifier (the agent's, from
    /// `tls::migration::MigrationCredentials::nbd_server_config`) also requires a client
    /// certificate that its CA signed.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Where requests, errors and written bytes are counted.
    pub stats: Arc<super::NbdStats>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 64,
            handshake_timeout: Duration::from_secs(10),
            max_requests_per_connection: 64,
            max_buffered_bytes_per_connection: 2 * MAX_PAYLOAD as usize,
            shutdown_grace: Duration::from_secs(30),
            list_exports: false,
            allowed_peer: None,
            tls: None,
            stats: Arc::default(),
        }
    }
}

/// What can go wrong serving NBD.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot listen on {addr}: pick a free port or another address")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve {path} as export {name:?}: it must be an existing raw file or block device the server can open")]
    Open {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("export name {name:?} is already served: pick another name")]
    DuplicateExport { name: String },
    #[error("export name {name:?} is invalid: it must be at most 4096 bytes of UTF-8 without NUL")]
    InvalidName { name: String },
    #[error("no export named {name:?} is served")]
    UnknownExport { name: String },
    #[error("cannot flush export {name:?} ({path}) to stable storage: writes acknowledged to clients may be lost")]
    Flush {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the NBD server is shut down")]
    ShutDown,
}

/// A running NBD server. Cheap to clone; dropping the last clone stops accepting connections
/// (without the flush [`NbdServer::shutdown`] does).
#[derive(Clone, Debug)]
pub struct NbdServer {
    handle: Arc<Handle>,
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

/// What the accept loop and connection tasks share.
#[derive(Debug)]
struct Shared {
    registry: Registry,
    config: ServerConfig,
    stop: CancellationToken,
    connections: TaskTracker,
}

impl NbdServer {
    /// Binds `addr` (port 0 picks a free port, see [`NbdServer::local_addr`]) and starts
    /// serving in a background task.
    pub async fn bind(addr: SocketAddr, config: ServerConfig) -> Result<NbdServer, NbdError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| NbdError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| NbdError::Bind { addr, source })?;
        let shared = Arc::new(Shared {
            registry: Registry::default(),
            config,
            stop: CancellationToken::new(),
            connections: TaskTracker::new(),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        info!(%local_addr, tls = shared.config.tls.is_some(), "NBD server listening");
        Ok(NbdServer {
            handle: Arc::new(Handle {
                shared,
                local_addr,
                accept: Mutex::new(Some(accept)),
            }),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr
    }

    /// Opens `export.path` now and serves it under `export.name` from now on.
    pub fn add_export(&self, export: Export) -> Result<(), NbdError> {
        let shared = &self.handle.shared;
        if shared.stop.is_cancelled() {
            return Err(NbdError::ShutDown);
        }
        let Export {
            name,
            path,
            read_only,
        } = export;
        if name.len() > MAX_STRING || name.contains('\0') {
            return Err(NbdError::InvalidName { name });
        }
        if shared.registry.get(&name).is_some() {
            return Err(NbdError::DuplicateExport { name });
        }
        let backend = match Backend::open(&path, read_only) {
            Ok(backend) => backend,
            Err(source) => return Err(NbdError::Open { name, path, source }),
        };
        let state = ExportState {
            name,
            path,
            read_only,
            backend,
            stop: shared.stop.child_token(),
            work: TaskTracker::new(),
        };
        info!(export = %state.name, path = %state.path.display(), size = state.backend.size(), read_only, "export added");
        shared
            .registry
            .insert(Arc::new(state))
            .map_err(|state| NbdError::DuplicateExport {
                name: state.name.clone(),
            })
    }

    /// Stops offering export `name`, lets its in-flight requests finish, closes its
    /// connections and flushes the file (`fdatasync`).
    pub async fn remove_export(&self, name: &str) -> Result<(), NbdError> {
        let export =
            self.handle
                .shared
                .registry
                .remove(name)
                .ok_or_else(|| NbdError::UnknownExport {
                    name: name.to_string(),
                })?;
        retire(export).await
    }

    /// Graceful stop: no new connections, in-flight requests finish, every export is flushed.
    /// Returns the first flush error, after trying every export.
    pub async fn shutdown(self) -> Result<(), NbdError> {
        let shared = &self.handle.shared;
        shared.stop.cancel();
        let accept = self
            .handle
            .accept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(accept) = accept {
            let _ = accept.await;
        }
        shared.connections.close();
        shared.connections.wait().await;
        let mut result = Ok(());
        for export in shared.registry.drain() {
            if let Err(e) = retire(export).await {
                warn!(error = %e, "flush at shutdown failed");
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        info!("NBD server stopped");
        result
    }
}

/// Stops an export already taken out of the registry, waits for its work, flushes it.
async fn retire(export: Arc<ExportState>) -> Result<(), NbdError> {
    export.stop.cancel();
    export.work.close();
    export.work.wait().await;
    let flushed = export.clone();
    let result = tokio::task::spawn_blocking(move || flushed.backend.flush())
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    info!(export = %export.name, "export removed");
    result.map_err(|source| NbdError::Flush {
        name: export.name.clone(),
        path: export.path.clone(),
        source,
    })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(shared.config.max_connections.max(1)));
    loop {
        let accepted = tokio::select! {
            biased;
            () = shared.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: wait a little rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if shared
            .config
            .allowed_peer
            .is_some_and(|ip| ip != peer.ip().to_canonical())
        {
            warn!(%peer, "a connection from an address this server does not serve; closed");
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(%peer, limit = shared.config.max_connections, "connection limit reached; closing new connection");
            continue;
        };
        let span = tracing::info_span!("nbd", %peer);
        let task_shared = shared.clone();
        shared.connections.spawn(
            async move {
                serve_connection(socket, &task_shared).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

async fn serve_connection(socket: TcpStream, shared: &Shared) {
    // Replies are small and latency-bound; never let Nagle hold them back.
    if let Err(e) = socket.set_nodelay(true) {
        debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let acceptor = shared.config.tls.clone().map(TlsAcceptor::from);
    let policy = Policy {
        registry: &shared.registry,
        list_exports: shared.config.list_exports,
        tls: acceptor.as_ref(),
    };
    let negotiated = tokio::select! {
        biased;
        () = shared.stop.cancelled() => return,
        n = tokio::time::timeout(
            shared.config.handshake_timeout,
            handshake::negotiate(socket, &policy),
        ) => n,
    };
    let (session, transport) = match negotiated {
        Err(_) => {
            info!(timeout = ?shared.config.handshake_timeout, "handshake not finished in time; closing");
            return;
        }
        Ok(Err(e)) => {
            info!(error = %crate::error_chain(&e), "handshake failed; closing");
            return;
        }
        Ok(Ok(Outcome::Aborted)) => {
            debug!("client aborted the handshake");
            return;
        }
        Ok(Ok(Outcome::Transmission(session, transport))) => (session, transport),
    };
    let export = session.export.clone();
    let _token = export.work.token();
    // Removal cancels before it waits: a connection that took its token late sees the cancel.
    if export.stop.is_cancelled() {
        return;
    }
    debug!(export = %export.name, style = ?session.style, flags = session.flags, "transmission");
    let config = &shared.config;
    let bounds = Bounds {
        max_requests: config.max_requests_per_connection,
        max_bytes: config.max_buffered_bytes_per_connection,
        grace: config.shutdown_grace,
        stats: config.stats.clone(),
    };
    connection::serve(transport, session, bounds).await;
}
