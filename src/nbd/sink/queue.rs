//! Replies through a channel to one task that owns the write half: for streams only one task
//! can write at a time (a TLS session encrypts under state it keeps between writes).
//!
//! The channel needs no bound of its own: every reply holds one of the connection's request
//! slots until the writer has put it on the wire, so at most `max_requests` replies ever wait.
//! The writer takes whatever has queued up and writes it as one vectored write, so a burst of
//! small write acknowledgements costs one TLS record and one `send`, not one each.

use std::io;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{unsent, Reply};

/// Most replies written in one batch.
const BATCH: usize = 64;

/// The sending side: cheap, never blocks.
pub(crate) struct Queue {
    tx: mpsc::UnboundedSender<Reply>,
}

impl Queue {
    pub(super) fn send(&self, reply: Reply) {
        // A closed channel means the writer stopped: the client is gone, and the reply with
        // its permits is dropped here, as the socket sink drops it.
        let _ = self.tx.send(reply);
    }
}

/// Starts the writer task on `wr`. Once `done` is cancelled it writes what is still queued,
/// shuts the stream down (for TLS: `close_notify`, then the TCP write side) and ends.
pub(super) fn start<W>(wr: W, done: CancellationToken) -> (Queue, JoinHandle<()>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(write_replies(wr, rx, done));
    (Queue { tx }, task)
}

async fn write_replies<W>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    done: CancellationToken,
) where
    W: AsyncWrite + Unpin,
{
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let received = tokio::select! {
            biased;
            n = rx.recv_many(&mut batch, BATCH) => n,
            () = done.cancelled() => 0,
        };
        if received == 0 {
            break;
        }
        if let Err(e) = write_batch(&mut wr, &batch).await {
            debug!(error = %e, "cannot send replies; client gone");
            // Dropping the receiver makes every later reply drop at once, with its permits.
            return;
        }
        // On the wire: the permits go back.
        batch.clear();
    }
    if let Err(e) = wr.shutdown().await {
        debug!(error = %e, "cannot close the connection cleanly");
    }
}

/// Writes every part of every reply in `batch`, then flushes.
async fn write_batch<W>(wr: &mut W, batch: &[Reply]) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let parts = || batch.iter().flat_map(|r| r.parts.iter().map(|p| &p[..]));
    let total: usize = batch.iter().map(Reply::len).sum();
    let mut done = 0;
    while done < total {
        let slices = unsent(parts(), done);
        match wr.write_vectored(&slices).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => done += n,
        }
    }
    wr.flush().await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::io::AsyncReadExt;
    use tokio::sync::Semaphore;

    use super::super::Sink;
    use super::*;

    #[tokio::test]
    async fn replies_keep_their_permits_until_written_and_close_ends_the_stream() {
        let slots = Arc::new(Semaphore::new(3));
        let (mut client, server) = tokio::io::duplex(64);
        let (sink, drain) = Sink::queue(server);
        let reply = |text: &'static str, slot| Reply {
            parts: vec![
                Bytes::from_static(text.as_bytes()),
                Bytes::from_static(b"|"),
            ],
            _slot: slot,
            _bytes: None,
        };
        for text in ["first", "second", "third"] {
            let slot = slots.clone().try_acquire_owned().expect("a free slot");
            sink.send(reply(text, slot));
        }
        // Whole replies, never interleaved, in whatever order they were sent.
        let mut got = vec![0u8; "first|second|third|".len()];
        client.read_exact(&mut got).await.expect("replies");
        let mut order: Vec<&str> = std::str::from_utf8(&got)
            .expect("text")
            .split('|')
            .filter(|s| !s.is_empty())
            .collect();
        order.sort_unstable();
        assert_eq!(order, ["first", "second", "third"]);
        let all = tokio::time::timeout(Duration::from_secs(5), slots.acquire_many(3)).await;
        assert!(all.is_ok(), "written replies gave their slots back");
        drain.close(true, Duration::from_secs(5)).await;
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("end of stream");
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_keeps_the_slots_taken() {
        let slots = Arc::new(Semaphore::new(2));
        let (_client, server) = tokio::io::duplex(16);
        let (sink, drain) = Sink::queue(server);
        for _ in 0..2 {
            let slot = slots.clone().try_acquire_owned().expect("a free slot");
            sink.send(Reply {
                parts: vec![Bytes::from(vec![7u8; 1024])],
                _slot: slot,
                _bytes: None,
            });
        }
        // 2 KiB of replies, a 16-byte pipe nobody reads: the slots stay taken, so the
        // connection's reader would stop reading requests.
        let waited = tokio::time::timeout(Duration::from_millis(200), slots.acquire()).await;
        assert!(
            waited.is_err(),
            "a slot came back before its reply was sent"
        );
        // Closing without every answer out cuts the writer at once; its replies drop.
        drain.close(false, Duration::from_secs(5)).await;
        let all = tokio::time::timeout(Duration::from_secs(5), slots.acquire_many(2)).await;
        assert!(
            all.is_ok(),
            "the slots come back once the replies are dropped"
        );
    }
}
