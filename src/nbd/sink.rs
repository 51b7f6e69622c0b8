//! The reply side of a connection, in one of two ways:
//!
//! - On a plain TCP socket, whichever thread completes a request writes its reply. Waking a
//!   writer task for every reply costs two context switches and an eventfd write per request;
//!   instead the completing thread (the write lane, a blocking-pool thread, or the reader for
//!   refused requests) tries a non-blocking write itself. Only when the socket is full does a
//!   reply go to a backlog, which a small task drains as the socket becomes writable. Replies
//!   are never interleaved: bytes are written under one lock, and while anything waits in the
//!   backlog every new reply queues behind it.
//! - On a TLS session (`queue`), which only one task at a time can write (each write encrypts
//!   under the session's state), replies go through a channel to a task that owns the write
//!   half; it writes whatever has queued up as one batch, so many small replies share TLS
//!   records.
//!
//! Either way the order of whole replies is free (the protocol matches them by cookie), and a
//! reply keeps its permits until it is on the wire (or dropped because the client is gone), so
//! a client that stops reading replies stops being read from.

mod queue;

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// One encoded reply and the permits it holds until it is on the wire (or dropped because the
/// client is gone).
pub(crate) struct Reply {
    pub(crate) parts: Vec<Bytes>,
    /// Held, not read: released when the reply is on the wire.
    pub(crate) _slot: OwnedSemaphorePermit,
    pub(crate) _bytes: Option<OwnedSemaphorePermit>,
}

impl Reply {
    fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }
}

/// Where a connection's replies go.
pub(crate) enum Sink {
    /// Written by the completing thread (plain TCP).
    Socket(Arc<SocketSink>),
    /// Queued to the task that owns the write half (TLS).
    Queue(queue::Queue),
}

impl Sink {
    /// A sink on a plain socket's write half.
    pub(crate) fn socket(wr: OwnedWriteHalf) -> (Arc<Sink>, Drain) {
        let sink = Arc::new(SocketSink {
            wr,
            state: Mutex::new(State::default()),
            kick: Notify::new(),
        });
        let task = tokio::spawn(drain(sink.clone()));
        (Arc::new(Sink::Socket(sink)), Drain { task, done: None })
    }

    /// A sink on any write half (a TLS session's): replies are written by a task of their own.
    pub(crate) fn queue<W>(wr: W) -> (Arc<Sink>, Drain)
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let done = CancellationToken::new();
        let (queue, task) = queue::start(wr, done.clone());
        (
            Arc::new(Sink::Queue(queue)),
            Drain {
                task,
                done: Some(done),
            },
        )
    }

    /// Hands `reply` over for sending; never blocks.
    pub(crate) fn send(&self, reply: Reply) {
        match self {
            Sink::Socket(sink) => sink.send(reply),
            Sink::Queue(queue) => queue.send(reply),
        }
    }
}

/// The task behind a sink (the backlog drainer, or the queue's writer), ended by the
/// connection with [`Drain::close`].
pub(crate) struct Drain {
    task: JoinHandle<()>,
    /// Tells the queue's writer that nothing more will come: write what is queued, end the TLS
    /// session (`close_notify`), stop.
    done: Option<CancellationToken>,
}

impl Drain {
    /// Ends the task. `answered`: every reply is on its way (the connection got all its
    /// permits back), so a TLS session is closed properly, within `grace`; otherwise (a client
    /// that stopped reading) it is cut at once.
    pub(crate) async fn close(self, answered: bool, grace: Duration) {
        let Drain { mut task, done } = self;
        if let (Some(done), true) = (done, answered) {
            done.cancel();
            if tokio::time::timeout(grace, &mut task).await.is_ok() {
                return;
            }
        }
        task.abort();
    }
}

/// Replies written straight to a plain socket by the thread that completes them.
pub(crate) struct SocketSink {
    wr: OwnedWriteHalf,
    state: Mutex<State>,
    kick: Notify,
}

#[derive(Default)]
struct State {
    /// Replies the socket could not take yet, in order; the first may be partly sent.
    backlog: VecDeque<Reply>,
    /// Bytes of the first backlog reply already sent.
    sent: usize,
    /// The socket failed: the client is gone, replies are dropped.
    broken: bool,
}

impl SocketSink {
    /// Sends `reply` now if the socket takes it, else queues it. Never blocks on the socket.
    pub(crate) fn send(&self, reply: Reply) {
        let mut st = self.lock();
        if st.broken {
            return;
        }
        if !st.backlog.is_empty() {
            st.backlog.push_back(reply);
            return;
        }
        match self.write_now(&reply, 0) {
            Ok(n) if n == reply.len() => {}
            Ok(n) => {
                st.sent = n;
                st.backlog.push_back(reply);
                self.kick.notify_one();
            }
            Err(e) => {
                debug!(error = %e, "cannot send replies; client gone");
                st.broken = true;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a single step; a panicking holder leaves a usable state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `reply` from byte `from` until done or the socket is full; returns the bytes
    /// written by this call.
    fn write_now(&self, reply: &Reply, from: usize) -> io::Result<usize> {
        let total = reply.len();
        let mut done = from;
        while done < total {
            let slices = unsent(reply.parts.iter().map(|p| &p[..]), done);
            match self.wr.try_write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done - from)
    }
}

/// Drains the backlog whenever `send` left something in it and the socket becomes writable.
/// Runs until aborted by the connection.
async fn drain(sink: Arc<SocketSink>) {
    loop {
        sink.kick.notified().await;
        loop {
            {
                let mut st = sink.lock();
                while let Some(front) = st.backlog.front() {
                    let from = st.sent;
                    match sink.write_now(front, from) {
                        Ok(n) if from + n == front.len() => {
                            st.backlog.pop_front();
                            st.sent = 0;
                        }
                        Ok(n) => {
                            st.sent = from + n;
                            break;
                        }
                        Err(e) => {
                            debug!(error = %e, "cannot send replies; client gone");
                            st.broken = true;
                            st.backlog.clear();
                        }
                    }
                }
                if st.backlog.is_empty() {
                    break;
                }
            }
            if sink.wr.writable().await.is_err() {
                let mut st = sink.lock();
                st.broken = true;
                st.backlog.clear();
                break;
            }
        }
    }
}

/// The parts from byte `from` of their concatenation on, as slices for a vectored write.
fn unsent<'a>(parts: impl Iterator<Item = &'a [u8]>, from: usize) -> Vec<IoSlice<'a>> {
    let mut skip = from;
    let mut slices = Vec::new();
    for part in parts {
        if skip >= part.len() {
            skip -= part.len();
            continue;
        }
        slices.push(IoSlice::new(&part[skip..]));
        skip = 0;
    }
    slices
}
