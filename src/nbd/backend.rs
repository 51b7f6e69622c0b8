//! The storage behind an export: a raw file or a block device, accessed with positional I/O.
//!
//! Every method here blocks (disk I/O, `fdatasync`, `fallocate`); the connection code runs them
//! off the runtime threads. Methods take `&self` and never touch the file offset's meaning (only
//! `pread`/`pwrite`/`lseek(SEEK_DATA|SEEK_HOLE)`), so any number of requests from any number of
//! connections run at once on the same open file.
//!
//! Three descriptors of the one file: the main one (reads, small or unaligned writes, through
//! the page cache), one with `O_DIRECT` (large page-aligned writes go straight to the disk;
//! into a hole after a `fallocate` of their range, see [`Backend::route`]) and one with
//! `O_DSYNC` (FUA writes: durable on return without syncing the rest of the file). The kernel
//! keeps cached and direct views coherent. A large cached write has its writeback started at
//! once (`super::writeback`), so a flush finds little left to write.
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

/// How a plain write goes to the file (see [`Backend::route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// `O_DIRECT`, straight to the disk.
    Direct,
    /// Into a hole: the range allocated first (`fallocate`, so that ext4 lets such writes run
    /// side by side), then `O_DIRECT`.
    AllocateDirect,
    /// Through the page cache, its writeback started at once.
    Cached,
}

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
    /// Cleared once the file refuses `fallocate` (a file system without it): writes into holes
    /// then go through the page cache.
    allocate_ok: AtomicBool,
    /// Cleared once the file refuses `sync_file_range` (see [`super::writeback`]).
    writeback_ok: AtomicBool,
    /// Background `fdatasync` every so many bulk bytes (see [`super::writeback::Syncer`]).
    syncer: super::writeback::Syncer,
}

