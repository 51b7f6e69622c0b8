//! The storage behind an export: a raw file or a block device, accessed with positional I/O.
//!
//! Every method here blocks (disk I/O, `fdatasync`, `fallocate`); the connection code runs them
//! off the runtime threads. Methods take `&self` and never touch the file offset's meaning (only
//! `pread`/`pwrite`/`lseek(SEEK_DATA|SEEK_HOLE)`), so any number of requests from any number of
//! connections run at once on the same open file.
//!
//! Three descriptors of the one file: the main one (reads, small or unaligned writes, through
//! the page cache), one with `O_DIRECT` (large page-aligned writes over allocated blocks go
//! straight to the disk; into holes they go through the page cache, see [`Backend::write_at`])
//! and one with `O_DSYNC` (FUA writes: durable on return without syncing the rest of the
//! file). The kernel keeps cached and direct views coherent.
//!
//! Durability: `flush` is `fdatasync`, which covers every write completed before it on any
//! connection (one file, one page cache, direct writes already on the device) and the metadata
//! of blocks they allocated.
//!
//! Sparseness: zeroing without `NO_HOLE` and trimming punch holes (`FALLOC_FL_PUNCH_HOLE`);
//! `NO_HOLE` zeroing uses `FALLOC_FL_ZERO_RANGE`, which keeps the blocks allocated. Zeroes never
//! become allocated blocks unless the client asked for it.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags, OFlag};
use nix::unistd::{lseek, Whence};

use super::wire::{errno, state, Extent};

/// What kind of object an export is backed by: it decides how zeroing and trimming are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    RegularFile,
    BlockDevice,
}

/// Why a write-zeroes request did not complete.
#[derive(Debug)]
pub(crate) enum ZeroError {
    /// `NBD_CMD_FLAG_FAST_ZERO` was set and zeroing would be no faster than writing zeroes.
    NotFast,
    Io(io::Error),
}

/// An open export file or device.
#[derive(Debug)]
pub(crate) struct Backend {
    file: File,
    /// The same file opened with `O_DSYNC`, for FUA writes; `None` when read-only.
    dsync: Option<File>,
    kind: Kind,
    size: u64,
    /// The same file opened with `O_DIRECT`, for large aligned writes; `None` when read-only or
    /// when the file system refuses direct I/O.
    direct: Option<File>,
    /// Cleared once a direct write is refused for its alignment.
    direct_ok: AtomicBool,
}

/// Writes at least this large go to disk directly when aligned (see `write_at`).
const DIRECT_FROM: usize = 64 * 1024;
/// Alignment of offset, length and memory for direct writes: the page size, which covers every
/// common logical block size.
const ALIGN: u64 = 4096;

/// Zeroes used when a filesystem cannot zero a range by itself.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

