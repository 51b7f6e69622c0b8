//! The transmission phase of one connection: pipelined requests, out-of-order replies.
//!
//! ```text
//!   socket ──► reader (this task) ──► check ──┬─► write lane: small plain writes ──────┐
//!                │  one request at a time:     │     and zeroing, in order              │
//!                │  header, then payload       └─► blocking pool: everything else ──────┤
//!                │  straight into a reused buffer  (large writes too, many at once)     ▼
//!                └─ refused requests ──────────────────────────────────────► sink ──► socket
//! ```
//!
//! The reader never waits for the disk: each checked request goes off the runtime threads and
//! the reader goes on with the next one, so a slow `fdatasync` does not hold up reads or writes
//! behind it, and replies leave in completion order (the thread that finishes a request writes
//! its reply, see `sink`). Two semaphores bound what a client can make the server hold: the
//! number of requests in flight and the bytes of their buffers (write payloads and read data).
//! Permits travel with the reply and are released once it is on the wire, so a client that
//! stops reading replies stops being read from.
//!
//! Over TLS the same loop reads the session's decrypting half, and the sink queues replies to
//! the one task that may write the session; the plain TCP path is untouched by it.
//!
//! The connection ends on `NBD_CMD_DISC`, end of stream, a framing error, or the export's stop
//! signal (removal or server shutdown). In every case requests already read are completed (the
//! disk work always runs to the end) and their replies are sent, within a grace period for
//! clients that no longer read.

use std::sync::Arc;
use std::time::Duration;

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{debug, info, warn};

use super::backend::{Backend, Route};
use super::buffers::{Buffers, Payload, PAGE};
use super::handshake::Session;
use super::job::{self, Job};
use super::request::{self, Op, Rejection};
use super::sink::{Reply, Sink};
use super::transport::Transport;
use super::wire::{self, ReplyStyle, Request, MAX_PAYLOAD};

/// Socket read buffer: headers and small writes are parsed from it; large payloads bypass it.
const READ_BUFFER: usize = 64 * 1024;

/// Per-connection bounds, and where the connection counts its requests.
#[derive(Debug, Clone)]
pub(crate) struct Bounds {
    pub(crate) max_requests: usize,
    /// At least [`MAX_PAYLOAD`], so that one maximal request always fits.
    pub(crate) max_bytes: usize,
    pub(crate) grace: Duration,
    pub(crate) stats: Arc<super::NbdStats>,
}

/// What the reader got off the socket.
enum Incoming {
    Op {
        req: Request,
        op: Op<Payload>,
        bytes: Option<OwnedSemaphorePermit>,
    },
    Rejected {
        req: Request,
        rejection: Rejection,
    },
    Disconnect,
}

/// Why the reader stopped.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("client closed the connection")]
    Eof,
    #[error("connection failed")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error("request payload of {0} bytes is larger than the {MAX_PAYLOAD}-byte maximum")]
    PayloadTooLarge(u64),
    /// Only a write carries a payload, and its payload was just read: never seen.
    #[error("a write without its payload")]
    MissingPayload,
}

/// Serves `session` on `transport` until the client leaves or the export is told to stop.
///
/// Plain TCP keeps the fast path: the socket's halves are split without a lock, and replies are
/// written by the threads that complete them. A TLS session can only be written by one task at
/// a time, so its replies are queued to a writer task (see `sink`); its reader is the same
/// code over the decrypting half.
pub(crate) async fn serve(transport: Transport<TcpStream>, session: Session, bounds: Bounds) {
    let grace = bounds.grace;
    let (answered, drain) = match transport {
        Transport::Plain(stream) => {
            let (rd, wr) = stream.into_split();
            let (sink, drain) = Sink::socket(wr);
            let rd = BufReader::with_capacity(READ_BUFFER, rd);
            (run(rd, sink, session, bounds).await, drain)
        }
        Transport::Tls(stream) => {
            let (rd, wr) = tokio::io::split(*stream);
            let (sink, drain) = Sink::queue(wr);
            let rd = BufReader::with_capacity(READ_BUFFER, rd);
            (run(rd, sink, session, bounds).await, drain)
        }
    };
    drain.close(answered, grace).await;
}

