//! A raw NBD client over a blocking socket, and the protocol's numbers it needs.
//!
//! It encodes and decodes by hand from the NBD spec (`doc/proto.md`) on purpose: it must not
//! share code with the server it checks, so a misreading of the spec in one cannot hide the same
//! misreading in the other.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::files::MIB;

pub const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
pub const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_DF: u16 = 4;
pub const FLAG_FAST_ZERO: u16 = 16;
pub const FLAG_PAYLOAD_LEN: u16 = 32;
pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const TFLAG_READ_ONLY: u16 = 2;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Simple,
    Structured,
    Extended,
}

/// What one request got back.
#[derive(Debug, Default, Clone)]
pub struct Reply {
    /// First error (simple reply error or error chunk), 0 if none.
    pub error: u32,
    /// Read content as (offset, data); holes come back as zero-filled data with `hole` set.
    pub pieces: Vec<Piece>,
    /// Block status extents (length, flags).
    pub extents: Vec<(u64, u64)>,
    /// Number of messages (simple reply or chunks) the reply took.
    pub messages: usize,
}

#[derive(Debug, Clone)]
pub struct Piece {
    pub offset: u64,
    pub data: Vec<u8>,
    pub hole: bool,
}

impl Reply {
    /// The bytes of a successful read of `[offset, offset + len)`, checking that the pieces
    /// cover it exactly once.
    pub fn assemble(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let mut covered = 0usize;
        for p in &self.pieces {
            let start = (p.offset - offset) as usize;
            out[start..start + p.data.len()].copy_from_slice(&p.data);
            covered += p.data.len();
        }
        assert_eq!(
            covered,
            len,
            "read pieces must cover the request exactly: {:?}",
            self.pieces.len()
        );
        out
    }
}

/// The raw client's byte stream: TCP, or TLS over it after `NBD_OPT_STARTTLS`.
pub enum Wire {
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Wire {
    /// Looks at what the server sent without taking it (plain TCP only).
    pub fn peek(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Wire::Tcp(s) => s.peek(buf),
            Wire::Tls(_) => Err(std::io::Error::other("peek works on plain TCP only")),
        }
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Wire::Tcp(s) => s.read(buf),
            Wire::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Wire::Tcp(s) => s.write(buf),
            Wire::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Wire::Tcp(s) => s.flush(),
            Wire::Tls(s) => s.flush(),
        }
    }
}

/// A raw NBD client over a blocking socket (every read has a timeout, so a server bug fails
/// the test instead of hanging it).
pub struct Raw {
    pub s: Wire,
    pub style: Style,
    pub size: u64,
    pub flags: u16,
    pending_reads: HashMap<u64, (u64, u64)>,
    partial: HashMap<u64, Reply>,
    done: HashSet<u64>,
}

