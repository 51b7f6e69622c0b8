//! Early writeback: start the disk writing a range that was just written through the page cache,
//! without waiting for it (`sync_file_range(SYNC_FILE_RANGE_WRITE)`).
//!
//! Why: large writes that cannot go direct (unaligned, or a file that refuses direct I/O or
//! `fallocate`; see `Backend::route`) go through the page cache, and on a host with a lot of
//! memory the kernel's own writeback starts only past `dirty_background_ratio` (2.4 GB on a
//! 24 GB host) or after 30 s, so all of a mirror's data used to wait in memory for the client's
//! flush, and the disk sat idle while the network delivered it. Starting each large range's
//! writeback as soon as it is written overlaps the two: the flush before the mirror is ready,
//! and the agent's `fdatasync` before `cont`, find little left to do.
//!
//! This changes no durability promise: nothing is acknowledged as durable because of it. Errors of
//! the writeback it starts are recorded by the kernel against the file and reported by the next
//! `fdatasync` (a `flush`), as for the kernel's own writeback; `SYNC_FILE_RANGE_WRITE` alone does
//! not wait and so does not consume them. An error of the call itself fails the write it follows
//! (see `Backend::write_routed`).
//!
//! Early writeback, like a direct write, only moves the data as far as the device; a device
//! with a volatile cache (a disk's write cache, or a virtual disk whose host buffers it) still
//! holds it until a cache flush, and the mirror's flush before `READY` then waited for all of
//! it at once: 0.2-0.7 s for 512 MiB on these machines, most of the mirror's time to durable.
//! [`Syncer`] also overlaps that: every [`SYNC_EVERY`] bytes of bulk writes it starts an
//! `fdatasync` on a thread of its own, so the last flush finds at most that much left.
//!
//! The one `unsafe` call in the server lives here: nix 0.29 has no wrapper for this system call.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// Bulk bytes written between two background `fdatasync` calls: on a 1 GB/s mirror about 16
/// a second, each a journal commit and a cache flush the last flush no longer waits for.
pub(crate) const SYNC_EVERY: u64 = 64 << 20;

