//! The connection: handshake, the reader and writer tasks, and matching replies to requests.
//!
//! Callers never touch the socket. The reader task owns the read half and is the only place that
//! parses what QEMU sends; the writer task owns the write half and writes whole lines, so a caller
//! that gives up on a call (a timeout dropping its future) can never leave half a request on the
//! wire. Replies find their caller through `id` in a map of oneshot senders; when the connection
//! ends the map is emptied, which wakes every waiting caller with [`Error::Disconnected`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::CloseReason;
use crate::events::{Event, Events, EVENT_CAPACITY};
use crate::framing::{self, FrameError, LineReader, Message, QmpFailure, MAX_LINE};
use crate::{Error, QemuVersion};

/// How long [`Qmp::connect_unix`] and [`Qmp::connect_tcp`] wait for QEMU's greeting and the
/// capabilities reply. QEMU greets at once; a silent peer is either not QMP or a monitor that
/// already has a client (QEMU serves one client per `-qmp` socket and queues the others).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Lines waiting for the writer task; callers wait (not fail) when it is full.
const WRITE_QUEUE: usize = 256;

/// How often [`Qmp::connect_unix_timeout`] retries a socket that is not there yet.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// A connection to one QEMU monitor. Cheap to clone; every clone shares the connection, and
/// calls from many tasks may be in flight at once.
///
/// The connection closes when the last handle is dropped.
///
/// ```no_run
/// # async fn demo() -> Result<(), qmp::Error> {
/// let qmp = qmp::Qmp::connect_unix("/run/vm1/qmp.sock").await?;
/// let status = qmp.execute(qapi::qmp::query_status {}).await?;
/// println!("QEMU {} is {:?}", qmp.version(), status.status);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
    /// How long a call waits for its reply; `None`: as long as it takes.
    reply_timeout: Option<Duration>,
}

struct Inner {
    shared: Arc<Shared>,
    writer: mpsc::Sender<Vec<u8>>,
    next_id: AtomicU64,
    version: QemuVersion,
    package: String,
    peer_pid: Option<u32>,
    reader_task: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.close(CloseReason::Dropped);
        self.reader_task.abort();
        // The writer task ends by itself once `writer` is dropped, shutting down the socket's
        // write side so that QEMU sees the client leave.
    }
}

/// What the reader task, the writer task and the callers share.
struct Shared {
    state: Mutex<State>,
}

struct State {
    /// Callers waiting for a reply, by request id. Dropping a sender wakes its caller with
    /// `Disconnected`.
    pending: HashMap<u64, oneshot::Sender<Result<Value, QmpFailure>>>,
    /// `None` once closed: dropping the sender ends every subscription.
    events: Option<broadcast::Sender<Event>>,
    closed: Option<CloseReason>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the map is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the connection for everyone: the first reason given is the one kept.
    fn close(&self, reason: CloseReason) {
        let mut state = self.lock();
        if state.closed.is_none() {
            state.closed = Some(reason);
        }
        state.pending.clear();
        state.events = None;
    }

    fn complete(&self, id: Option<Value>, result: Result<Value, QmpFailure>) {
        let Some(id) = id.as_ref().and_then(Value::as_u64) else {
            // This client always sends a numeric id and QEMU echoes it; anything else is no
            // request of ours.
            tracing::warn!(?id, "QMP reply with an id this client never sent; ignored");
            return;
        };
        let waiter = self.lock().pending.remove(&id);
        match waiter {
            // The caller may have given up meanwhile; then nobody wants the reply.
            Some(tx) => drop(tx.send(result)),
            None => tracing::debug!(id, "reply for a call that was abandoned"),
        }
    }

    fn publish(&self, event: Event) {
        tracing::debug!(event = %event.name, "QMP event");
        if let Some(tx) = &self.lock().events {
            // An error only means nobody is subscribed right now.
            let _ = tx.send(event);
        }
    }
}

/// Takes a pending entry out of the map when a call is abandoned, so that the map only holds
/// calls someone still waits for.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

#[derive(Serialize)]
struct Request<'a, A: Serialize> {
    execute: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<A>,
    id: u64,
}

