//! Bad and unusual input on a raw socket: each case gets the answer `doc/proto.md` prescribes,
//! and the server keeps serving other clients (and other exports) afterwards.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ferry::nbd::ServerConfig;
use ferry::tls::migration::TLS_HOSTNAME;
use ferry_harness::files::*;
use ferry_harness::nbd::*;

const SIZE: u64 = 16 * MIB;

fn server() -> TestServer {
    TestServer::start(ServerConfig::default())
}

/// A quick check that an export still answers a read correctly.
fn still_serving(ts: &TestServer, name: &str) {
    let mut c = Raw::open(ts.addr(), name, Style::Structured);
    c.read(99, 0, 4096);
    let r = c.reply(99);
    assert_eq!(r.error, 0);
    assert_eq!(r.assemble(0, 4096).len(), 4096);
}

#[test]
fn out_of_range_read_and_write_keep_the_connection() {
    let ts = server();
    ts.export_new("d", SIZE, false);
    for style in [Style::Simple, Style::Structured, Style::Extended] {
        let mut c = Raw::open(ts.addr(), "d", style);
        assert_eq!(c.size, SIZE);
        c.read(1, SIZE - 512, 1024);
        assert_eq!(c.reply(1).error, EINVAL, "{style:?} read past the end");
        c.write(2, SIZE, &[7u8; 512]);
        assert_eq!(c.reply(2).error, ENOSPC, "{style:?} write past the end");
        c.send(0, CMD_WRITE_ZEROES, 3, SIZE - 4096, 8192, &[]);
        assert_eq!(c.reply(3).error, ENOSPC, "{style:?} zeroes past the end");
        c.send(0, CMD_TRIM, 4, u64::MAX - 10, 20, &[]);
        assert_eq!(
            c.reply(4).error,
            EINVAL,
            "{style:?} trim with an overflowing range"
        );
        // The rejected write's payload was consumed: the next request parses.
        c.write(5, SIZE - 512, &[9u8; 512]);
        assert_eq!(c.reply(5).error, 0);
        c.read(6, SIZE - 512, 512);
        let r = c.reply(6);
        assert_eq!(r.error, 0);
        assert_eq!(r.assemble(SIZE - 512, 512), vec![9u8; 512]);
    }
    let _dir = ts.shutdown();
}

#[test]
fn oversized_requests_are_refused_without_allocating() {
    let ts = server();
    ts.export_new("d", 64 * MIB, false);
    // Compact: a 40 MiB write is read and discarded, answered EINVAL; the connection goes on.
    let mut c = Raw::open(ts.addr(), "d", Style::Structured);
    let big = vec![0xabu8; 40 * MIB as usize];
    c.write(1, 0, &big);
    assert_eq!(c.reply(1).error, EINVAL);
    c.read(2, 0, 40 * MIB);
    assert_eq!(
        c.reply(2).error,
        EOVERFLOW,
        "structured replies: EOVERFLOW for big reads"
    );
    c.read(3, 0, 4096);
    let r = c.reply(3);
    assert_eq!(r.error, 0);
    assert_eq!(
        r.assemble(0, 4096),
        vec![0u8; 4096],
        "nothing of the refused write landed"
    );
    // Simple replies: an over-long read is the client breaking a MUST: EINVAL.
    let mut s = Raw::open(ts.addr(), "d", Style::Simple);
    s.read(1, 0, 33 * MIB);
    assert_eq!(s.reply(1).error, EINVAL);
    // A 4 GiB - 1 length in the header with no payload behind it: the server waits for the
    // payload to discard it and never allocates it; other clients are not affected.
    let mut hog = Raw::open(ts.addr(), "d", Style::Structured);
    hog.send(0, CMD_WRITE, 7, 0, u64::from(u32::MAX), &[]);
    still_serving(&ts, "d");
    drop(hog);
    // Extended headers: a payload above the maximum is a hard disconnect, as the spec advises.
    let mut e = Raw::open(ts.addr(), "d", Style::Extended);
    e.send(FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 0, 1 << 40, &[]);
    assert!(
        e.closed_by_server(),
        "extended oversized payload closes the connection"
    );
    still_serving(&ts, "d");
    let _dir = ts.shutdown();
}

