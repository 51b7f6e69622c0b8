//! The relays' copy loop: two streams, both ways, until both sides are done.
//!
//! Why not `tokio::io::copy_bidirectional`: it reads once between writes (topping up only while
//! a write would block), and a read of a TLS stream returns about one 16 KiB record, so the
//! destination QEMU's socket got writes of one or a few records. Here each direction reads
//! until its buffer is full or its source has nothing more ready, and only then writes. In a
//! relay-only loop it was the cheapest variant tried (1.72 against main's 1.82 s of CPU per
//! GiB in the same batches, inside the noise of a loaded machine; BENCHMARKS.md, session
//! s6-tlspath); bigger batches still (a read-ahead buffer under rustls, a larger rustls write
//! limit) were not. Nothing waits for more data than is ready, so a small message (an NBD
//! reply, the RAM stream's return path) is passed on at once.
//!
//! End of stream is passed on as `copy_bidirectional` does: the end of one side (EOF, or
//! close_notify for TLS) flushes and shuts down the other side's write half; the loop ends when
//! both directions ended, or on the first error.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One direction: bytes read from one side wait in `buf[pos..cap]` to be written to the other.
struct Pipe {
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    bytes: u64,
}

impl Pipe {
    fn new(size: usize) -> Pipe {
        Pipe {
            buf: vec![0u8; size.max(1)].into_boxed_slice(),
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            done: false,
            bytes: 0,
        }
    }

    /// Reads into the free end of the buffer until it is full or `from` has nothing ready.
    /// Returns whether `from` is pending (its waker is then registered).
    fn fill<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
    ) -> io::Result<bool> {
        while !self.read_done && self.cap < self.buf.len() {
            let mut rb = ReadBuf::new(&mut self.buf[self.cap..]);
            match Pin::new(&mut *from).poll_read(cx, &mut rb) {
                Poll::Ready(result) => result?,
                Poll::Pending => return Ok(true),
            }
            match rb.filled().len() {
                0 => self.read_done = true,
                n => self.cap += n,
            }
        }
        Ok(false)
    }

    /// Moves bytes until `from` ended and everything is written (then `to` is shut down).
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, from: &mut R, to: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        while !self.done {
            if self.pos == self.cap {
                self.pos = 0;
                self.cap = 0;
            }
            let pending = self.fill(cx, from)?;
            if self.pos < self.cap {
                let n = ready!(Pin::new(&mut *to).poll_write(cx, &self.buf[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.bytes += n as u64;
                self.need_flush = true;
                continue;
            }
            if self.read_done {
                ready!(Pin::new(&mut *to).poll_flush(cx))?;
                ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                self.done = true;
            } else if pending {
                // Nothing more to read for now: what rustls still holds goes out.
                if self.need_flush {
                    ready!(Pin::new(&mut *to).poll_flush(cx))?;
                    self.need_flush = false;
                }
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Copies both ways between `a` and `b` until both are done; returns the bytes copied (a → b,
/// b → a). Each direction reads into a buffer of `buffer` bytes.
pub async fn splice<A, B>(mut a: A, mut b: B, buffer: usize) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ab, mut ba) = (Pipe::new(buffer), Pipe::new(buffer));
    poll_fn(|cx| {
        let forward = ab.poll(cx, &mut a, &mut b)?;
        let back = ba.poll(cx, &mut b, &mut a)?;
        ready!(forward);
        ready!(back);
        Poll::Ready(Ok((ab.bytes, ba.bytes)))
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    use super::splice;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 12) as u8)
            .collect()
    }

    /// Both directions at once, more than a buffer's worth each way in uneven pieces: every
    /// byte arrives in order, each end sees the other's EOF, and the counts are the bytes moved.
    #[tokio::test]
    async fn bytes_in_are_bytes_out_both_ways_and_eof_passes_on() {
        let (left, a) = duplex(7 * 1024);
        let (b, right) = duplex(5 * 1024);
        let relay = tokio::spawn(splice(a, b, 64 * 1024));
        let (to_right, to_left) = (pattern(1 << 20, 1), pattern((1 << 20) + 333, 2));
        let (tr, tl) = (to_right.clone(), to_left.clone());
        let left_end = tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(left);
            let writer = async {
                for piece in tr.chunks(12_345) {
                    wr.write_all(piece).await.expect("left writes");
                }
                wr.shutdown().await.expect("left shuts down");
            };
            let mut got = Vec::new();
            let reader = rd.read_to_end(&mut got);
            let ((), read) = tokio::join!(writer, reader);
            read.expect("left reads");
            got
        });
        let right_end = tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(right);
            let writer = async {
                for piece in tl.chunks(70_001) {
                    wr.write_all(piece).await.expect("right writes");
                }
                wr.shutdown().await.expect("right shuts down");
            };
            let mut got = Vec::new();
            let reader = rd.read_to_end(&mut got);
            let ((), read) = tokio::join!(writer, reader);
            read.expect("right reads");
            got
        });
        let (at_left, at_right) = (
            left_end.await.expect("left"),
            right_end.await.expect("right"),
        );
        assert!(
            at_right == to_right,
            "left to right: {} bytes",
            at_right.len()
        );
        assert!(at_left == to_left, "right to left: {} bytes", at_left.len());
        let counts = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("the splice ends once both sides ended")
            .expect("task")
            .expect("no error");
        assert_eq!(counts, (to_right.len() as u64, to_left.len() as u64));
    }

    /// A few bytes are passed on at once, without waiting for the buffer to fill or the
    /// stream to end (an NBD reply, a return-path message).
    #[tokio::test]
    async fn a_small_message_is_not_held_back() {
        let (mut left, a) = duplex(1 << 16);
        let (b, mut right) = duplex(1 << 16);
        let _relay = tokio::spawn(splice(a, b, 1 << 20));
        left.write_all(b"hello").await.expect("write");
        let mut got = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), right.read_exact(&mut got))
            .await
            .expect("the message arrived without more data behind it")
            .expect("read");
        assert_eq!(&got, b"hello");
        right.write_all(b"back").await.expect("write back");
        let mut back = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), left.read_exact(&mut back))
            .await
            .expect("the answer arrived")
            .expect("read back");
        assert_eq!(&back, b"back");
    }

    /// A side that goes away while the other still sends ends the splice with an error
    /// instead of leaving it (and the other side) waiting.
    #[tokio::test]
    async fn a_side_that_vanishes_ends_the_splice() {
        let (mut left, a) = duplex(1 << 12);
        let (b, right) = duplex(1 << 12);
        let relay = tokio::spawn(splice(a, b, 1 << 16));
        drop(right);
        let payload = pattern(1 << 16, 3);
        let _ = left.write_all(&payload).await;
        let ended = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("the splice ended")
            .expect("task");
        assert!(ended.is_err(), "{ended:?}");
    }
}
