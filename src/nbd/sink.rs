//! The reply side of a connection: whichever thread completes a request writes its reply.
//!
//! Waking a writer task for every reply costs two context switches and an eventfd write per
//! request; instead the completing thread (the write lane, a blocking-pool thread, or the
//! reader for refused requests) tries a non-blocking write itself. Only when the socket is full
//! does a reply go to a backlog, which a small task drains as the socket becomes writable.
//!
//! Replies are never interleaved: bytes are written under one lock, and while anything waits in
//! the backlog every new reply queues behind it. The order of whole replies is free (the
//! protocol matches them by cookie).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Notify, OwnedSemaphorePermit};
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
pub(crate) struct Sink {
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

impl Sink {
    /// Wraps the write half and starts the task that drains the backlog; the caller aborts it
    /// through the returned handle when the connection ends.
    pub(crate) fn start(wr: OwnedWriteHalf) -> (Arc<Sink>, tokio::task::JoinHandle<()>) {
        let sink = Arc::new(Sink {
            wr,
            state: Mutex::new(State::default()),
            kick: Notify::new(),
        });
        let drainer = tokio::spawn(drain(sink.clone()));
        (sink, drainer)
    }

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
            let mut slices = Vec::with_capacity(reply.parts.len());
            let mut skip = done;
            for part in &reply.parts {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                slices.push(IoSlice::new(&part[skip..]));
                skip = 0;
            }
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
async fn drain(sink: Arc<Sink>) {
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