/// Starts writeback of the dirty pages of `[offset, offset + len)` of `file` and returns without
/// waiting for it to complete. The call can still block while the device's queue is full, which
/// is what throttles a client that sends faster than the disk writes.
pub(crate) fn start(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let offset = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a plain system call on a descriptor `file` keeps open for the duration of the call;
    // no memory is passed to the kernel.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `e` says the call is not for this file (a pipe, a file system or kernel without it)
/// rather than that the disk failed.
pub(crate) fn refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ESPIPE | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

/// Background `fdatasync` of one export file every [`SYNC_EVERY`] bytes of bulk writes.
///
/// At most one runs and one waits; a thread of its own (named `nbd-sync`), started on first
/// need, ends with the export. It syncs a duplicate of the export's descriptor, which shares
/// the kernel's record of writeback errors with it: an error this sync consumes would not be
/// reported by the client's next flush, so it is kept here and [`Syncer::failure`] makes every
/// later flush of the export fail (its data may be lost; the client must not count it durable).
#[derive(Debug)]
pub(crate) struct Syncer {
    written: AtomicU64,
    wake: Mutex<Option<SyncSender<()>>>,
    /// The `errno` of the first failed background sync (0: none), held by a running sync from
    /// before its `fdatasync` until its outcome is in: [`Syncer::failure`] cannot miss an error
    /// that sync took from the kernel's record before the client's own flush looked.
    failed: Arc<Mutex<i32>>,
    /// `File::sync_data`; tests put a failing one in.
    sync: fn(&File) -> io::Result<()>,
}

impl Default for Syncer {
    fn default() -> Syncer {
        Syncer::with_sync(File::sync_data)
    }
}

impl Syncer {
    pub(super) fn with_sync(sync: fn(&File) -> io::Result<()>) -> Syncer {
        Syncer {
            written: AtomicU64::new(0),
            wake: Mutex::new(None),
            failed: Arc::default(),
            sync,
        }
    }

    /// Counts `len` bulk bytes written to `file`; past [`SYNC_EVERY`] since the last sync,
    /// asks for another. Never blocks.
    pub(crate) fn wrote(&self, file: &File, len: u64) {
        let total = self.written.fetch_add(len, Ordering::Relaxed) + len;
        if total < SYNC_EVERY {
            return;
        }
        self.written.fetch_sub(SYNC_EVERY, Ordering::Relaxed);
        let Ok(mut wake) = self.wake.lock() else {
            return;
        };
        if wake.is_none() {
            *wake = self.start(file);
        }
        if let Some(tx) = wake.as_ref() {
            match tx.try_send(()) {
                // Full: a sync is already waiting, which covers these bytes too.
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Disconnected(())) => *wake = None,
            }
        }
    }

    /// The error of a background sync, if one failed (the export's data may be lost), waiting
    /// for one that is running: called after the export's own `fdatasync` returned.
    pub(crate) fn failure(&self) -> Option<io::Error> {
        match *self
            .failed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
        {
            0 => None,
            errno => Some(io::Error::from_raw_os_error(errno)),
        }
    }

    fn start(&self, file: &File) -> Option<SyncSender<()>> {
        let file = file
            .try_clone()
            .map_err(|e| tracing::debug!(error = %e, "no background sync: cannot duplicate the descriptor"))
            .ok()?;
        let (tx, rx) = sync_channel::<()>(1);
        let (failed, sync) = (self.failed.clone(), self.sync);
        let started = std::thread::Builder::new()
            .name("nbd-sync".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    let mut failed = failed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    if let Err(e) = sync(&file) {
                        tracing::warn!(error = %e, "background fdatasync of an export failed; its flushes fail from now on");
                        if *failed == 0 {
                            *failed = e.raw_os_error().unwrap_or(libc::EIO);
                        }
                    }
                }
            });
        match started {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::debug!(error = %e, "no background sync: cannot start its thread");
                None
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn starts_on_a_file_and_is_refused_on_a_pipe() {
        let mut f = tempfile::tempfile().expect("temp file");
        f.write_all(&[1u8; 1 << 16]).expect("write");
        start(&f, 0, 1 << 16).expect("writeback of a regular file");
        let (rd, _wr) = nix::unistd::pipe().expect("pipe");
        let err = start(&File::from(rd), 0, 4096).expect_err("a pipe has no page cache range");
        assert!(refused(&err), "{err}");
        assert!(!refused(&io::Error::from_raw_os_error(libc::EIO)));
    }

    static SYNCS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn counted(f: &File) -> io::Result<()> {
        SYNCS.fetch_add(1, Ordering::SeqCst);
        f.sync_data()
    }

    fn failing(_: &File) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOSPC))
    }

    /// Waits (at most 10 s) for what a background sync does on its own thread.
    pub(in crate::nbd) fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < until, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn syncs_in_the_background_every_so_many_bytes() {
        let f = tempfile::tempfile().expect("temp file");
        let syncer = Syncer::with_sync(counted);
        syncer.wrote(&f, SYNC_EVERY - 1);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            SYNCS.load(Ordering::SeqCst),
            0,
            "not before SYNC_EVERY bytes"
        );
        syncer.wrote(&f, 1);
        wait_for("a sync after SYNC_EVERY bytes", || {
            SYNCS.load(Ordering::SeqCst) == 1
        });
        assert!(syncer.failure().is_none());
    }

    #[test]
    fn a_failed_background_sync_is_kept_with_its_errno() {
        let f = tempfile::tempfile().expect("temp file");
        let syncer = Syncer::with_sync(failing);
        assert!(syncer.failure().is_none());
        syncer.wrote(&f, SYNC_EVERY);
        wait_for("the failure recorded", || syncer.failure().is_some());
        let e = syncer.failure().expect("kept");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        syncer.wrote(&f, SYNC_EVERY);
        assert!(syncer.failure().is_some(), "it stays");
    }
}