impl Qmp {
    /// Connects to QEMU's QMP unix socket (`-qmp unix:PATH,server=on,wait=off`), reads the
    /// greeting and leaves capabilities negotiation, waiting at most [`HANDSHAKE_TIMEOUT`] for
    /// QEMU to answer.
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Qmp, Error> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| Error::Connect {
                path: path.display().to_string(),
                source,
            })?;
        Self::from_unix_stream(stream, path, Instant::now() + HANDSHAKE_TIMEOUT).await
    }

    /// Like [`connect_unix`](Self::connect_unix), for a QEMU that was just started: while the
    /// socket does not exist yet or refuses connections, retries every 20 ms. Everything,
    /// handshake included, happens within `within`; past it the last connect error is returned
    /// as [`Error::Connect`] (or [`Error::Timeout`] if QEMU accepted but did not greet).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), qmp::Error> {
    /// use std::time::Duration;
    /// // QEMU was just spawned with -qmp unix:/tmp/vm.sock,server=on,wait=off
    /// let qmp = qmp::Qmp::connect_unix_timeout("/tmp/vm.sock", Duration::from_secs(5)).await?;
    /// assert!(qmp.peer_pid().is_some());
    /// # Ok(()) }
    /// ```
    pub async fn connect_unix_timeout(
        path: impl AsRef<Path>,
        within: Duration,
    ) -> Result<Qmp, Error> {
        let path = path.as_ref();
        let deadline = Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && Instant::now() + CONNECT_RETRY < deadline =>
                {
                    tokio::time::sleep(CONNECT_RETRY).await;
                }
                Err(source) => {
                    return Err(Error::Connect {
                        path: path.display().to_string(),
                        source,
                    })
                }
            }
        };
        Self::from_unix_stream(stream, path, deadline).await
    }

    /// Connects to a QMP TCP socket (`-qmp tcp:HOST:PORT,server=on,wait=off`). There is no peer
    /// pid over TCP.
    pub async fn connect_tcp(addr: impl ToSocketAddrs) -> Result<Qmp, Error> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| Error::Connect {
                path: "(tcp)".into(),
                source,
            })?;
        let label = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "(tcp)".into());
        let (read, write) = stream.into_split();
        Self::handshake(
            read,
            write,
            label,
            None,
            Instant::now() + HANDSHAKE_TIMEOUT,
            MAX_LINE,
        )
        .await
    }

    /// Runs QMP over any byte stream already connected to a monitor (a socket pair, a pipe to
    /// `qemu -qmp stdio`, a test double). Same handshake and limits as
    /// [`connect_unix`](Self::connect_unix); no peer pid.
    pub async fn from_io<R, W>(reader: R, writer: W) -> Result<Qmp, Error>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        Self::handshake(
            reader,
            writer,
            "(stream)".into(),
            None,
            Instant::now() + HANDSHAKE_TIMEOUT,
            MAX_LINE,
        )
        .await
    }

    async fn from_unix_stream(
        stream: UnixStream,
        path: &Path,
        deadline: Instant,
    ) -> Result<Qmp, Error> {
        let peer_pid = stream
            .peer_cred()
            .ok()
            .and_then(|cred| cred.pid())
            .and_then(|pid| u32::try_from(pid).ok());
        let (read, write) = stream.into_split();
        Self::handshake(
            read,
            write,
            path.display().to_string(),
            peer_pid,
            deadline,
            MAX_LINE,
        )
        .await
    }

    /// Greeting, tasks, `qmp_capabilities`: afterwards the monitor is in command mode.
    pub(crate) async fn handshake<R, W>(
        reader: R,
        writer: W,
        label: String,
        peer_pid: Option<u32>,
        deadline: Instant,
        line_limit: usize,
    ) -> Result<Qmp, Error>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let started = Instant::now();
        let timeout = |what: &str| Error::Timeout {
            what: format!("{what} from {label}"),
            after: started.elapsed(),
        };
        let mut lines = LineReader::new(reader, line_limit);
        let first = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Err(_) => {
                return Err(timeout(
                    "the QMP greeting (is another client connected? QEMU serves one client per -qmp socket)",
                ))
            }
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => return Err(Error::NotQmp { detail: format!("{label} closed the connection without a greeting") }),
            Ok(Err(FrameError::EofMidLine)) => {
                return Err(Error::NotQmp { detail: format!("{label} closed the connection in the middle of its first line") })
            }
            Ok(Err(FrameError::TooLong { limit })) => return Err(Error::LineTooLong { limit }),
            Ok(Err(FrameError::Io(e))) => return Err(Error::Io(e)),
        };
        let greeting =
            framing::parse_greeting(&first).map_err(|detail| Error::NotQmp { detail })?;

        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                events: Some(events),
                closed: None,
            }),
        });
        let span = tracing::debug_span!("qmp", peer = %label);
        let (write_tx, write_rx) = mpsc::channel(WRITE_QUEUE);
        tokio::spawn(write_loop(writer, write_rx, Arc::clone(&shared)).instrument(span.clone()));
        let reader_task = tokio::spawn(read_loop(lines, Arc::clone(&shared)).instrument(span));
        let qmp = Qmp {
            reply_timeout: None,
            inner: Arc::new(Inner {
                shared,
                writer: write_tx,
                next_id: AtomicU64::new(0),
                version: greeting.version,
                package: greeting.package,
                peer_pid,
                reader_task,
            }),
        };
        match tokio::time::timeout_at(deadline, qmp.execute_raw("qmp_capabilities", Value::Null))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(timeout("the reply to qmp_capabilities")),
        }
        tracing::debug!(peer = %label, version = %qmp.version(), "QMP connected");
        Ok(qmp)
    }

    /// The QEMU version from the greeting.
    pub fn version(&self) -> QemuVersion {
        self.inner.version
    }

    /// The distribution's package string from the greeting (e.g. `Debian 1:7.2+dfsg-7+deb12u18`);
    /// empty for QEMU built from source.
    pub fn package(&self) -> &str {
        &self.inner.package
    }

    /// The pid of the process on the other end of a unix socket (SO_PEERCRED): QEMU's pid, read
    /// when connecting. `None` over TCP or other streams.
    pub fn peer_pid(&self) -> Option<u32> {
        self.inner.peer_pid
    }

    /// Whether the connection has ended; every call would now fail with [`Error::Disconnected`].
    pub fn is_closed(&self) -> bool {
        self.inner.shared.lock().closed.is_some()
    }

    /// Why the connection ended, once it has: QEMU closed it, or sent something that made this
    /// client close it. `None` while it is open.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.inner.shared.lock().closed.clone()
    }

    /// This connection with every call bounded: a reply that does not come within `timeout`
    /// fails the call with [`Error::Timeout`] (the connection stays usable; a late reply is
    /// dropped). QEMU answers QMP from its main loop, which a stuck thread holding QEMU's big
    /// lock blocks for good: without a bound, a caller waits on such a QEMU forever. `None`
    /// removes the bound (for a command known to run long, such as preallocating RAM).
    ///
    /// ```no_run
    /// # async fn demo(qmp: qmp::Qmp) -> Result<(), qmp::Error> {
    /// let bounded = qmp.with_reply_timeout(Some(std::time::Duration::from_secs(30)));
    /// bounded.execute_raw("query-migrate", serde_json::json!(null)).await?;
    /// # Ok(()) }
    /// ```
    pub fn with_reply_timeout(&self, timeout: Option<Duration>) -> Qmp {
        Qmp {
            inner: self.inner.clone(),
            reply_timeout: timeout,
        }
    }

    /// The bound [`with_reply_timeout`](Self::with_reply_timeout) set, if any.
    pub fn reply_timeout(&self) -> Option<Duration> {
        self.reply_timeout
    }

    /// Runs a typed command from [`qapi::qmp`] and decodes its reply.
    ///
    /// QEMU's error reply becomes [`Error::Qmp`]; a reply that does not fit the typed schema
    /// (QEMU versions differ from the `qapi-qmp` crate's) becomes [`Error::Decode`]; then use
    /// [`execute_raw`](Self::execute_raw).
    ///
    /// ```no_run
    /// # async fn demo(qmp: qmp::Qmp) -> Result<(), qmp::Error> {
    /// let version = qmp.execute(qapi::qmp::query_version {}).await?;
    /// assert_eq!(version.qemu.major, i64::from(qmp.version().major));
    /// qmp.execute(qapi::qmp::stop {}).await?;
    /// qmp.execute(qapi::qmp::cont {}).await?;
    /// # Ok(()) }
    /// ```
    pub async fn execute<C: qapi::Command>(&self, cmd: C) -> Result<C::Ok, Error> {
        let reply = self.call(C::NAME, Some(&cmd)).await?;
        serde_json::from_value(reply).map_err(|source| Error::Decode {
            command: C::NAME.into(),
            source,
        })
    }

    /// Runs a command by name with JSON arguments (`Value::Null` for none) and returns QEMU's
    /// `return` member as it came: for commands and fields the typed schema does not know.
    ///
    /// ```no_run
    /// # async fn demo(qmp: qmp::Qmp) -> Result<(), qmp::Error> {
    /// use serde_json::json;
    /// let caps = qmp.execute_raw("query-migrate-capabilities", json!(null)).await?;
    /// qmp.execute_raw("migrate-set-parameters", json!({"max-bandwidth": 0})).await?;
    /// match qmp.execute_raw("no-such-command", json!(null)).await {
    ///     Err(e) => assert_eq!(e.class(), Some("CommandNotFound")),
    ///     Ok(_) => unreachable!(),
    /// }
    /// # let _ = caps; Ok(()) }
    /// ```
    pub async fn execute_raw(&self, name: &str, args: Value) -> Result<Value, Error> {
        match args {
            Value::Null => self.call(name, None::<&Value>).await,
            Value::Object(_) => self.call(name, Some(&args)).await,
            _ => Err(Error::BadArguments {
                command: name.into(),
            }),
        }
    }

    /// Subscribes to the connection's events from now on. Subscribe before sending the command
    /// whose event you wait for: QEMU emits the event before the command's reply, and this client
    /// publishes it before the reply reaches the caller.
    ///
    /// ```no_run
    /// # async fn demo(qmp: qmp::Qmp) -> Result<(), qmp::Error> {
    /// let mut events = qmp.events();
    /// loop {
    ///     let event = events.next().await?; // Err(Disconnected) when QEMU goes away
    ///     println!("{} {}", event.name, event.data);
    /// }
    /// # }
    /// ```
    pub fn events(&self) -> Events {
        Events::new(
            self.inner
                .shared
                .lock()
                .events
                .as_ref()
                .map(broadcast::Sender::subscribe),
        )
    }

    async fn call<A: Serialize>(&self, name: &str, arguments: Option<A>) -> Result<Value, Error> {
        let inner = &*self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut line = serde_json::to_vec(&Request {
            execute: name,
            arguments,
            id,
        })
        .map_err(|source| Error::Encode {
            command: name.into(),
            source,
        })?;
        line.push(b'\n');

        let (tx, rx) = oneshot::channel();
        {
            let mut state = inner.shared.lock();
            if state.closed.is_some() {
                return Err(Error::Disconnected);
            }
            state.pending.insert(id, tx);
        }
        let _guard = PendingGuard {
            shared: &inner.shared,
            id,
        };
        tracing::trace!(id, command = name, "QMP request");
        inner
            .writer
            .send(line)
            .await
            .map_err(|_| Error::Disconnected)?;
        let reply = match self.reply_timeout {
            None => rx.await,
            Some(after) => match tokio::time::timeout(after, rx).await {
                Ok(reply) => reply,
                Err(_) => {
                    return Err(Error::Timeout {
                        what: format!("QEMU's reply to {name}"),
                        after,
                    })
                }
            },
        };
        match reply {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(QmpFailure { class, desc })) => Err(Error::Qmp {
                command: name.into(),
                class,
                desc,
            }),
            Err(_) => Err(Error::Disconnected),
        }
    }
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("version", &self.inner.version)
            .field("peer_pid", &self.inner.peer_pid)
            .field("closed", &self.close_reason())
            .finish_non_exhaustive()
    }
}