#[test]
fn unknown_command_and_flags_get_einval() {
    let ts = server();
    ts.export_new("d", SIZE, false);
    let mut c = Raw::open(ts.addr(), "d", Style::Extended);
    c.send(0, 42, 1, 0, 4096, &[]);
    assert_eq!(c.reply(1).error, EINVAL);
    c.send(0x4000, CMD_READ, 2, 0, 4096, &[]);
    assert_eq!(c.reply(2).error, EINVAL);
    c.read(3, 0, 4096);
    assert_eq!(c.reply(3).error, 0);
    let _dir = ts.shutdown();
}

#[test]
fn unknown_option_then_go() {
    let ts = server();
    ts.export_new("d", SIZE, false);
    let mut c = Raw::connect(ts.addr());
    c.option(0xbeef, b"some data");
    let (opt, kind, _) = c.option_reply();
    assert_eq!((opt, kind), (0xbeef, REP_ERR_UNSUP));
    let mut go = name_data("nope");
    go.extend_from_slice(&0u16.to_be_bytes());
    c.option(OPT_GO, &go);
    let (_, kind, msg) = c.option_reply();
    assert_eq!(kind, REP_ERR_UNKNOWN);
    assert!(
        !String::from_utf8_lossy(&msg).contains("nope"),
        "the name is not echoed"
    );
    // Listing is off by default: the names are not handed out.
    c.option(OPT_LIST, &[]);
    assert_eq!(c.option_reply().1, REP_ERR_POLICY);
    let mut go = name_data("d");
    go.extend_from_slice(&0u16.to_be_bytes());
    c.option(OPT_GO, &go);
    let mut ok = false;
    for _ in 0..4 {
        if c.option_reply().1 == REP_ACK {
            ok = true;
            break;
        }
    }
    assert!(ok, "GO succeeds after the unknown option");
    let _dir = ts.shutdown();
}

#[test]
fn garbage_and_truncated_handshakes_close_only_that_connection() {
    let ts = server();
    ts.export_new("d", SIZE, false);
    let mut bystander = Raw::open(ts.addr(), "d", Style::Structured);

    let mut g = TcpStream::connect(ts.addr()).expect("connect");
    g.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut greeting = [0u8; 18];
    g.read_exact(&mut greeting).expect("greeting");
    g.write_all(b"\0\0\0\x03GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("garbage");
    let rest = read_until_closed(&mut g).expect("the server closes a garbage handshake");
    assert!(rest.is_empty(), "garbage gets no reply, only a close");

    // Unknown client flags: closed.
    let mut f = TcpStream::connect(ts.addr()).expect("connect");
    f.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    f.read_exact(&mut greeting).expect("greeting");
    f.write_all(&0xffu32.to_be_bytes()).expect("flags");
    let rest = read_until_closed(&mut f).expect("the server closes on unknown client flags");
    assert!(rest.is_empty());

    // Truncated option: header promises 100 bytes, 10 arrive, then the client leaves.
    let mut t = Raw::connect(ts.addr());
    let mut b = Vec::new();
    b.extend_from_slice(IHAVEOPT);
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&100u32.to_be_bytes());
    b.extend_from_slice(&[0u8; 10]);
    t.s.write_all(&b).expect("truncated option");
    drop(t);

    // The established connection never noticed.
    bystander.read(1, 0, 4096);
    assert_eq!(bystander.reply(1).error, 0);
    still_serving(&ts, "d");
    let _dir = ts.shutdown();
}

#[test]
fn stalled_handshake_is_dropped_after_the_timeout() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let ts = TestServer::start(config);
    ts.export_new("d", SIZE, false);
    let started = Instant::now();
    let mut stalled = TcpStream::connect(ts.addr()).expect("connect");
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut greeting = [0u8; 18];
    stalled.read_exact(&mut greeting).expect("greeting");
    // Half an option header, then silence.
    stalled.write_all(&3u32.to_be_bytes()).expect("flags");
    stalled.write_all(b"IHAV").expect("partial header");
    // Meanwhile another client is served.
    still_serving(&ts, "d");
    let rest = read_until_closed(&mut stalled).expect("the server drops a stalled handshake");
    let waited = started.elapsed();
    assert!(rest.is_empty());
    assert!(
        waited >= Duration::from_millis(250),
        "closed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "closed too late: {waited:?}"
    );
    let _dir = ts.shutdown();
}

