//! The encrypted data path: with TLS, neither QEMU speaks TLS. Each QEMU talks plaintext to a
//! unix socket on its own host, and ferry carries the bytes between the hosts over rustls with
//! the migration's certificates ([`crate::tls::migration`]).
//!
//! ```text
//!  source host                                              destination host
//!  source QEMU ── nbd node {unix: DIR/nbd.sock} ──► nbd::Relay ══ TCP: greeting, flags,
//!                                                     NBD_OPT_STARTTLS, TLS, QEMU's options …
//!                                                     ═══════════════════════════════════► agent NBD server
//!  source QEMU ── migrate unix:DIR/ram.sock ──► ram::Relay ══ TLS (client cert) ══► incoming::Listener
//!               (one connection per channel,            ◄── READY (1 byte) ──     connect MIGDIR/ram.sock
//!                accept order kept)                                              ──► destination QEMU
//!                                                                      migrate-incoming unix:MIGDIR/ram.sock
//! ```
//!
//! Why ferry and not QEMU: QEMU encrypts in its main loop (the mirror) and writes one TLS record
//! and one syscall per 4 KiB page (the RAM), which made an encrypted migration 1.3x a plaintext
//! one; a relay with big buffers encrypts 16 KiB records off QEMU's threads. The client key stays
//! in this process's memory: nothing is written to disk, and QEMU holds no credentials.
//!
//! Order of the RAM connections: QEMU 7.2's destination takes the first connection as the main
//! channel. The source relay opens connection N+1 only after the agent said READY on
//! connection N, which it says after connecting N to the destination QEMU: the destination sees
//! the source's order whatever the timing of the handshakes.
//!
//! The relays live as long as the process that runs them: if `ferry migrate` or the agent dies,
//! the streams are cut and the source QEMU's migration fails (it keeps or resumes the VM), unless
//! it already reached `completed` (then the destination loaded everything; see `migrate::settle`).
//! With multifd the cut must reach the source QEMU on its main channel first (QEMU 10.0 can hang
//! on a broken multifd channel): the RAM relay sees to it while it lives ([`ram`]), and a
//! [`keeper`] process when `ferry migrate` is killed.
//! Nothing here must ever hold a stream open past its migration, or panic on what a peer sends.

pub mod incoming;
pub mod keeper;
pub mod nbd;
pub mod ram;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::tls::migration::ClientBundle;
use crate::tls::TlsError;

/// Each direction's copy buffer: QEMU writes the RAM in large batches, and a big buffer lets
/// rustls fill whole 16 KiB records and write many of them per syscall.
pub const BUFFER: usize = 256 * 1024;
/// How long a peer may take over a TLS handshake (and the relay over the NBD greeting); a
/// peer that stalls is dropped, the listener goes on.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The byte the agent sends on a RAM connection once it is connected to the destination QEMU.
pub const READY: u8 = 0x52;
/// The socket the RAM stream goes through, in the source's tunnel directory and in the agent's
/// migration directory.
pub const RAM_SOCKET: &str = "ram.sock";
/// The socket the NBD nodes connect to, in the source's tunnel directory.
pub const NBD_SOCKET: &str = "nbd.sock";
/// The longest path a unix socket can have (`sun_path` holds 108 bytes with the NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;

/// How many connections a RAM stream of `parallel` channels opens: one, or with multifd the
/// main channel and one per multifd channel.
pub fn ram_connections(parallel: u32) -> u32 {
    if parallel > 1 {
        parallel.saturating_add(1)
    } else {
        1
    }
}

/// A relay that could not start or carry a connection, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The client configuration could not be made from the agent's certificates.
    #[error("cannot use the migration's certificates")]
    Tls(#[from] TlsError),
    /// The name in the bundle is not a valid server name.
    #[error("the agent sent an invalid TLS host name {0:?}")]
    Hostname(String),
    /// A unix socket path is too long for the kernel.
    #[error(
        "socket path {0} is longer than 107 bytes: use a shorter --state-dir or storage directory"
    )]
    PathTooLong(PathBuf),
    /// A local socket could not be made.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The agent could not be reached.
    #[error("cannot connect to the agent at {addr}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The peer did not finish in time.
    #[error("{0} timed out after {secs} s", secs = HANDSHAKE_TIMEOUT.as_secs())]
    Timeout(&'static str),
    /// The peer broke the protocol.
    #[error("{0}")]
    Protocol(String),
    /// Reading or writing failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> TunnelError {
    move |source| TunnelError::Io { what, source }
}