impl Backend {
    /// Opens `path` (an existing regular file or block device); its size is fixed from now on.
    pub(crate) fn open(path: &Path, read_only: bool) -> io::Result<Backend> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        let kind = if meta.file_type().is_file() {
            Kind::RegularFile
        } else if meta.file_type().is_block_device() {
            Kind::BlockDevice
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or a block device",
            ));
        };
        let size = match kind {
            Kind::RegularFile => meta.len(),
            // A block device's metadata says 0; its end is its size.
            Kind::BlockDevice => (&file).seek(SeekFrom::End(0))?,
        };
        let (dsync, direct) = if read_only {
            (None, None)
        } else {
            let same_file = |f: File| -> io::Result<File> {
                let other = f.metadata()?;
                // The path could have been replaced between the opens.
                if (other.dev(), other.ino()) != (meta.dev(), meta.ino()) {
                    return Err(io::Error::other("the file was replaced while being opened"));
                }
                Ok(f)
            };
            let open_with = |flags: OFlag| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(flags.bits())
                    .open(path)
            };
            let dsync = same_file(open_with(OFlag::O_DSYNC)?)?;
            // Not every file system does direct I/O (tmpfs before Linux 6.6): then no fast path.
            let direct = match open_with(OFlag::O_DIRECT) {
                Ok(f) => Some(same_file(f)?),
                Err(_) => None,
            };
            (Some(dsync), direct)
        };
        Ok(Backend {
            file,
            dsync,
            kind,
            size,
            direct,
            direct_ok: AtomicBool::new(true),
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Fills `buf` from `offset`; a file that shrank underneath is an I/O error.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Whether a plain write of `len` bytes at `offset` (from a page-aligned buffer) may go to
    /// the disk directly (see [`Backend::write_at`]; one that starts in a hole still goes
    /// through the page cache, decided there, off the runtime threads).
    pub(crate) fn goes_direct(&self, offset: u64, len: usize) -> bool {
        self.direct.is_some()
            && self.direct_ok.load(Ordering::Relaxed)
            && len >= DIRECT_FROM
            && offset % ALIGN == 0
            && len as u64 % ALIGN == 0
    }

    /// Writes `data` at `offset`; with `fua` it is on stable storage when this returns.
    ///
    /// Large writes whose offset, length and memory are page-aligned, over blocks the file
    /// already has, bypass the page cache (`O_DIRECT`): the data must reach the disk before the
    /// client's flush anyway (a mirror flushes before it declares itself ready), and going
    /// direct skips copying it into the page cache and the writeback work after (a third less
    /// server CPU per GiB on a QEMU mirror). A write that starts in a hole goes through the page
    /// cache instead: a direct write that allocates waits for its own device round trip, and
    /// ext4 lets only one allocating direct write per file run at a time, so a mirror's 1 MiB
    /// requests into a fresh image went at queue depth one (0.5-0.8x a page-cache server on
    /// long extents, BENCHMARKS.md), where writeback merges them. The kernel keeps the cached
    /// and direct views coherent.
    pub(crate) fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if !fua
            && data.len() >= DIRECT_FROM
            && self.direct_ok.load(Ordering::Relaxed)
            && !self.hole_at(offset)
        {
            if let Some(direct) = &self.direct {
                let aligned = offset % ALIGN == 0
                    && data.len() as u64 % ALIGN == 0
                    && data.as_ptr() as usize % ALIGN as usize == 0;
                if aligned {
                    match direct.write_all_at(data, offset) {
                        Ok(()) => return Ok(()),
                        // The device wants a larger alignment: stop trying.
                        Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                            self.direct_ok.store(false, Ordering::Relaxed);
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        match (&self.dsync, fua) {
            (Some(dsync), true) => dsync.write_all_at(data, offset),
            _ => self.file.write_all_at(data, offset),
        }
    }

    /// Whether `offset` is in a hole of a regular file (a write there allocates). Unknown
    /// (no `SEEK_DATA`, a block device) is "not a hole".
    fn hole_at(&self, offset: u64) -> bool {
        if !matches!(self.kind, Kind::RegularFile) {
            return false;
        }
        let Ok(at) = i64::try_from(offset) else {
            return false;
        };
        match lseek(self.file.as_raw_fd(), at, Whence::SeekData) {
            Ok(data) => data != at,
            Err(Errno::ENXIO) => true,
            Err(_) => false,
        }
    }

    /// `fdatasync`: every write completed before this call, on any connection, is durable.
    pub(crate) fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Discards a range: punches a hole where the storage can; otherwise does nothing (a trim is
    /// a hint and the client may not rely on the contents afterwards).
    pub(crate) fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        match self.punch_hole(offset, len) {
            Ok(()) => {}
            Err(Errno::EOPNOTSUPP) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes a range read as zeroes. Without `no_hole` the range is deallocated (a hole); with
    /// it the blocks stay allocated. With `fast_only`, fails with [`ZeroError::NotFast`] rather
    /// than falling back to writing zero buffers.
    pub(crate) fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast_only: bool,
        fua: bool,
    ) -> Result<(), ZeroError> {
        self.zero_range(offset, len, no_hole, fast_only)?;
        if fua {
            self.flush().map_err(ZeroError::Io)?;
        }
        Ok(())
    }

    fn zero_range(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast_only: bool,
    ) -> Result<(), ZeroError> {
        let unsupported = |e: Errno| matches!(e, Errno::EOPNOTSUPP | Errno::ENOSYS);
        let io = |e: Errno| ZeroError::Io(e.into());
        match (self.kind, no_hole) {
            (Kind::RegularFile, false) => match self.punch_hole(offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(e) => {}
                Err(e) => return Err(io(e)),
            },
            (Kind::RegularFile, true) => {
                match self.fallocate(FallocateFlags::FALLOC_FL_ZERO_RANGE, offset, len) {
                    Ok(()) => return Ok(()),
                    Err(e) if unsupported(e) => {}
                    Err(e) => return Err(io(e)),
                }
                // tmpfs and others: a fresh hole, then allocate it; both are metadata-only.
                match self.punch_hole(offset, len) {
                    Ok(()) => match self.fallocate(FallocateFlags::empty(), offset, len) {
                        Ok(()) => return Ok(()),
                        Err(e) if unsupported(e) => {}
                        Err(e) => return Err(io(e)),
                    },
                    Err(e) if unsupported(e) => {}
                    Err(e) => return Err(io(e)),
                }
            }
            // On a block device the kernel implements a punched hole as "zero out without
            // falling back to writing zeroes": it fails when the device cannot do it fast.
            (Kind::BlockDevice, false) => match self.punch_hole(offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(e) => {}
                Err(e) => return Err(io(e)),
            },
            // ZERO_RANGE on a device may silently fall back to writing zeroes: never "fast".
            (Kind::BlockDevice, true) => {
                if fast_only {
                    return Err(ZeroError::NotFast);
                }
                match self.fallocate(FallocateFlags::FALLOC_FL_ZERO_RANGE, offset, len) {
                    Ok(()) => return Ok(()),
                    Err(e) if unsupported(e) => {}
                    Err(e) => return Err(io(e)),
                }
            }
        }
        if fast_only {
            return Err(ZeroError::NotFast);
        }
        self.write_zero_buffers(offset, len).map_err(ZeroError::Io)
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZEROES.len() as u64) as usize;
            self.file.write_all_at(&ZEROES[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), Errno> {
        self.fallocate(
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> Result<(), Errno> {
        if len == 0 {
            return Ok(());
        }
        let offset = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let len = i64::try_from(len).map_err(|_| Errno::EINVAL)?;
        fallocate(self.file.as_raw_fd(), mode, offset, len)
    }

    /// Hints the kernel to read a range ahead (`NBD_CMD_CACHE`).
    pub(crate) fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let offset = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let len = i64::try_from(len).map_err(|_| Errno::EINVAL)?;
        nix::fcntl::posix_fadvise(
            self.file.as_raw_fd(),
            offset,
            len,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        )?;
        Ok(())
    }

    /// Allocation of `[offset, offset + len)` as consecutive extents (at most `max_extents`,
    /// adjacent ones of equal status merged), from `SEEK_DATA`/`SEEK_HOLE`. Holes read as zeroes
    /// (`HOLE | ZERO`); data is reported as status 0 (allocated, contents unknown). Storage that
    /// cannot report holes is all data, which is always a truthful answer.
    pub(crate) fn extents(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, length: u64, hole: bool| {
            let flags = if hole { state::HOLE | state::ZERO } else { 0 };
            match out.last_mut() {
                Some(last) if last.flags == flags => last.length += length,
                _ => out.push(Extent { length, flags }),
            }
        };
        let fd = self.file.as_raw_fd();
        let mut pos = offset;
        while pos < end && out.len() < max_extents {
            let at = i64::try_from(pos).map_err(|_| Errno::EINVAL)?;
            let data = match lseek(fd, at, Whence::SeekData) {
                Ok(d) => u64::try_from(d).unwrap_or(end),
                // No data at or after `pos`: the rest is a hole.
                Err(Errno::ENXIO) => end,
                // No SEEK_DATA support at all: report data, which is never wrong.
                Err(Errno::EINVAL | Errno::EOPNOTSUPP) => {
                    push(&mut out, end - pos, false);
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if data > pos {
                push(&mut out, data.min(end) - pos, true);
                pos = data.min(end);
                continue;
            }
            let hole = match lseek(fd, at, Whence::SeekHole) {
                Ok(h) => u64::try_from(h).unwrap_or(end),
                Err(Errno::ENXIO) => end,
                Err(e) => return Err(e.into()),
            };
            // A hole offset at or before `pos` would loop forever: the file changed under us;
            // call the rest data.
            let next = if hole > pos { hole.min(end) } else { end };
            push(&mut out, next - pos, false);
            pos = next;
        }
        Ok(out)
    }
}

/// Maps a host I/O error to the NBD error a client gets, as the spec asks: out of space (and
/// quota, file too big) is `ENOSPC`, permission problems `EPERM`, everything else `EIO` unless it
/// is an argument problem.
pub(crate) fn nbd_errno(e: &io::Error) -> u32 {
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG) => errno::ENOSPC,
        Some(Errno::EPERM | Errno::EACCES | Errno::EROFS) => errno::EPERM,
        Some(Errno::EINVAL) => errno::EINVAL,
        Some(Errno::ENOMEM) => errno::ENOMEM,
        _ => errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sparse_file(size: u64, data_at: &[(u64, usize)]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.as_file().set_len(size).expect("set_len");
        for &(off, len) in data_at {
            f.as_file()
                .write_all_at(&vec![0xa5; len], off)
                .expect("write");
        }
        f.flush().expect("flush");
        f
    }

    fn allocated_bytes(path: &Path) -> u64 {
        std::fs::metadata(path).expect("stat").blocks() * 512
    }

    #[test]
    fn writes_into_holes_are_told_from_overwrites() {
        const M: u64 = 1 << 20;
        let f = sparse_file(8 * M, &[(2 * M, M as usize)]);
        let b = Backend::open(f.path(), false).expect("open");
        // In a hole a direct write would allocate (and serialize on ext4): it goes cached.
        assert!(b.hole_at(0));
        assert!(b.hole_at(5 * M));
        assert!(
            !b.hole_at(2 * M),
            "allocated blocks are overwritten directly"
        );
        assert!(b.hole_at(8 * M), "past the last data");
        // Either way the bytes land and read back.
        let mut raw = vec![0x5au8; M as usize + 4096];
        let start = raw.as_ptr().align_offset(4096);
        let page_aligned = &mut raw[start..start + M as usize];
        b.write_at(page_aligned, 0, false)
            .expect("write into a hole");
        b.write_at(page_aligned, 2 * M, false).expect("overwrite");
        let mut back = vec![0u8; M as usize];
        for at in [0, 2 * M] {
            b.read_at(&mut back, at).expect("read");
            assert!(back.iter().all(|&x| x == 0x5a), "bytes at {at}");
        }
        assert!(!b.hole_at(0), "the write allocated");
    }

    #[test]
    fn extents_follow_holes_and_data() {
        const M: u64 = 1 << 20;
        let f = sparse_file(8 * M, &[(2 * M, M as usize), (5 * M, M as usize)]);
        let b = Backend::open(f.path(), false).expect("open");
        let hole = state::HOLE | state::ZERO;
        assert_eq!(
            b.extents(0, 8 * M, 100).expect("extents"),
            vec![
                Extent {
                    length: 2 * M,
                    flags: hole
                },
                Extent {
                    length: M,
                    flags: 0
                },
                Extent {
                    length: 2 * M,
                    flags: hole
                },
                Extent {
                    length: M,
                    flags: 0
                },
                Extent {
                    length: 2 * M,
                    flags: hole
                },
            ]
        );
        // A window inside, clipped at both ends, and the cap on the number of extents.
        assert_eq!(
            b.extents(M, 2 * M, 100).expect("extents"),
            vec![
                Extent {
                    length: M,
                    flags: hole
                },
                Extent {
                    length: M,
                    flags: 0
                }
            ]
        );
        assert_eq!(b.extents(0, 8 * M, 2).expect("extents").len(), 2);
    }

    #[test]
    fn zeroing_punches_holes_unless_no_hole() {
        const M: u64 = 1 << 20;
        let f = sparse_file(4 * M, &[(0, 4 * M as usize)]);
        let b = Backend::open(f.path(), false).expect("open");
        let before = allocated_bytes(f.path());
        b.write_zeroes(M, M, false, true, false).expect("punch");
        assert!(
            allocated_bytes(f.path()) <= before - M,
            "a hole was punched"
        );
        let mut buf = vec![1u8; M as usize];
        b.read_at(&mut buf, M).expect("read");
        assert!(buf.iter().all(|&x| x == 0));

        let before = allocated_bytes(f.path());
        b.write_zeroes(2 * M, M, true, false, true)
            .expect("zero range");
        assert_eq!(
            allocated_bytes(f.path()),
            before,
            "NO_HOLE keeps the blocks"
        );
        b.read_at(&mut buf, 2 * M).expect("read");
        assert!(buf.iter().all(|&x| x == 0));

        b.trim(3 * M, M, false).expect("trim");
        assert!(allocated_bytes(f.path()) <= before - M);
    }

    #[test]
    fn fua_writes_and_reads_round_trip() {
        let f = sparse_file(1 << 16, &[]);
        let b = Backend::open(f.path(), false).expect("open");
        b.write_at(b"hello", 100, true).expect("fua write");
        b.write_at(b"world", 200, false).expect("write");
        b.flush().expect("flush");
        let mut buf = [0u8; 5];
        b.read_at(&mut buf, 100).expect("read");
        assert_eq!(&buf, b"hello");
        b.read_at(&mut buf, 200).expect("read");
        assert_eq!(&buf, b"world");
        assert_eq!(b.size(), 1 << 16);
        assert_eq!(b.kind, Kind::RegularFile);
    }

    #[test]
    fn direct_and_cached_writes_stay_coherent() {
        const M: usize = 1 << 20;
        let f = sparse_file(4 * M as u64, &[]);
        let b = Backend::open(f.path(), false).expect("open");
        // A page-aligned 1 MiB buffer, so the write qualifies for the direct path.
        let mut raw = vec![0x22u8; M + 4096];
        let start = raw.as_ptr().align_offset(4096);
        let aligned = &mut raw[start..start + M];
        // Cached first (and read back, so the page cache holds the old bytes)...
        b.write_at(&[0x11u8; 4096 * 3], M as u64, false)
            .expect("small write");
        let mut back = vec![0u8; M];
        b.read_at(&mut back, M as u64).expect("read");
        assert!(back[..4096 * 3].iter().all(|&x| x == 0x11));
        // ...then direct over it: reads see the new bytes, not the cached ones.
        b.write_at(aligned, M as u64, false)
            .expect("large aligned write");
        b.read_at(&mut back, M as u64).expect("read");
        assert!(back.iter().all(|&x| x == 0x22));
        // An unaligned buffer takes the cached path, with the same result.
        raw[start + 1..start + 1 + M - 4096].fill(0x33);
        let unaligned = &raw[start + 1..start + 1 + M - 4096];
        b.write_at(unaligned, 2 * M as u64, false)
            .expect("unaligned write");
        b.flush().expect("flush");
        let mut back = vec![0u8; M - 4096];
        b.read_at(&mut back, 2 * M as u64).expect("read");
        assert_eq!(back, unaligned);
    }

    #[test]
    fn directories_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = Backend::open(dir.path(), true).expect_err("a directory is not an export");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
