//! The backend against real files in the temp dir: routes, holes, zeroing, coherence.

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
    assert!(b.direct.is_some(), "the temp dir takes O_DIRECT");
    // In a hole a direct write would allocate (and serialize on ext4): its range is allocated
    // first.
    assert_eq!(b.route(0, M as usize), Route::AllocateDirect);
    assert_eq!(b.route(2 * M, M as usize), Route::Direct);
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
    assert_eq!(
        allocated_bytes(f.path()),
        2 * M,
        "only the written ranges are allocated"
    );
}

#[test]
fn direct_writes_into_holes_side_by_side_allocate_only_their_ranges() {
    const M: usize = 1 << 20;
    let f = sparse_file(64 * M as u64, &[]);
    let b = Backend::open(f.path(), false).expect("open");
    // Eight threads each write every other MiB of their own 8 MiB, as a mirror's requests in
    // flight do, through the route the lane would choose.
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let b = &b;
            s.spawn(move || {
                let mut raw = vec![0u8; M + 4096];
                let start = raw.as_ptr().align_offset(4096);
                for i in (0..8u64).step_by(2) {
                    let at = (t * 8 + i) * M as u64;
                    let data = &mut raw[start..start + M];
                    data.fill((t * 8 + i) as u8 + 1);
                    let route = b.route(at, M);
                    assert_eq!(route, Route::AllocateDirect, "at {at}");
                    b.write_routed(data, at, false, route).expect("write");
                }
            });
        }
    });
    b.flush().expect("flush");
    assert!(b.allocate_ok.load(Ordering::Relaxed));
    assert!(
        b.direct_ok.load(Ordering::Relaxed),
        "the writes went direct"
    );
    // Data exactly where written (st_blocks would also count ext4's extent tree block).
    let extents = b.extents(0, 64 * M as u64, 1000).expect("extents");
    assert_eq!(extents.len(), 64, "{extents:?}");
    for (i, e) in extents.iter().enumerate() {
        assert_eq!(e.length, M as u64, "extent {i}");
        let hole = e.flags & state::HOLE != 0;
        assert_eq!(hole, i % 2 == 1, "extent {i}: {e:?}");
    }
    let image = std::fs::read(f.path()).expect("read the image");
    for (i, mib) in image.chunks(M).enumerate() {
        let want = if i % 2 == 0 { i as u8 + 1 } else { 0 };
        assert!(mib.iter().all(|&x| x == want), "MiB {i}");
    }
}

#[test]
fn a_file_that_refuses_fallocate_takes_writes_into_holes_through_the_page_cache() {
    const M: usize = 1 << 20;
    let f = sparse_file(4 * M as u64, &[]);
    let b = Backend::open(f.path(), false).expect("open");
    b.allocate_ok.store(false, Ordering::Relaxed);
    assert_eq!(b.route(0, M), Route::Cached);
    // A write routed before the refusal was known still lands, through the cache.
    let raw = vec![0x42u8; M + 4096];
    let start = raw.as_ptr().align_offset(4096);
    b.write_routed(&raw[start..start + M], 0, false, Route::AllocateDirect)
        .expect("write");
    let mut back = vec![0u8; M];
    b.read_at(&mut back, 0).expect("read");
    assert!(back.iter().all(|&x| x == 0x42));
    assert_eq!(b.route(0, M), Route::Direct, "allocated now: direct");
}