#[test]
fn connections_are_bounded() {
    let config = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let ts = TestServer::start(config);
    ts.export_new("d", SIZE, false);
    let a = Raw::open(ts.addr(), "d", Style::Simple);
    let b = Raw::open(ts.addr(), "d", Style::Simple);
    let mut third = TcpStream::connect(ts.addr()).expect("connect");
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 18];
    assert_eq!(
        third.read(&mut buf).unwrap_or(0),
        0,
        "over the limit: closed at once"
    );
    drop(a);
    // The slot frees once the server sees the close.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = TcpStream::connect(ts.addr()).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        if c.read(&mut buf).unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(b);
    let _dir = ts.shutdown();
}

#[test]
fn disconnect_with_requests_in_flight() {
    let ts = server();
    let path = ts.export_new("d", 64 * MIB, false);
    ts.export_new("other", SIZE, false);
    let mut c = Raw::open(ts.addr(), "d", Style::Structured);
    let data = vec![0x5au8; MIB as usize];
    for i in 0..32 {
        c.write(i, i * MIB, &data);
    }
    c.send(0, CMD_FLUSH, 100, 0, 0, &[]);
    // Gone without reading a single reply or sending NBD_CMD_DISC.
    drop(c);
    still_serving(&ts, "other");
    still_serving(&ts, "d");
    let _dir = ts.shutdown();
    // Whatever the server had read was written whole: each MiB is all old or all new.
    let bytes = std::fs::read(&path).expect("read image");
    for chunk in bytes[..32 * MIB as usize].chunks(MIB as usize) {
        assert!(chunk.iter().all(|&b| b == 0) || chunk.iter().all(|&b| b == 0x5a));
    }
}

#[test]
fn pipelined_requests_all_answered_by_cookie() {
    let ts = server();
    let path = ts.export_new("d", 64 * MIB, false);
    let mut c = Raw::open(ts.addr(), "d", Style::Extended);
    let mut expect = Vec::new();
    for i in 0..48u64 {
        let block: Vec<u8> = (0..256 * 1024)
            .map(|j| (i as u8).wrapping_mul(31) ^ (j as u8))
            .collect();
        c.write(i, i * MIB, &block);
        expect.push(block);
    }
    c.send(FLAG_FUA, CMD_WRITE_ZEROES, 1000, 50 * MIB, MIB, &[]);
    c.send(0, CMD_FLUSH, 1001, 0, 0, &[]);
    for i in (0..48u64).rev() {
        assert_eq!(c.reply(i).error, 0, "write {i}");
    }
    assert_eq!(c.reply(1000).error, 0);
    assert_eq!(c.reply(1001).error, 0);
    for i in 0..48u64 {
        c.read(2000 + i, i * MIB, 256 * 1024);
    }
    for i in 0..48u64 {
        let r = c.reply(2000 + i);
        assert_eq!(r.error, 0);
        assert_eq!(
            r.assemble(i * MIB, 256 * 1024),
            expect[i as usize],
            "read back {i}"
        );
    }
    c.send(0, CMD_DISC, 0, 0, 0, &[]);
    assert!(c.closed_by_server());
    let _dir = ts.shutdown();
    let f = std::fs::read(&path).expect("image");
    assert_eq!(
        &f[3 * MIB as usize..3 * MIB as usize + 256 * 1024],
        &expect[3][..]
    );
}

