//! `ferry agent`: the destination side. A long-running service that accepts migrations from
//! sources holding the same token, receives their disks over NBD into a directory per migration,
//! and starts the destination QEMU from the source's rewritten command line.
//!
//! It must never take a VM down with it: destination QEMUs run detached (they outlive the agent),
//! every migration is journaled in its directory before each step, a failed migration rolls back
//! only what it created, and a restarted agent resumes from the journals (see [`registry`]).
//! SIGTERM drains: no new connection is accepted and the agent exits once every connection in
//! progress has ended; a second SIGTERM exits at once (the journals cover that too).

pub mod destination;
pub mod handshakes;
pub mod inventory;
pub mod metrics;
pub mod policy;
pub mod received;
pub mod registry;
pub mod scrape;
pub mod session;
pub mod space;
pub mod storage;
pub mod xl;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use registry::Registry;

/// How many migrations may be received at once unless `--max-migrations` says otherwise. Each
/// one runs its own destination QEMU (the guest's RAM is taken when it starts) and NBD server,
/// and they share this host's disks and network: past a few, concurrent copies only split the
/// bandwidth, and every one of them takes longer (and stays exposed to failures longer). Four
/// keeps a host that is evacuating a peer busy without thrashing its disks.
pub const DEFAULT_MAX_MIGRATIONS: u16 = 4;
/// How many connections may be in the handshake at once (see [`handshakes`]).
const MAX_HANDSHAKES: usize = 64;

/// What the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where to listen for sources.
    pub listen: SocketAddr,
    /// The storage directory: one subdirectory per migration.
    pub storage: PathBuf,
    /// The shared secret (never sent over the wire).
    pub token: Vec<u8>,
    /// Which QEMU binary and which host files a source may use here.
    pub policy: policy::Policy,
    /// How long a destination whose control connection dropped is kept for the source to settle
    /// it (unless its incoming migration completed: then until the source settles it).
    pub recover_window: Duration,
    /// The control link's TLS configuration: the agent's identity, and with `--tls-ca` the CA
    /// sources' certificates must chain to.
    pub tls: Arc<rustls::ServerConfig>,
    /// Refuse migrations whose disks and RAM would travel in the clear (`--insecure` sources).
    pub require_tls: bool,
    /// Migrations received at once (with their source connected); more are refused.
    pub max_migrations: usize,
    /// How free space is judged (see [`space`]).
    pub space_check: space::SpaceCheck,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The `xl` this agent runs `migrate-receive` with for `ferry xl migrate` (its own choice,
    /// never the source's).
    pub xl_binary: PathBuf,
}