#[test]
fn large_cached_writes_start_their_writeback() {
    const M: usize = 1 << 20;
    let f = sparse_file(4 * M as u64, &[]);
    let b = Backend::open(f.path(), false).expect("open");
    let raw = vec![0x77u8; M + 4096];
    let start = raw.as_ptr().align_offset(4096);
    let data = &raw[start..start + M];
    b.write_routed(data, 0, false, Route::Cached)
        .expect("cached write");
    // The file system took `sync_file_range` (a wrong flag or range would have turned the
    // early writeback off for the file).
    assert!(b.writeback_ok.load(Ordering::Relaxed));
    assert_eq!(b.route(0, M), Route::Direct, "allocated now: direct");
    assert_eq!(b.route(0, M - 512), Route::Cached, "unaligned length");
    assert_eq!(b.route(512, M), Route::Cached, "unaligned offset");
    assert_eq!(b.route(0, 4096), Route::Cached, "small");
    b.flush().expect("flush");
    let mut back = vec![0u8; M];
    b.read_at(&mut back, 0).expect("read");
    assert!(back == data);
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
fn zeroing_a_hole_again_does_nothing() {
    const M: u64 = 1 << 20;
    let f = sparse_file(4 * M, &[(2 * M, M as usize)]);
    let b = Backend::open(f.path(), false).expect("open");
    let before = std::fs::metadata(f.path())
        .expect("stat")
        .modified()
        .expect("mtime");
    std::thread::sleep(std::time::Duration::from_millis(20));
    // All hole: no punch (which would update the file's times), the range still reads zeroes.
    b.write_zeroes(0, 2 * M, false, true, false)
        .expect("zero a hole");
    b.trim(3 * M, M, false).expect("trim a hole");
    let after = std::fs::metadata(f.path())
        .expect("stat")
        .modified()
        .expect("mtime");
    assert_eq!(before, after, "nothing was done to the file");
    let mut buf = vec![1u8; 2 * M as usize];
    b.read_at(&mut buf, 0).expect("read");
    assert!(buf.iter().all(|&x| x == 0));
    // A range that reaches into data is punched.
    b.write_zeroes(M, 2 * M, false, true, false)
        .expect("zero into data");
    assert!(b.all_hole(0, 4 * M), "the data is gone");
    assert!(allocated_bytes(f.path()) < M);
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

#[test]
fn a_failed_background_sync_fails_every_later_flush() {
    fn failing(_: &File) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
    let f = sparse_file(1 << 20, &[]);
    let mut b = Backend::open(f.path(), false).expect("open");
    b.flush().expect("a flush before any failure");
    b.syncer = super::super::writeback::Syncer::with_sync(failing);
    b.syncer.wrote(&b.file, super::super::writeback::SYNC_EVERY);
    super::super::writeback::tests::wait_for("the background sync ran", || {
        b.syncer.failure().is_some()
    });
    for _ in 0..2 {
        let e = b.flush().expect_err("the data may be lost");
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert_eq!(nbd_errno(&e), super::super::wire::errno::EIO);
    }
}

#[test]
fn every_64_mib_of_large_writes_syncs_in_the_background() {
    use super::super::writeback::{Syncer, SYNC_EVERY};
    static SYNCS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    fn counted(f: &File) -> io::Result<()> {
        SYNCS.fetch_add(1, Ordering::SeqCst);
        f.sync_data()
    }
    const M: usize = 1 << 20;
    let f = sparse_file(SYNC_EVERY + M as u64, &[]);
    let mut b = Backend::open(f.path(), false).expect("open");
    b.syncer = Syncer::with_sync(counted);
    let raw = vec![0x33u8; M + 4096];
    let start = raw.as_ptr().align_offset(4096);
    let data = &raw[start..start + M];
    // Small writes do not count.
    for i in 0..64u64 {
        b.write_at(&data[..4096], i * 4096, false)
            .expect("small write");
    }
    let blocks = (SYNC_EVERY / M as u64) as usize;
    for i in 0..blocks - 1 {
        b.write_at(data, (i * M) as u64, false)
            .expect("large write");
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(SYNCS.load(Ordering::SeqCst), 0, "not before 64 MiB");
    b.write_at(data, ((blocks - 1) * M) as u64, false)
        .expect("the 64th MiB");
    super::super::writeback::tests::wait_for("a background sync ran", || {
        SYNCS.load(Ordering::SeqCst) > 0
    });
    b.flush().expect("nothing failed");
}
