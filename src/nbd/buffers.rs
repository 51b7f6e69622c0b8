//! Payload buffers of one connection, reused between requests: write payloads filled from the
//! socket (page-aligned, so the backend can send them to disk directly) and read buffers handed
//! to the reply and returned when it is sent. Shared by the connection (which fills them) and
//! the jobs (which consume them).

use std::sync::Arc;

use bytes::BytesMut;

use super::wire::MAX_PAYLOAD;

/// Bytes of idle buffers a connection keeps for reuse, for writes and for reads each.
const MAX_CACHED_BUFFERS: usize = MAX_PAYLOAD as usize;

/// Payload buffers of one connection, reused. A fresh 1 MiB allocation costs 256 page faults
/// (and zeroing) when it is first filled; a reused buffer is already mapped. Write buffers are
/// filled from the socket; read buffers are kept initialized so `pread` can fill them without
/// clearing them first.
#[derive(Default)]
pub(crate) struct Buffers {
    writes: std::sync::Mutex<Vec<BytesMut>>,
    reads: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl Buffers {
    /// An empty buffer with room for `len` bytes: the smallest idle one that fits, or a new one.
    pub(crate) fn take(&self, len: usize) -> BytesMut {
        let mut free = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        match best_fit(free.iter().map(BytesMut::capacity), len) {
            Some(i) => free.swap_remove(i),
            None => BytesMut::with_capacity(len),
        }
    }

    pub(crate) fn give(&self, mut buf: BytesMut) {
        buf.clear();
        let mut free = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let cached: usize = free.iter().map(BytesMut::capacity).sum();
        if cached + buf.capacity() <= MAX_CACHED_BUFFERS {
            free.push(buf);
        }
    }

    /// A buffer for `len` bytes of read data, returned to this pool when the reply built on it
    /// is dropped (after it is sent).
    pub(crate) fn take_read(self: &Arc<Self>, len: usize) -> ReadBuffer {
        let data = {
            let mut free = self.reads.lock().unwrap_or_else(|p| p.into_inner());
            match best_fit(free.iter().map(Vec::len), len) {
                Some(i) => free.swap_remove(i),
                None => vec![0u8; len],
            }
        };
        ReadBuffer {
            data,
            len,
            pool: self.clone(),
        }
    }

    fn give_read(&self, data: Vec<u8>) {
        let mut free = self.reads.lock().unwrap_or_else(|p| p.into_inner());
        let cached: usize = free.iter().map(Vec::len).sum();
        if cached + data.len() <= MAX_CACHED_BUFFERS {
            free.push(data);
        }
    }
}

/// Page size, the alignment write payloads get in their buffers.
pub(crate) const PAGE: usize = 4096;

/// A write payload in a pooled buffer, starting on a page boundary.
pub(crate) struct Payload {
    pub(crate) buf: BytesMut,
    pub(crate) start: usize,
}

impl Payload {
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Gives the buffer back to its pool.
    pub(crate) fn recycle(self, buffers: &Buffers) {
        buffers.give(self.buf);
    }
}

/// Index of the smallest size that holds `len`.
fn best_fit(sizes: impl Iterator<Item = usize>, len: usize) -> Option<usize> {
    sizes
        .enumerate()
        .filter(|&(_, size)| size >= len)
        .min_by_key(|&(_, size)| size)
        .map(|(i, _)| i)
}

/// Read data on its way out: the first `len` bytes of a pooled buffer. Wrap it in
/// `Bytes::from_owner` to slice it into reply chunks; the buffer goes back to its pool when the
/// last slice is dropped.
pub(crate) struct ReadBuffer {
    data: Vec<u8>,
    len: usize,
    pool: Arc<Buffers>,
}

impl ReadBuffer {
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

impl AsRef<[u8]> for ReadBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        self.pool.give_read(std::mem::take(&mut self.data));
    }
}