#[test]
fn reads_send_holes_and_block_status_reports_them() {
    let ts = server();
    let path = ts.dir.path().join("holes.raw");
    sparse_file(&path, 8 * MIB);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0x11u8; MIB as usize], 2 * MIB)
        .expect("data");
    drop(f);
    ts.export("h", &path, true);
    for style in [Style::Structured, Style::Extended] {
        let mut c = Raw::open(ts.addr(), "h", style);
        assert_ne!(c.flags & TFLAG_READ_ONLY, 0);
        assert_ne!(c.flags & TFLAG_CAN_MULTI_CONN, 0);
        c.read(1, MIB, 3 * MIB);
        let r = c.reply(1);
        assert_eq!(r.error, 0);
        let bytes = r.assemble(MIB, 3 * MIB as usize);
        assert!(bytes[..MIB as usize].iter().all(|&b| b == 0));
        assert!(bytes[MIB as usize..2 * MIB as usize]
            .iter()
            .all(|&b| b == 0x11));
        let holes: u64 = r
            .pieces
            .iter()
            .filter(|p| p.hole)
            .map(|p| p.data.len() as u64)
            .sum();
        assert_eq!(
            holes,
            2 * MIB,
            "{style:?}: the 2 MiB of holes travel as hole chunks"
        );
        // Don't-fragment: one data chunk with the zeroes in it.
        c.send(FLAG_DF, CMD_READ, 2, MIB, 3 * MIB, &[]);
        let r = c.reply(2);
        assert_eq!(r.pieces.len(), 1);
        assert_eq!(r.assemble(MIB, 3 * MIB as usize), bytes);

        c.send(0, CMD_BLOCK_STATUS, 3, 0, 8 * MIB, &[]);
        let r = c.reply(3);
        assert_eq!(r.error, 0);
        assert_eq!(
            r.extents,
            vec![(2 * MIB, 3), (MIB, 0), (5 * MIB, 3)],
            "{style:?}"
        );
        // Writes to a read-only export: EPERM.
        c.write(4, 0, &[1u8; 512]);
        assert_eq!(c.reply(4).error, EPERM);
    }
    let _dir = ts.shutdown();
}

#[test]
fn write_zeroes_punches_holes_unless_no_hole() {
    let ts = server();
    let path = ts.export_new("z", 8 * MIB, false);
    let mut c = Raw::open(ts.addr(), "z", Style::Extended);
    let data = vec![0x77u8; 4 * MIB as usize];
    c.write(1, 0, &data);
    assert_eq!(c.reply(1).error, 0);
    c.send(0, CMD_FLUSH, 2, 0, 0, &[]);
    assert_eq!(c.reply(2).error, 0);
    let full = allocated(&path);
    assert!(full >= 4 * MIB);
    c.send(FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 3, 0, MIB, &[]);
    assert_eq!(c.reply(3).error, 0, "punching a hole is a fast zero");
    c.send(FLAG_NO_HOLE, CMD_WRITE_ZEROES, 4, MIB, MIB, &[]);
    assert_eq!(c.reply(4).error, 0);
    c.send(0, CMD_TRIM, 5, 2 * MIB, MIB, &[]);
    assert_eq!(c.reply(5).error, 0);
    assert!(
        allocated(&path) <= full - 2 * MIB,
        "zeroes without NO_HOLE and trim free blocks"
    );
    assert!(allocated(&path) >= 2 * MIB, "NO_HOLE keeps its blocks");
    c.read(6, 0, 2 * MIB);
    assert_eq!(
        c.reply(6).assemble(0, 2 * MIB as usize),
        vec![0u8; 2 * MIB as usize]
    );
    let _dir = ts.shutdown();
}