/// A bound agent, ready to [`run`](Agent::run).
pub struct Agent {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    config: Arc<AgentConfig>,
    registry: Arc<Registry>,
}
/// Starting the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The storage directory is unusable.
    #[error("storage directory {path} is not usable: create it or point --storage elsewhere")]
    Storage {
        /// The directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The listen address is unusable.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Checks that the storage directory exists and is a directory.
pub fn check_storage(storage: &std::path::Path) -> Result<(), AgentError> {
    let meta = std::fs::metadata(storage).map_err(|source| AgentError::Storage {
        path: storage.display().to_string(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(AgentError::Storage {
            path: storage.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    // QEMU's QMP and RAM sockets live in `STORAGE/<migration id>/`: a path a unix socket cannot
    // hold would only show when the first migration's QEMU fails to start.
    let absolute = std::path::absolute(storage).unwrap_or_else(|_| storage.to_path_buf());
    let longest = absolute.as_os_str().len() + LONGEST_SOCKET_SUFFIX;
    if longest > crate::tunnel::MAX_SOCKET_PATH {
        return Err(AgentError::Storage {
            path: storage.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "QEMU's sockets under it would be {longest} bytes long, over the {} a \
                     unix socket path can hold; use a shorter path",
                    crate::tunnel::MAX_SOCKET_PATH
                ),
            ),
        });
    }
    Ok(())
}

/// `/<migration id>/qmp.sock` after the storage path: the id is `m<secs>-<8 hex>` (11 digits
/// for the seconds covers the year 5138).
const LONGEST_SOCKET_SUFFIX: usize = "/m12345678901-12345678/qmp.sock".len();

impl Agent {
    /// Checks the storage directory, cleans up leftovers of a previous agent, and binds.
    pub async fn bind(config: AgentConfig) -> Result<Agent, AgentError> {
        check_storage(&config.storage)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| AgentError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let metrics_listener = match config.metrics {
            Some(addr) => Some(
                scrape::bind(addr)
                    .await
                    .map_err(|source| AgentError::Listen { addr, source })?,
            ),
            None => None,
        };
        let metrics = Arc::new(metrics::Metrics::new());
        let registry = Arc::new(Registry::new(
            config.storage.clone(),
            config.recover_window,
            metrics,
        ));
        registry.resume_journals().await;
        Ok(Agent {
            listener,
            metrics_listener,
            config: Arc::new(config),
            registry,
        })
    }

    /// The address the agent listens on (with the real port if 0 was asked for).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The metrics endpoint's address, when `--metrics` was given.
    pub fn metrics_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.metrics_listener.as_ref().map(TcpListener::local_addr)
    }

    /// Accepts migrations until `shutdown` is cancelled, then drains: returns once every
    /// connection in progress has ended.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let max = self.config.max_migrations;
        let sessions = Arc::new(Semaphore::new(max));
        // The endpoint goes on while the agent drains: in-progress migrations are still news.
        let metrics_stop = CancellationToken::new();
        if let Some(listener) = self.metrics_listener.take() {
            let metrics = self.registry.metrics.clone();
            tokio::spawn(scrape::run(listener, metrics, metrics_stop.clone()));
        }
        let _stop_metrics = metrics_stop.drop_guard();
        let policy = self.config.policy.clone();
        tokio::spawn(async move { policy.prewarm().await });
        let handshakes = handshakes::Handshakes::new(MAX_HANDSHAKES);
        let mut tasks = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let place = handshakes.take();
            crate::protocol::tune_socket(&stream);
            let (config, registry, sessions) =
                (self.config.clone(), self.registry.clone(), sessions.clone());
            let span = tracing::info_span!("migration", %peer);
            tasks.spawn(
                async move {
                    // Debug: a monitoring loop running `ferry status` would flood the log.
                    debug!("source connected");
                    let acceptor = tokio_rustls::TlsAcceptor::from(config.tls.clone());
                    let accepted = tokio::select! {
                        _ = place.evicted.cancelled() => {
                            return warn!("closed before it authenticated, to make room for newer connections");
                        }
                        accepted = session::accept(stream, &acceptor, &config.token) => accepted,
                    };
                    drop(place);
                    let (mut stream, request) = match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => return warn!(error = %e, "connection refused"),
                    };
                    let _session = registry.metrics.session();
                    // Only a new migration takes a place: a recovering source or a status
                    // request must get through to a full agent.
                    let permit = match request {
                        session::Request::Prepare(..) | session::Request::PrepareXl(..) => {
                            match sessions.try_acquire_owned() {
                            Ok(permit) => Some(permit),
                            Err(_) => {
                                registry.metrics.outcome(metrics::Outcome::Refused);
                                let reason = format!(
                                    "the agent is receiving {max} migrations already (--max-migrations {max}): retry when one finishes, or raise --max-migrations on the agent"
                                );
                                let _ = session::refuse(&mut stream, reason).await;
                                return;
                            }
                            }
                        }
                        _ => None,
                    };
                    let _permit = permit;
                    match session::serve(stream, request, &config, &registry).await {
                        Ok(()) => debug!("session done"),
                        Err(e) => warn!(error = %e, "migration not received"),
                    }
                }
                .instrument(span),
            );
        }
        // Draining: no new connection is even queued.
        drop(self.listener);
        if !tasks.is_empty() {
            info!(
                connections = tasks.len(),
                "draining: waiting for the connections in progress"
            );
        }
        while tasks.join_next().await.is_some() {}
        if !self.registry.is_empty() {
            info!(
                migrations = self.registry.len(),
                "destinations waiting for their source stay paused; a restarted agent resumes them"
            );
        }
    }
}
