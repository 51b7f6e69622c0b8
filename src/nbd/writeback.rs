//! Early writeback: start the disk writing a range that was just written through the page cache,
//! without waiting for it (`sync_file_range(SYNC_FILE_RANGE_WRITE)`).
//!
//! Why: a mirror's writes into a fresh image go through the page cache (see
//! `Backend::route`), and on a host with a lot of memory the kernel's own writeback starts only
//! past `dirty_background_ratio` (2.4 GB on a 24 GB host) or after 30 s, so all of a mirror's
//! data used to wait in memory for the client's flush, and the disk sat idle while the network
//! delivered it. Starting each large range's writeback as soon as it is written overlaps the two:
//! the flush before the mirror is ready, and the agent's `fdatasync` before `cont`, find little
//! left to do.
//!
//! This changes no durability promise: nothing is acknowledged as durable because of it. Errors of
//! the writeback it starts are recorded by the kernel against the file and reported by the next
//! `fdatasync` (a `flush`), as for the kernel's own writeback; `SYNC_FILE_RANGE_WRITE` alone does
//! not wait and so does not consume them. An error of the call itself fails the write it follows
//! (see `Backend::write_routed`).
//!
//! The one `unsafe` call in the server lives here: nix 0.29 has no wrapper for this system call.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

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

#[cfg(test)]
mod tests {
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
}