/// The pattern of a mirror onto a sparse disk: zeroing requests over holes pipelined with
/// writes. Zeroing and trims over holes are answered by the write lane without touching the
/// file; one over data written earlier still frees it; every request gets its answer.
#[test]
fn zeroing_over_holes_pipelined_with_writes() {
    let ts = server();
    let path = ts.export_new("p", 64 * MIB, false);
    let mut c = Raw::open(ts.addr(), "p", Style::Extended);
    let old = vec![0x42u8; MIB as usize];
    c.write(1, 60 * MIB, &old);
    assert_eq!(c.reply(1).error, 0);
    // MiB i < 32: even ones written, odd ones zeroed (holes); 32..48 trimmed (holes); 60
    // (data) zeroed.
    let mut cookies = Vec::new();
    for i in 0..32u64 {
        let cookie = 100 + i;
        if i % 2 == 0 {
            c.write(cookie, i * MIB, &vec![i as u8 + 1; MIB as usize]);
        } else {
            c.send(0, CMD_WRITE_ZEROES, cookie, i * MIB, MIB, &[]);
        }
        cookies.push(cookie);
    }
    c.send(0, CMD_TRIM, 200, 32 * MIB, 16 * MIB, &[]);
    c.send(0, CMD_WRITE_ZEROES, 201, 60 * MIB, MIB, &[]);
    cookies.extend([200, 201]);
    for cookie in cookies {
        assert_eq!(c.reply(cookie).error, 0, "request {cookie}");
    }
    c.send(0, CMD_FLUSH, 300, 0, 0, &[]);
    assert_eq!(c.reply(300).error, 0);
    for i in 0..32u64 {
        let want = if i % 2 == 0 { i as u8 + 1 } else { 0 };
        c.read(400 + i, i * MIB, MIB);
        let got = c.reply(400 + i).assemble(i * MIB, MIB as usize);
        assert!(got.iter().all(|&b| b == want), "MiB {i} reads {want}");
    }
    c.read(500, 60 * MIB, MIB);
    assert_eq!(
        c.reply(500).assemble(60 * MIB, MIB as usize),
        vec![0u8; MIB as usize],
        "zeroing over data"
    );
    let used = allocated(&path);
    assert!(
        (16 * MIB..17 * MIB).contains(&used),
        "only the 16 written MiB are allocated, not the zeroed ones nor the freed data: {used}"
    );
    let _dir = ts.shutdown();
}

#[test]
fn shutdown_and_removal_finish_in_flight_requests() {
    let ts = server();
    let path = ts.export_new("a", 64 * MIB, false);
    ts.export_new("b", SIZE, false);
    let mut c = Raw::open(ts.addr(), "a", Style::Structured);
    let block = vec![0xc3u8; MIB as usize];
    for i in 0..32 {
        c.write(i, i * MIB, &block);
    }
    // Make sure the server has read at least the first request before removal starts.
    assert_eq!(c.reply(0).error, 0);
    ts.rt
        .block_on(ts.server.remove_export("a"))
        .expect("removal flushes cleanly");
    // Every reply the server sent is a success, the connection then closes, and every
    // acknowledged write is in the file.
    let mut acked = vec![0u64];
    for i in 1..32 {
        let mut probe = [0u8; 1];
        match c.s.peek(&mut probe) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the connection neither answered nor closed: {e}"),
        }
        let r = c.reply(i);
        assert_eq!(r.error, 0);
        acked.push(i);
    }
    assert!(c.closed_by_server());
    let bytes = std::fs::read(&path).expect("image");
    for i in &acked {
        let at = (*i * MIB) as usize;
        assert!(
            bytes[at..at + MIB as usize].iter().all(|&b| b == 0xc3),
            "acked write {i}"
        );
    }
    // The removed export is gone; the other one is still served.
    let mut g = Raw::connect(ts.addr());
    let mut go = name_data("a");
    go.extend_from_slice(&0u16.to_be_bytes());
    g.option(OPT_GO, &go);
    assert_eq!(g.option_reply().1, REP_ERR_UNKNOWN);
    still_serving(&ts, "b");
    let err = ts
        .rt
        .block_on(ts.server.remove_export("a"))
        .expect_err("already removed");
    assert!(err.to_string().contains("no export named \"a\""), "{err}");
    let _dir = ts.shutdown();
}

#[test]
fn add_export_errors_name_the_path() {
    let ts = server();
    let missing = ts.dir.path().join("does-not-exist.raw");
    let err = ts
        .server
        .add_export(ferry::nbd::Export {
            name: "x".into(),
            path: missing.clone(),
            read_only: false,
        })
        .expect_err("missing file");
    let text = err.to_string();
    assert!(text.contains(missing.to_str().expect("utf-8")), "{text}");
    ts.export_new("x", SIZE, false);
    let again = ts.dir.path().join("x.raw");
    let err = ts
        .server
        .add_export(ferry::nbd::Export {
            name: "x".into(),
            path: again,
            read_only: false,
        })
        .expect_err("duplicate");
    assert!(err.to_string().contains("already served"), "{err}");
    let _dir = ts.shutdown();
}

