//! The server's write path at a mirror's request sizes: large writes into holes (`fallocate`
//! of their range, then `O_DIRECT`), over allocated blocks (`O_DIRECT`) and unaligned (page
//! cache, early writeback), mixed with reads, flushes, zeroing and FUA writes on one pipelined
//! connection, must return the bytes written and allocate no more than that; a write that
//! fails must report its error to its own request and to no other.

use std::collections::HashMap;

use ferry::nbd::ServerConfig;
use ferry_harness::files::*;
use ferry_harness::nbd::*;
use ferry_harness::ops::Tmpfs;

/// One MiB of bytes that differ per `seed` and per position (a misplaced or stale block shows).
fn block(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (seed as u8).wrapping_mul(97) ^ (j as u8) ^ ((j >> 12) as u8))
        .collect()
}

#[test]
fn mirror_sized_writes_mixed_with_reads_and_flushes_return_the_bytes() {
    const M: usize = MIB as usize;
    let ts = TestServer::start(ServerConfig::default());
    let path = ts.export_new("d", 64 * MIB, false);
    let mut c = Raw::open(ts.addr(), "d", Style::Extended);
    // What each MiB of the export must hold, as the test goes.
    let mut expect: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut cookie = 0u64;
    let mut next = || {
        cookie += 1;
        cookie
    };

    // Round 1: 1 MiB writes into fresh holes, adjacent, pipelined like a mirror's 16 in flight.
    let mut acks = Vec::new();
    for i in (0..16u64).chain([44]) {
        let data = block(i, M);
        let k = next();
        c.write(k, i * MIB, &data);
        acks.push(k);
        expect.insert(i, data);
    }
    for k in acks.drain(..) {
        assert_eq!(c.reply(k).error, 0, "write {k} into a hole");
    }
    // Round 2: overwrites of those blocks (now allocated: the direct path), new writes into
    // holes, a FUA write, zeroing, reads of blocks acknowledged in round 1 and a flush, all
    // in flight at once.
    let mut reads = Vec::new();
    for i in 0..8u64 {
        let data = block(100 + i, M);
        let k = next();
        c.write(k, i * MIB, &data);
        acks.push(k);
        expect.insert(i, data);
        let k = next();
        c.read(k, (8 + i) * MIB, MIB);
        reads.push((k, 8 + i));
    }
    for i in 32..40u64 {
        let data = block(200 + i, M);
        let k = next();
        c.write(k, i * MIB, &data);
        acks.push(k);
        expect.insert(i, data);
    }
    let fua = block(300, M);
    let k = next();
    c.send(
        FLAG_FUA | FLAG_PAYLOAD_LEN,
        CMD_WRITE,
        k,
        48 * MIB,
        MIB,
        &fua,
    );
    acks.push(k);
    expect.insert(48, fua);
    let k = next();
    c.send(0, CMD_WRITE_ZEROES, k, 44 * MIB, MIB, &[]);
    acks.push(k);
    expect.insert(44, vec![0; M]);
    // An unaligned large write across two blocks goes through the page cache.
    let odd = block(400, M);
    let k = next();
    c.write(k, 20 * MIB + 512, &odd);
    acks.push(k);
    let flush = next();
    c.send(0, CMD_FLUSH, flush, 0, 0, &[]);
    for (k, i) in reads {
        let r = c.reply(k);
        assert_eq!(r.error, 0, "read {k}");
        assert!(
            r.assemble(i * MIB, M) == expect[&i],
            "block {i} read back while other writes were in flight"
        );
    }
    for k in acks {
        assert_eq!(c.reply(k).error, 0, "request {k}");
    }
    assert_eq!(c.reply(flush).error, 0, "flush");

    // Everything acknowledged reads back, over NBD and from the file.
    let mut want = vec![0u8; 64 * M];
    for (i, data) in &expect {
        let at = *i as usize * M;
        want[at..at + M].copy_from_slice(data);
    }
    want[20 * M + 512..21 * M + 512].copy_from_slice(&odd);
    for i in 0..64u64 {
        let k = next();
        c.read(k, i * MIB, MIB);
        let r = c.reply(k);
        assert_eq!(r.error, 0, "read {i}");
        let at = i as usize * M;
        assert!(r.assemble(i * MIB, M) == want[at..at + M], "block {i}");
    }
    c.send(0, CMD_DISC, 0, 0, 0, &[]);
    assert!(c.closed_by_server());
    let _dir = ts.shutdown();
    let on_disk = std::fs::read(&path).expect("image");
    assert!(on_disk == want, "the image holds every acknowledged write");
    // Only what was written is allocated: MiBs 0-15, 32-39 and 48, and the unaligned write's
    // 4 KiB blocks (MiB 20 and one block of 21); MiB 44 was zeroed into a hole again. ext4 may
    // add a block or two for its extent tree.
    let written = 26 * MIB + 4096;
    let allocated = allocated(&path);
    assert!(
        (written..=written + 8192).contains(&allocated),
        "{allocated} bytes allocated for {written} written"
    );
}

#[test]
fn a_failing_write_reports_its_error_to_its_own_request() {
    const M: usize = MIB as usize;
    let ts = TestServer::start(ServerConfig::default());
    // 6 MiB of room for a 32 MiB export: the writes past the room fail with ENOSPC.
    let mount = ts.dir.path().join("small");
    let tmpfs = Tmpfs::mount(&mount, "6m");
    let path = mount.join("d.raw");
    sparse_file(&path, 32 * MIB);
    ts.export("d", &path, false);
    let mut c = Raw::open(ts.addr(), "d", Style::Structured);
    for i in 0..16u64 {
        c.write(i, i * MIB, &block(i, M));
    }
    // Reads of an untouched range, in flight with the writes, succeed whatever the writes do.
    c.read(100, 24 * MIB, MIB);
    let r = c.reply(100);
    assert_eq!(r.error, 0, "a read among failing writes");
    assert!(r.assemble(24 * MIB, M).iter().all(|&b| b == 0));
    let (mut ok, mut full) = (Vec::new(), 0);
    for i in 0..16u64 {
        match c.reply(i).error {
            0 => ok.push(i),
            ENOSPC => full += 1,
            e => panic!("write {i}: error {e}, expected 0 or ENOSPC"),
        }
    }
    assert!(!ok.is_empty(), "the writes that fit succeed");
    assert!(full > 0, "the writes past the room fail");
    assert!(ok.len() <= 6, "{} MiB acknowledged on 6 MiB", ok.len());
    // Each acknowledged write holds its own bytes: no failure was reported to the wrong request.
    for &i in &ok {
        c.read(200 + i, i * MIB, MIB);
        let r = c.reply(200 + i);
        assert_eq!(r.error, 0);
        assert!(
            r.assemble(i * MIB, M) == block(i, M),
            "acknowledged write {i}"
        );
    }
    // The connection goes on: room made by punching a hole takes the next write.
    let last = *ok.last().unwrap_or(&0);
    c.send(0, CMD_TRIM, 300, last * MIB, MIB, &[]);
    assert_eq!(c.reply(300).error, 0, "trim");
    c.write(301, 31 * MIB, &block(31, M));
    assert_eq!(c.reply(301).error, 0, "a write after the room was freed");
    c.send(0, CMD_FLUSH, 302, 0, 0, &[]);
    assert_eq!(c.reply(302).error, 0, "flush");
    c.send(0, CMD_DISC, 0, 0, 0, &[]);
    assert!(c.closed_by_server());
    let dir = ts.shutdown();
    drop(tmpfs);
    drop(dir);
}