impl Raw {
    /// Connects and reads the greeting; sends client flags FIXED_NEWSTYLE | NO_ZEROES.
    fn on(s: Wire) -> Raw {
        Raw {
            s,
            style: Style::Simple,
            size: 0,
            flags: 0,
            pending_reads: HashMap::new(),
            partial: HashMap::new(),
            done: HashSet::new(),
        }
    }

    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut raw = Raw::on(Wire::Tcp(s));
        let mut greeting = [0u8; 18];
        raw.s.read_exact(&mut greeting).expect("greeting");
        assert_eq!(&greeting[..8], NBDMAGIC);
        assert_eq!(&greeting[8..16], IHAVEOPT);
        assert_eq!(u16::from_be_bytes([greeting[16], greeting[17]]) & 3, 3);
        raw.s.write_all(&3u32.to_be_bytes()).expect("client flags");
        raw
    }

    pub fn option(&mut self, code: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(IHAVEOPT);
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).expect("send option");
        self.s.flush().expect("send option");
    }

    /// One option reply: (option, reply type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply header");
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().expect("8")),
            0x0003_e889_0455_65a9
        );
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        assert!(len < 1 << 20, "option reply of {len} bytes");
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).expect("option reply data");
        (
            u32::from_be_bytes(h[8..12].try_into().expect("4")),
            u32::from_be_bytes(h[12..16].try_into().expect("4")),
            data,
        )
    }

    /// Full handshake to the transmission phase with `style`, selecting `base:allocation`
    /// when chunked replies are on.
    pub fn open(addr: SocketAddr, name: &str, style: Style) -> Raw {
        let mut raw = Raw::connect(addr);
        raw.go(name, style);
        raw
    }

    /// Like [`Raw::open`], over TLS: `NBD_OPT_STARTTLS` first, then the handshake with
    /// `config` (checking the server's certificate for `server_name`), then the rest.
    pub fn open_tls(
        addr: SocketAddr,
        name: &str,
        style: Style,
        config: std::sync::Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Raw {
        let mut plain = Raw::connect(addr);
        plain.option(OPT_STARTTLS, &[]);
        assert_eq!(plain.option_reply().1, REP_ACK, "STARTTLS");
        let Wire::Tcp(mut tcp) = plain.s else {
            panic!("TLS twice");
        };
        let name_ = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .expect("a server name");
        let mut conn = rustls::ClientConnection::new(config, name_).expect("TLS client");
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).expect("TLS handshake");
        }
        let mut raw = Raw::on(Wire::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))));
        raw.go(name, style);
        raw
    }

    /// Negotiates `style` (and `base:allocation` when chunked) and enters transmission on
    /// export `name`.
    fn go(&mut self, name: &str, style: Style) {
        let raw = self;
        match style {
            Style::Simple => {}
            Style::Structured => {
                raw.option(OPT_STRUCTURED_REPLY, &[]);
                assert_eq!(raw.option_reply().1, REP_ACK);
            }
            Style::Extended => {
                raw.option(OPT_EXTENDED_HEADERS, &[]);
                assert_eq!(raw.option_reply().1, REP_ACK);
            }
        }
        raw.style = style;
        if style != Style::Simple {
            let mut d = name_data(name);
            d.extend_from_slice(&1u32.to_be_bytes());
            let q = b"base:allocation";
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
            raw.option(OPT_SET_META_CONTEXT, &d);
            assert_eq!(raw.option_reply().1, REP_META_CONTEXT);
            assert_eq!(raw.option_reply().1, REP_ACK);
        }
        let mut d = name_data(name);
        d.extend_from_slice(&0u16.to_be_bytes());
        raw.option(OPT_GO, &d);
        loop {
            let (_, kind, data) = raw.option_reply();
            match kind {
                REP_INFO if data[..2] == [0, 0] => {
                    raw.size = u64::from_be_bytes(data[2..10].try_into().expect("8"));
                    raw.flags = u16::from_be_bytes(data[10..12].try_into().expect("2"));
                }
                REP_INFO => {}
                REP_ACK => break,
                other => panic!(
                    "GO failed with reply type {other:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    /// Sends one request; `payload` follows the header as is.
    pub fn send(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) {
        let mut b = Vec::with_capacity(32 + payload.len());
        match self.style {
            Style::Extended => {
                b.extend_from_slice(&0x21e4_1c71u32.to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
                b.extend_from_slice(&cmd.to_be_bytes());
                b.extend_from_slice(&cookie.to_be_bytes());
                b.extend_from_slice(&offset.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
            }
            _ => {
                b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
                b.extend_from_slice(&cmd.to_be_bytes());
                b.extend_from_slice(&cookie.to_be_bytes());
                b.extend_from_slice(&offset.to_be_bytes());
                b.extend_from_slice(&(len as u32).to_be_bytes());
            }
        }
        b.extend_from_slice(payload);
        if cmd == CMD_READ {
            self.pending_reads.insert(cookie, (offset, len));
        }
        self.s.write_all(&b).expect("send request");
        self.s.flush().expect("send request");
    }

    pub fn read(&mut self, cookie: u64, offset: u64, len: u64) {
        self.send(0, CMD_READ, cookie, offset, len, &[]);
    }

    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        let flags = if self.style == Style::Extended {
            FLAG_PAYLOAD_LEN
        } else {
            0
        };
        self.send(flags, CMD_WRITE, cookie, offset, data.len() as u64, data);
    }

    /// Reads messages until the reply to `cookie` is complete; replies to other cookies that
    /// complete meanwhile are kept for later calls.
    pub fn reply(&mut self, cookie: u64) -> Reply {
        loop {
            if let Some(r) = self.take_done(cookie) {
                return r;
            }
            self.next_message();
        }
    }

    fn take_done(&mut self, cookie: u64) -> Option<Reply> {
        if self.done.remove(&cookie) {
            return self.partial.remove(&cookie);
        }
        None
    }

    fn mark_done(&mut self, cookie: u64) {
        assert!(
            self.done.insert(cookie),
            "second final reply for cookie {cookie}"
        );
    }

    /// Reads replies until the server closes the connection cleanly (over TLS: with
    /// `close_notify`); returns the cookies whose replies completed, in order. Fails the test
    /// on anything else (a timeout, a TLS session cut without `close_notify`).
    pub fn replies_until_closed(&mut self) -> Vec<(u64, Reply)> {
        let mut first = [0u8; 1];
        loop {
            match self.s.read(&mut first) {
                Ok(0) => break,
                Ok(_) => self.message(first[0]),
                Err(e) => panic!("the connection neither answered nor closed cleanly: {e}"),
            }
        }
        let mut done: Vec<u64> = self.done.drain().collect();
        done.sort_unstable();
        done.into_iter()
            .map(|c| (c, self.partial.remove(&c).unwrap_or_default()))
            .collect()
    }

    fn next_message(&mut self) {
        let mut first = [0u8; 1];
        self.s.read_exact(&mut first).expect("reply magic");
        self.message(first[0]);
    }

    /// One message, whose first byte was read already.
    fn message(&mut self, first: u8) {
        let mut magic = [first, 0, 0, 0];
        self.s.read_exact(&mut magic[1..]).expect("reply magic");
        match u32::from_be_bytes(magic) {
            0x6744_6698 => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).expect("simple reply");
                let error = u32::from_be_bytes(h[..4].try_into().expect("4"));
                let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8"));
                let mut reply = Reply {
                    error,
                    messages: 1,
                    ..Reply::default()
                };
                if let Some((offset, len)) = self.pending_reads.remove(&cookie) {
                    if error == 0 {
                        let mut data = vec![0u8; len as usize];
                        self.s.read_exact(&mut data).expect("simple read data");
                        reply.pieces.push(Piece {
                            offset,
                            data,
                            hole: false,
                        });
                    }
                }
                self.partial.insert(cookie, reply);
                self.mark_done(cookie);
            }
            m @ (0x668e_33ef | 0x6e8a_278c) => {
                let extended = m == 0x6e8a_278c;
                assert_eq!(
                    extended,
                    self.style == Style::Extended,
                    "reply header style"
                );
                let mut h = vec![0u8; if extended { 28 } else { 16 }];
                self.s.read_exact(&mut h).expect("chunk header");
                let flags = u16::from_be_bytes(h[0..2].try_into().expect("2"));
                let kind = u16::from_be_bytes(h[2..4].try_into().expect("2"));
                let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8"));
                let len = if extended {
                    u64::from_be_bytes(h[20..28].try_into().expect("8"))
                } else {
                    u64::from(u32::from_be_bytes(h[12..16].try_into().expect("4")))
                };
                assert!(len <= 33 * MIB, "chunk of {len} bytes");
                let mut p = vec![0u8; len as usize];
                self.s.read_exact(&mut p).expect("chunk payload");
                let reply = self.partial.entry(cookie).or_default();
                reply.messages += 1;
                let be64 = |b: &[u8]| u64::from_be_bytes(b[..8].try_into().expect("8"));
                let be32 = |b: &[u8]| u32::from_be_bytes(b[..4].try_into().expect("4"));
                match kind {
                    0 => assert_eq!(len, 0),
                    1 => reply.pieces.push(Piece {
                        offset: be64(&p),
                        data: p[8..].to_vec(),
                        hole: false,
                    }),
                    2 => {
                        assert_eq!(len, 12);
                        let n = be32(&p[8..]) as usize;
                        reply.pieces.push(Piece {
                            offset: be64(&p),
                            data: vec![0; n],
                            hole: true,
                        });
                    }
                    5 => {
                        assert!(!extended);
                        for e in p[4..].chunks(8) {
                            reply
                                .extents
                                .push((u64::from(be32(e)), u64::from(be32(&e[4..]))));
                        }
                    }
                    6 => {
                        assert!(extended);
                        let count = be32(&p[4..]) as usize;
                        assert_eq!(p.len(), 8 + 16 * count);
                        for e in p[8..].chunks(16) {
                            reply.extents.push((be64(e), be64(&e[8..])));
                        }
                    }
                    k if k & 0x8000 != 0 => {
                        if reply.error == 0 {
                            reply.error = be32(&p);
                        }
                    }
                    other => panic!("unknown chunk type {other}"),
                }
                if flags & 1 != 0 {
                    self.pending_reads.remove(&cookie);
                    self.mark_done(cookie);
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// True once the server has closed the connection (EOF or a reset, with nothing more sent);
    /// false if it sent more, or kept the connection open until the read timeout.
    pub fn closed_by_server(&mut self) -> bool {
        matches!(read_until_closed(&mut self.s), Ok(rest) if rest.is_empty())
    }
}

/// Reads until the peer closes (EOF, or a reset, which is a close too) and returns what came
/// before; a read timeout (the socket's, so the wait is bounded) is an error, never a close.
/// Over TLS only a `close_notify` is a close: a bare TCP end reads as an error.
pub fn read_until_closed(s: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut rest = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(rest),
            Ok(n) => rest.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(rest),
            Err(e) => return Err(e),
        }
    }
}

pub fn name_data(name: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}