#[test]
fn slow_reader_gets_every_reply_intact() {
    let ts = server();
    let path = ts.export_new("d", 64 * MIB, false);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    let pattern: Vec<u8> = (0..64 * MIB)
        .map(|i| (i / 4096) as u8 ^ (i as u8))
        .collect();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern, 0).expect("fill");
    drop(f);
    for style in [Style::Simple, Style::Structured, Style::Extended] {
        let mut c = Raw::open(ts.addr(), "d", style);
        // 48 MiB of replies: far more than the socket buffers, so replies queue in the server
        // while the client is not reading, and go out whole and in one piece each later.
        for i in 0..48u64 {
            c.read(i, i * MIB, MIB);
        }
        std::thread::sleep(Duration::from_millis(300));
        for i in (0..48u64).rev() {
            let r = c.reply(i);
            assert_eq!(r.error, 0);
            let at = (i * MIB) as usize;
            assert!(
                r.assemble(i * MIB, MIB as usize) == pattern[at..at + MIB as usize],
                "{style:?} read {i}"
            );
        }
    }
    let _dir = ts.shutdown();
}

// ---- TLS ----------------------------------------------------------------------------------------

/// A server requiring TLS with one migration's credentials, and a client configuration with
/// that migration's client certificate.
fn tls_server() -> (TestServer, std::sync::Arc<rustls::ClientConfig>) {
    let files = tempfile::tempdir().expect("temp dir");
    let (creds, config) = pki::Creds::migration(files.path(), "m");
    let ts = TestServer::start(ServerConfig {
        tls: Some(config),
        ..ServerConfig::default()
    });
    (ts, creds.client_config())
}

#[test]
fn tls_slow_reader_gets_every_reply_intact() {
    let (ts, client) = tls_server();
    let path = ts.export_new("d", 64 * MIB, false);
    let pattern: Vec<u8> = (0..64 * MIB)
        .map(|i| (i / 4096) as u8 ^ (i as u8) ^ 0x5a)
        .collect();
    std::fs::write(&path, &pattern).expect("fill");
    for style in [Style::Simple, Style::Structured, Style::Extended] {
        let mut c = Raw::open_tls(ts.addr(), "d", style, client.clone(), TLS_HOSTNAME);
        // 48 MiB of replies queue in the server's writer while the client is not reading
        // (its request slots stay taken meanwhile), then go out whole.
        for i in 0..48u64 {
            c.read(i, i * MIB, MIB);
        }
        std::thread::sleep(Duration::from_millis(300));
        for i in (0..48u64).rev() {
            let r = c.reply(i);
            assert_eq!(r.error, 0);
            let at = (i * MIB) as usize;
            assert!(
                r.assemble(i * MIB, MIB as usize) == pattern[at..at + MIB as usize],
                "{style:?} read {i} over TLS"
            );
        }
    }
    let _dir = ts.shutdown();
}

#[test]
fn tls_removal_finishes_in_flight_writes_and_closes_with_close_notify() {
    let (ts, client) = tls_server();
    let path = ts.export_new("a", 64 * MIB, false);
    let mut c = Raw::open_tls(ts.addr(), "a", Style::Extended, client, TLS_HOSTNAME);
    let block = vec![0x3cu8; MIB as usize];
    for i in 0..32 {
        c.write(i, i * MIB, &block);
    }
    assert_eq!(c.reply(0).error, 0);
    ts.rt
        .block_on(ts.server.remove_export("a"))
        .expect("removal flushes cleanly");
    // Every reply that came is a success, then the session ends with close_notify (a bare TCP
    // close would fail here), and every acknowledged write is in the file.
    let mut acked = vec![0u64];
    for (cookie, reply) in c.replies_until_closed() {
        assert_eq!(reply.error, 0, "write {cookie}");
        acked.push(cookie);
    }
    let bytes = std::fs::read(&path).expect("image");
    for i in &acked {
        let at = (*i * MIB) as usize;
        assert!(
            bytes[at..at + MIB as usize].iter().all(|&b| b == 0x3c),
            "acked write {i}"
        );
    }
    let _dir = ts.shutdown();
}