/// The transmission loop. Returns whether every reply was handed to the client within the
/// grace period.
async fn run<R>(mut rd: BufReader<R>, sink: Arc<Sink>, session: Session, bounds: Bounds) -> bool
where
    R: AsyncRead + Unpin,
{
    let Session {
        export,
        style,
        base_allocation,
        ..
    } = session;
    let max_requests = u32::try_from(bounds.max_requests.clamp(1, 1 << 16)).unwrap_or(1 << 16);
    let slots = Arc::new(Semaphore::new(max_requests as usize));
    let budget = Arc::new(Semaphore::new(bounds.max_bytes.max(MAX_PAYLOAD as usize)));
    let limits = request::Limits {
        style,
        size: export.backend.size(),
        read_only: export.read_only,
        block_status: base_allocation.is_some(),
    };
    let context = base_allocation.unwrap_or(0);
    let buffers = Arc::new(Buffers::default());
    let mut lane = Lane::default();
    loop {
        let slot = tokio::select! {
            biased;
            () = export.stop.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        let incoming = tokio::select! {
            biased;
            () = export.stop.cancelled() => break,
            incoming = receive(&mut rd, &limits, &budget, &buffers) => incoming,
        };
        match incoming {
            Ok(Incoming::Op { req, op, bytes }) => {
                bounds.stats.count_request();
                let on_lane = OnLane::of(&op, &export.backend);
                let mut job = Job {
                    export: export.clone(),
                    buffers: buffers.clone(),
                    style,
                    context,
                    req,
                    op,
                    stats: bounds.stats.clone(),
                    route: None,
                    already_zero: false,
                };
                let sink = sink.clone();
                let token = export.work.token();
                match on_lane {
                    Some(on_lane) => {
                        let pool = tokio::runtime::Handle::current();
                        lane.run(Box::new(move || {
                            let backend = &job.export.backend;
                            let here = match on_lane {
                                OnLane::Write => {
                                    job.route = Some(Route::Cached);
                                    true
                                }
                                OnLane::Zero { offset, len } => {
                                    job.already_zero = backend.all_hole(offset, len);
                                    job.already_zero
                                }
                            };
                            let task = move || finish(job, token, &sink, slot, bytes);
                            if here {
                                task();
                            } else {
                                pool.spawn_blocking(task);
                            }
                        }));
                    }
                    None => {
                        tokio::task::spawn_blocking(move || finish(job, token, &sink, slot, bytes));
                    }
                }
            }
            Ok(Incoming::Rejected { req, rejection }) => {
                bounds.stats.count_request();
                bounds.stats.count_error();
                debug!(cookie = req.cookie, command = req.command, error = %rejection.message, "request refused");
                let parts = job::error_reply(style, &req, rejection.errno, &rejection.message);
                sink.send(Reply {
                    parts,
                    _slot: slot,
                    _bytes: None,
                });
            }
            Ok(Incoming::Disconnect) => {
                debug!("client disconnected (NBD_CMD_DISC)");
                break;
            }
            Err(ReadError::Eof) => {
                debug!("client closed the connection");
                break;
            }
            Err(e) => {
                info!(error = %e, "closing the connection");
                break;
            }
        }
    }
    drop(lane);
    // Every reply holds a slot until it is on the wire: all slots back means all answered.
    let answered = slots.acquire_many(max_requests);
    let answered = tokio::time::timeout(bounds.grace, answered).await.is_ok();
    if !answered {
        warn!(
            "client did not take its last replies in {:?}; closing",
            bounds.grace
        );
    }
    answered
}

/// Reads one request (header and payload) and checks it.
async fn receive<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    limits: &request::Limits,
    budget: &Arc<Semaphore>,
    buffers: &Buffers,
) -> Result<Incoming, ReadError> {
    let mut header = [0u8; 32];
    let header = &mut header[..limits.style.request_header_len()];
    // A clean end of stream between requests is the client leaving; inside one, an error.
    let first = rd.read(&mut header[..1]).await?;
    if first == 0 {
        return Err(ReadError::Eof);
    }
    rd.read_exact(&mut header[1..]).await?;
    let req = wire::parse_request(limits.style, header)?;
    let payload_len = req.payload_len(limits.style);
    if limits.style == ReplyStyle::Extended && payload_len > u64::from(MAX_PAYLOAD) {
        // The spec's advice for extended headers: a hard disconnect.
        return Err(ReadError::PayloadTooLarge(payload_len));
    }
    match request::check(&req, limits) {
        Err(rejection) => {
            // Consumed without allocating: a refused write of any size costs no memory.
            discard(rd, payload_len).await?;
            Ok(Incoming::Rejected { req, rejection })
        }
        Ok(Op::Disconnect) => Ok(Incoming::Disconnect),
        Ok(op) => {
            let (payload, bytes) = match op {
                Op::Write { len, .. } => {
                    let bytes = reserve(budget, len).await;
                    let len = len as usize;
                    let mut buf = buffers.take(len + PAGE);
                    // Start the data on a page boundary: the backend can then send it to disk
                    // directly.
                    let start = (PAGE - buf.as_ptr() as usize % PAGE) % PAGE;
                    buf.put_bytes(0, start);
                    while buf.len() < start + len {
                        let want = (start + len - buf.len()) as u64;
                        if (&mut *rd).take(want).read_buf(&mut buf).await? == 0 {
                            return Err(
                                std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()
                            );
                        }
                    }
                    (Some(Payload { buf, start }), bytes)
                }
                Op::Read { len, .. } => (None, reserve(budget, len).await),
                _ => (None, None),
            };
            let op = op.with_payload(payload).ok_or(ReadError::MissingPayload)?;
            Ok(Incoming::Op { req, op, bytes })
        }
    }
}

