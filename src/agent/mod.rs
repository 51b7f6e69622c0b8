//! `ferry agent`: the destination side. A long-running service that accepts migrations from
//! sources holding the same token, receives their disks over NBD into a directory per migration,
//! and starts the destination QEMU from the source's rewritten command line.
//!
//! It must never take a VM down with it: destination QEMUs are daemonized (they outlive the agent),
//! a failed migration rolls back only what it created, and the agent keeps accepting the next one.
//! On start it cleans up after migrations a previous agent left half-done (see [`storage::Phase`]).

pub mod destination;
pub mod policy;
pub mod session;
pub mod storage;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

/// How many migrations may be received at once.
const MAX_SESSIONS: usize = 8;

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
}

/// A bound agent, ready to [`run`](Agent::run).
pub struct Agent {
    listener: TcpListener,
    config: Arc<AgentConfig>,
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

impl Agent {
    /// Checks the storage directory, cleans up leftovers of a previous agent, and binds.
    pub async fn bind(config: AgentConfig) -> Result<Agent, AgentError> {
        let meta = std::fs::metadata(&config.storage).map_err(|source| AgentError::Storage {
            path: config.storage.display().to_string(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(AgentError::Storage {
                path: config.storage.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        recover(&config.storage);
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| AgentError::Listen {
                    addr: config.listen,
                    source,
                })?;
        Ok(Agent {
            listener,
            config: Arc::new(config),
        })
    }

    /// The address the agent listens on (with the real port if 0 was asked for).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts migrations until `shutdown` is cancelled. Sessions in progress keep running until
    /// they end on their own.
    pub async fn run(self, shutdown: CancellationToken) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS));
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                warn!(%peer, "too many migrations at once; dropping connection");
                continue;
            };
            crate::protocol::tune_socket(&stream);
            let config = self.config.clone();
            let span = tracing::info_span!("migration", %peer);
            tokio::spawn(
                async move {
                    info!("source connected");
                    match session::run(stream, &config).await {
                        Ok(()) => info!("migration received; VM running here"),
                        Err(e) => warn!(error = %e, "migration not received"),
                    }
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }
}

/// Cleans up migration directories a previous agent left behind: a VM that runs here is kept;
/// anything else (its QEMU killed) is removed.
fn recover(storage: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(storage) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        match storage::read_phase(&dir) {
            Some(storage::Phase::Running) | None => continue,
            Some(storage::Phase::Receiving) => {
                if let Some(pid) = std::fs::read_to_string(dir.join("qemu.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                {
                    destination::kill_if_ours(pid, &dir);
                }
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => info!(dir = %dir.display(), "removed an unfinished migration"),
                    Err(e) => {
                        warn!(dir = %dir.display(), error = %e, "cannot remove an unfinished migration")
                    }
                }
            }
        }
    }
}