/// `fut`, or [`TunnelError::Timeout`] after [`HANDSHAKE_TIMEOUT`].
async fn timed<T>(
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, TunnelError>>,
) -> Result<T, TunnelError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| TunnelError::Timeout(what))?
}

/// The source's TLS client: the migration's client certificate, and the destination checked
/// against the migration's CA and the name the agent put in its certificate.
#[derive(Clone)]
pub struct Client {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl Client {
    /// From the bundle the agent sent over the control link (kept in memory only).
    pub fn new(bundle: &ClientBundle) -> Result<Client, TunnelError> {
        use rustls::pki_types::pem::PemObject;
        let ca = rustls::pki_types::CertificateDer::pem_slice_iter(bundle.ca_cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                TunnelError::Tls(TlsError::Empty {
                    what: "CA certificate",
                    path: "(client bundle)".into(),
                })
            })?;
        let identity = bundle.identity()?;
        let config = crate::tls::client_config_with(
            crate::tls::bulk_provider(),
            Some(crate::tls::roots(ca)?),
            Some(&identity),
        )?;
        let name = ServerName::try_from(bundle.hostname.clone())
            .map_err(|_| TunnelError::Hostname(bundle.hostname.clone()))?;
        Ok(Client {
            connector: tokio_rustls::TlsConnector::from(config),
            name,
        })
    }

    /// TLS over `tcp`, within [`HANDSHAKE_TIMEOUT`].
    async fn handshake(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, TunnelError> {
        let mut tls = timed("the TLS handshake with the agent", async {
            self.connector
                .connect(self.name.clone(), tcp)
                .await
                .map_err(io("the TLS handshake with the agent"))
        })
        .await?;
        // rustls holds 64 KiB of records by default, so a 256 KiB read from QEMU went out in
        // four `writev` calls; with room for the whole buffer it goes in one.
        tls.get_mut().1.set_buffer_limit(Some(BUFFER));
        Ok(tls)
    }
}

/// Where the relays connect: the agent's host, from this end's address on the control
/// connection when known.
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    host: String,
    local: Option<std::net::IpAddr>,
}

impl Peer {
    /// A TCP connection to the agent's `port` with Nagle off (NBD replies and the RAM stream's
    /// return path are small messages someone waits for).
    async fn connect(&self, port: u16) -> Result<tokio::net::TcpStream, TunnelError> {
        let addr = format!("{}:{port}", crate::protocol::uri_host(&self.host));
        let fail = |source| TunnelError::Connect {
            addr: addr.clone(),
            source,
        };
        let tcp = timed("connecting to the agent", async {
            let Some(local) = self.local else {
                return tokio::net::TcpStream::connect(&addr).await.map_err(fail);
            };
            let target = tokio::net::lookup_host(&addr)
                .await
                .map_err(fail)?
                .find(|a| a.is_ipv4() == local.is_ipv4())
                .ok_or_else(|| {
                    fail(std::io::Error::new(
                        std::io::ErrorKind::AddrNotAvailable,
                        format!("no address of the control connection's family ({local})"),
                    ))
                })?;
            let socket = match local {
                std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            }
            .map_err(fail)?;
            socket
                .bind(std::net::SocketAddr::new(local, 0))
                .map_err(fail)?;
            socket.connect(target).await.map_err(fail)
        })
        .await?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }
}

/// Has this process keep the memory it frees for its next allocations instead of handing it
/// back to the kernel at once. For a process that relays encrypted streams (`ferry migrate`):
/// rustls makes a buffer for each TLS record it seals and frees it once written, and glibc gave
/// a thread heap's freed top back (`madvise`, a TLB flush on every CPU) as soon as more than its
/// adaptive threshold was free, so the next records faulted the same pages in again: a quarter
/// of `ferry migrate`'s CPU over an encrypted migration (`perf`), the filled guest's migration
/// 8% slower (BENCHMARKS.md, session 13). A relay lives for one migration and its peak is a few
/// buffers per connection, so keeping that peak costs little (largest resident size 14.5 →
/// 15.1 MiB). Not for the agent, a long-running service (measured: no gain there). Without
/// glibc, nothing to do (tests/freed_memory.rs checks the effect).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets allocator parameters (thread-safe in glibc); no pointer is
    // involved, and a refused value just leaves glibc's default.
    #[allow(unsafe_code)]
    unsafe {
        // Setting the trim threshold turns glibc's adaptive thresholds off, so the mmap
        // threshold is set too, to the most the adaptive rule would reach (32 MiB on 64-bit):
        // buffers below it come from the heap and are reused.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// Copies both ways until both sides are done; returns the bytes copied (a → b, b → a).
pub async fn splice<A, B>(mut a: A, mut b: B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUFFER, BUFFER).await
}