/// Writes at least this large go to disk directly when aligned (see `Backend::route`).
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
            allocate_ok: AtomicBool::new(true),
            writeback_ok: AtomicBool::new(true),
            syncer: Default::default(),
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
    /// the disk directly: large, aligned, and the file takes direct I/O.
    pub(crate) fn goes_direct(&self, offset: u64, len: usize) -> bool {
        self.direct.is_some()
            && self.direct_ok.load(Ordering::Relaxed)
            && len >= DIRECT_FROM
            && offset % ALIGN == 0
            && len as u64 % ALIGN == 0
    }

    /// How a plain (not FUA) write of `len` bytes at `offset` will go: [`Route::Direct`] over
    /// allocated blocks, [`Route::AllocateDirect`] into a hole, [`Route::Cached`] when too
    /// small or unaligned (or the file refuses `fallocate`). Blocks (one `lseek`): call it off
    /// the runtime threads.
    ///
    /// Why direct: the copy into the page cache is most of a page-cache server's CPU, and on a
    /// virtual machine whose host takes back freed memory (free page reporting) every page the
    /// cache takes anew costs a fault on the host too: the same mirror ran at 0.36-1.06 s/GiB
    /// of server CPU through the cache, 0.28-0.36 direct (BENCHMARKS.md, session 11).
    /// Why `fallocate` first into a hole: ext4 runs a direct write that allocates blocks alone
    /// (inode lock held exclusively), one device round trip at a time, so a mirror's 1 MiB
    /// requests into a fresh image went at queue depth one (0.5-0.8x a page-cache server on a
    /// slow disk, BENCHMARKS.md); over blocks already allocated, even unwritten ones, aligned
    /// direct writes share the lock and run side by side. The `fallocate` covers only the
    /// write's own range, so the image stays as sparse as what was written.
    pub(crate) fn route(&self, offset: u64, len: usize) -> Route {
        if !self.goes_direct(offset, len) {
            Route::Cached
        } else if !self.hole_at(offset) {
            Route::Direct
        } else if self.allocate_ok.load(Ordering::Relaxed) {
            Route::AllocateDirect
        } else {
            Route::Cached
        }
    }

    /// Writes `data` at `offset`; with `fua` it is on stable storage when this returns. The
    /// route is chosen here (see [`Backend::route`]).
    #[cfg(test)]
    pub(crate) fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let route = if fua {
            Route::Cached
        } else {
            self.route(offset, data.len())
        };
        self.write_routed(data, offset, fua, route)
    }

    /// Writes `data` at `offset` the way [`Backend::route`] chose (FUA writes always go through
    /// the `O_DSYNC` descriptor). A direct write falls back to the page cache when the buffer
    /// is not page-aligned, the device wants a larger alignment or the file refuses
    /// `fallocate`. The kernel keeps the cached and direct views coherent. A failed
    /// `fallocate` or direct write of any other kind fails the write: if the range was
    /// allocated before the write failed, it reads as zeroes, as a hole does.
    ///
    /// A large cached write has its writeback started at once (see [`super::writeback`]), so
    /// the disk works while the rest of the data arrives instead of all at the next flush.
    pub(crate) fn write_routed(
        &self,
        data: &[u8],
        offset: u64,
        fua: bool,
        route: Route,
    ) -> io::Result<()> {
        if !fua && route != Route::Cached && self.direct_ok.load(Ordering::Relaxed) {
            if let Some(direct) = &self.direct {
                let aligned = offset % ALIGN == 0
                    && data.len() as u64 % ALIGN == 0
                    && data.as_ptr() as usize % ALIGN as usize == 0;
                if aligned && (route == Route::Direct || self.allocate(offset, data.len())?) {
                    match direct.write_all_at(data, offset) {
                        Ok(()) => {
                            self.syncer.wrote(&self.file, data.len() as u64);
                            return Ok(());
                        }
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
            _ => {
                self.file.write_all_at(data, offset)?;
                if data.len() >= DIRECT_FROM {
                    self.start_writeback(offset, data.len() as u64)?;
                    self.syncer.wrote(&self.file, data.len() as u64);
                }
                Ok(())
            }
        }
    }

    /// Allocates `[offset, offset + len)` ahead of a direct write into a hole (see
    /// [`Backend::route`]): true when done, false when the file refuses `fallocate` (then
    /// holes go through the page cache from now on); any other error (`ENOSPC`, `EIO`) is the
    /// write's.
    fn allocate(&self, offset: u64, len: usize) -> io::Result<bool> {
        if !self.allocate_ok.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match self.fallocate(FallocateFlags::FALLOC_FL_KEEP_SIZE, offset, len as u64) {
            Ok(()) => Ok(true),
            Err(e @ (Errno::EOPNOTSUPP | Errno::ENOSYS)) => {
                tracing::debug!(error = %e, "fallocate refused; holes now go through the cache");
                self.allocate_ok.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Starts writing a large cached write to the disk now rather than at the next flush (see
    /// [`super::writeback`]). A file that refuses the call is left to the kernel's own
    /// writeback from then on; any other error (the disk failing to take the range) is this
    /// write's error: its data may never reach the disk, so it is not acknowledged.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.writeback_ok.load(Ordering::Relaxed) {
            return Ok(());
        }
        match super::writeback::start(&self.file, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if super::writeback::refused(&e) => {
                tracing::debug!(error = %e, "early writeback refused; leaving it to the kernel");
                self.writeback_ok.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e),
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

    /// Whether `[offset, offset + len)` of a regular file is one hole already (reads as zeroes,
    /// nothing allocated), so zeroing or trimming it has nothing to do. A mirror zeroes every
    /// hole of its source on a target that is all holes: punching them again costs a journal
    /// transaction each (ext4 updates the file's times), hundreds per disk. Unknown is "no".
    /// One `lseek`: cheap enough that a connection's write lane asks it itself rather than wake
    /// a blocking-pool thread for such a request (1280 of them for a 20 GiB sparse disk).
    pub(crate) fn all_hole(&self, offset: u64, len: u64) -> bool {
        if !matches!(self.kind, Kind::RegularFile) || len == 0 {
            return false;
        }
        let Ok(at) = i64::try_from(offset) else {
            return false;
        };
        match lseek(self.file.as_raw_fd(), at, Whence::SeekData) {
            Ok(data) => u64::try_from(data).is_ok_and(|d| d >= offset.saturating_add(len)),
            Err(Errno::ENXIO) => true,
            Err(_) => false,
        }
    }

    /// `fdatasync`: every write completed before this call, on any connection, is durable.
    /// Fails for good once a background sync failed (see [`super::writeback::Syncer`]).
    pub(crate) fn flush(&self) -> io::Result<()> {
        self.file.sync_data()?;
        // Its own error, as the kernel gave it (ENOSPC stays ENOSPC for the client); the
        // background sync's warning in the log says where it came from.
        self.syncer.failure().map_or(Ok(()), Err)
    }

    /// Discards a range: punches a hole where the storage can; otherwise does nothing (a trim is
    /// a hint and the client may not rely on the contents afterwards).
    pub(crate) fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        if self.all_hole(offset, len) {
            return Ok(());
        }
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
            (Kind::RegularFile, false) if self.all_hole(offset, len) => return Ok(()),
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
mod tests;