/// Runs `job` and hands its reply to the sink; `token` keeps the export's work open until the
/// disk work is done.
fn finish(
    job: Job,
    token: TaskTrackerToken,
    sink: &Sink,
    slot: OwnedSemaphorePermit,
    bytes: Option<OwnedSemaphorePermit>,
) {
    let parts = job.run();
    drop(token);
    sink.send(Reply {
        parts,
        _slot: slot,
        _bytes: bytes,
    });
}

async fn reserve(budget: &Arc<Semaphore>, len: u32) -> Option<OwnedSemaphorePermit> {
    if len == 0 {
        return None;
    }
    // The semaphore is never closed, so this only waits.
    budget.clone().acquire_many_owned(len).await.ok()
}

async fn discard<R: AsyncRead + Unpin>(rd: &mut BufReader<R>, len: u64) -> Result<(), ReadError> {
    if len == 0 {
        return Ok(());
    }
    let skipped = tokio::io::copy(&mut (&mut *rd).take(len), &mut tokio::io::sink()).await?;
    if skipped < len {
        return Err(ReadError::Eof);
    }
    Ok(())
}

/// Requests the write lane looks at first (see [`Lane`]).
#[derive(Clone, Copy)]
enum OnLane {
    /// A plain write too small or unaligned to go direct: done on the lane, through the page
    /// cache (it stays so: a file never takes direct writes again once it refused one).
    Write,
    /// A plain zeroing or trim that may deallocate: over a hole there is nothing to do and the
    /// lane answers it; over data it goes to the pool.
    Zero { offset: u64, len: u64 },
}

impl OnLane {
    fn of<T>(op: &Op<T>, backend: &Backend) -> Option<OnLane> {
        match *op {
            // A write large and aligned enough to go direct goes straight to the pool, which
            // asks the route itself: the `lseek` waits while another write's `fallocate` holds
            // the file's lock, and here it would hold up every write behind it.
            Op::Write {
                fua: false,
                offset,
                len,
                ..
            } if !backend.goes_direct(offset, len as usize) => Some(OnLane::Write),
            Op::WriteZeroes {
                no_hole: false,
                fua: false,
                offset,
                len,
                ..
            }
            | Op::Trim {
                fua: false,
                offset,
                len,
            } => Some(OnLane::Zero { offset, len }),
            _ => None,
        }
    }
}

/// A disk task, run off the runtime threads.
type Task = Box<dyn FnOnce() + Send>;

/// The thread that takes a connection's plain writes (not FUA), and its plain zeroing and
/// trims, in order, started on first use.
///
/// A write comes here when it is too small or unaligned to go direct (large aligned ones go to
/// the blocking pool, see [`OnLane::of`]) and is written through the page cache right here:
/// buffered writes to one file serialize on the inode lock anyway, so spreading them over the
/// blocking pool only adds lock spinning and a thread wake-up per write (measured when the
/// mirror's 1 MiB writes into a fresh image went cached: faster and leaner on this one thread
/// than on the pool, BENCHMARKS.md). A zeroing or trim over a range that is
/// already a hole (`Backend::all_hole`, one `lseek`) is answered here: the mirror of a
/// sparse disk sends thousands, and a pool thread woken for each, all writing their replies
/// at once, cost more than the `lseek` (session 10, BENCHMARKS.md); over data it goes to the
/// pool. Everything else (reads, flushes, FUA requests, zeroing that keeps blocks allocated,
/// block status) goes to the pool directly and never waits behind these writes.
#[derive(Default)]
struct Lane {
    tx: Option<std::sync::mpsc::Sender<Task>>,
}

impl Lane {
    fn run(&mut self, task: Task) {
        if self.tx.is_none() {
            let (tx, rx) = std::sync::mpsc::channel::<Task>();
            let started = std::thread::Builder::new()
                .name("nbd-write".into())
                .spawn(move || {
                    while let Ok(task) = rx.recv() {
                        task();
                    }
                });
            match started {
                Ok(_) => self.tx = Some(tx),
                Err(e) => warn!(error = %e, "cannot start a write thread; using the blocking pool"),
            }
        }
        let task = match &self.tx {
            Some(tx) => match tx.send(task) {
                Ok(()) => return,
                Err(std::sync::mpsc::SendError(task)) => task,
            },
            None => task,
        };
        tokio::task::spawn_blocking(task);
    }
}