/// A unix socket at `path` (a leftover file of that name is replaced), 0600 by the directory's
/// 0700: only this user's processes may connect.
fn listen_unix(path: &Path) -> Result<UnixListener, TunnelError> {
    check_socket_path(path)?;
    match std::fs::remove_file(path) {
        Ok(()) => debug!(path = %path.display(), "replaced a leftover socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(TunnelError::Listen {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    UnixListener::bind(path).map_err(|source| TunnelError::Listen {
        path: path.to_path_buf(),
        source,
    })
}

/// Refuses a socket path the kernel would truncate.
pub fn check_socket_path(path: &Path) -> Result<(), TunnelError> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(TunnelError::PathTooLong(path.to_path_buf()));
    }
    Ok(())
}

/// Why a relay could not carry a connection: QEMU only sees its socket close, so the
/// operator's error line comes from here.
type Failure = Arc<std::sync::Mutex<Option<String>>>;

/// A relay's task: aborted, with every connection it carries, when this is dropped.
#[derive(Debug)]
pub struct Running {
    task: JoinHandle<()>,
    path: PathBuf,
    failure: Failure,
}

impl Running {
    /// The unix socket QEMU connects to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The first connection the relay could not carry, and why.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
}

/// Keeps the first failure.
fn record(failure: &Failure, why: String) {
    if let Ok(mut slot) = failure.lock() {
        slot.get_or_insert(why);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The source's relays for one migration: NBD from the start, RAM once the destination is
/// ready. Dropping it cuts every stream.
pub struct Tunnel {
    dir: PathBuf,
    client: Arc<Client>,
    peer: Peer,
    nbd: Option<Running>,
    ram: Option<Running>,
    keeper: Option<PathBuf>,
}

impl Tunnel {
    /// Relays into `dir` (which must exist, 0700) towards the agent on `host`.
    pub fn new(dir: &Path, bundle: &ClientBundle, host: &str) -> Result<Tunnel, TunnelError> {
        Ok(Tunnel {
            dir: dir.to_path_buf(),
            client: Arc::new(Client::new(bundle)?),
            peer: Peer {
                host: host.to_string(),
                local: None,
            },
            nbd: None,
            ram: None,
            keeper: None,
        })
    }

    /// Connects to the agent from `local` (the control connection's own address) rather than
    /// from whatever address the route of the moment picks.
    pub fn from_address(mut self, local: Option<std::net::IpAddr>) -> Tunnel {
        self.peer.local = local;
        self
    }

    /// Runs `program keep-ram-channels` beside a RAM relay of several connections (multifd),
    /// so that this process's death cannot leave the source QEMU stuck ([`keeper`]).
    pub fn with_keeper(mut self, program: PathBuf) -> Tunnel {
        self.keeper = Some(program);
        self
    }

    /// Starts the NBD relay to the agent's NBD `port`; returns the socket the nodes use.
    pub fn nbd(&mut self, port: u16) -> Result<PathBuf, TunnelError> {
        let running = nbd::Relay::start(
            &self.dir.join(NBD_SOCKET),
            self.client.clone(),
            self.peer.clone(),
            port,
        )?;
        let path = running.path().to_path_buf();
        self.nbd = Some(running);
        Ok(path)
    }

    /// Starts the RAM relay to the agent's RAM `port` for `connections` connections; returns
    /// the socket the source QEMU migrates to.
    pub fn ram(&mut self, port: u16, connections: u32) -> Result<PathBuf, TunnelError> {
        let keeper = match &self.keeper {
            Some(program) if connections > 1 => match keeper::Keeper::spawn(program) {
                Ok(keeper) => Some(keeper),
                Err(e) => {
                    tracing::warn!(program = %program.display(), error = %e, "cannot start the RAM keeper; a killed ferry migrate may leave a multifd source QEMU stuck");
                    None
                }
            },
            _ => None,
        };
        let running = ram::Relay::start(
            &self.dir.join(RAM_SOCKET),
            self.client.clone(),
            self.peer.clone(),
            port,
            connections,
            keeper,
        )?;
        let path = running.path().to_path_buf();
        self.ram = Some(running);
        Ok(path)
    }

    /// Why the NBD relay could not carry a connection of the source QEMU to the agent, if it
    /// could not.
    pub fn nbd_failure(&self) -> Option<String> {
        self.nbd.as_ref().and_then(Running::failure)
    }

    /// Why the RAM relay could not carry a connection of the source QEMU, if it could not.
    pub fn ram_failure(&self) -> Option<String> {
        self.ram.as_ref().and_then(Running::failure)
    }
}

#[cfg(test)]
mod tests;