/// Owns the read half: the only reader of the socket. Ends the connection for everyone when the
/// peer closes it or sends something that is not QMP.
async fn read_loop<R: AsyncRead + Unpin>(mut lines: LineReader<R>, shared: Arc<Shared>) {
    let reason = loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break CloseReason::Eof,
            Err(FrameError::EofMidLine) => break CloseReason::EofMidLine,
            Err(FrameError::TooLong { limit }) => break CloseReason::LineTooLong { limit },
            Err(FrameError::Io(e)) => break CloseReason::from(&e),
        };
        match framing::parse_message(&line) {
            Ok(Message::Reply { id, result }) => shared.complete(id, result),
            Ok(Message::Event(event)) => shared.publish(event),
            Ok(Message::Unknown) => tracing::debug!("QMP message of unknown kind ignored"),
            Err(detail) => break CloseReason::Malformed { detail },
        }
    };
    if reason.is_clean() {
        tracing::debug!(%reason, "QMP connection closed");
    } else {
        tracing::warn!(%reason, "QMP connection closed");
    }
    shared.close(reason);
}

/// Owns the write half and writes whole request lines in the order callers queued them.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut lines: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(line) = lines.recv().await {
        let written = async {
            writer.write_all(&line).await?;
            writer.flush().await
        };
        if let Err(e) = written.await {
            shared.close(CloseReason::from(&e));
            return;
        }
    }
    // Every handle is gone: tell QEMU we are done so it frees the monitor for the next client.
    let _ = writer.shutdown().await;
}

#[cfg(test)]
mod tests;
