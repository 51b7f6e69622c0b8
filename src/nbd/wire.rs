//! The NBD wire format: constants, parsers for what a client sends, encoders for what the server
//! sends. Pure functions over byte slices: no I/O, no clock, and no allocation sized by a number
//! read off the wire (every length is checked against the bytes actually present first). This is
//! the part fuzzed by `fuzz/` and property-tested below; it must never panic on any input.
//!
//! Layouts follow `doc/proto.md` of the NetworkBlockDevice/nbd repository, including the
//! `EXTENDED_HEADERS` extension (32-byte request and reply headers, 64-bit lengths).

use bytes::{BufMut, BytesMut};

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic, and the magic of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Longest string (export name, query, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Largest payload this server accepts in one request and advertises in `NBD_INFO_BLOCK_SIZE`.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Handshake flags (server) and client flags.
pub mod hflag {
    /// Server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// Server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
    /// Client speaks fixed newstyle.
    pub const C_FIXED_NEWSTYLE: u32 = 1 << 0;
    /// Client asks for no zero padding.
    pub const C_NO_ZEROES: u32 = 1 << 1;
}

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`); errors have bit 31 set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
    pub const ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;
}

/// Information types of `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (`NBD_FLAG_*`), per export.
pub mod tflag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cflag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured/extended reply chunk types (`NBD_REPLY_TYPE_*`) and the one reply flag.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const BLOCK_STATUS_EXT: u16 = 6;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// Error values of replies (`NBD_E*`): fixed numbers, not the host's errno.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` status flags (`NBD_STATE_*`).
pub mod state {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// The only metadata context this server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Input that breaks the framing: the connection cannot continue after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("client flags {0:#x} include bits the server did not offer")]
    UnknownClientFlags(u32),
    #[error("option header has magic {0:#018x} instead of IHAVEOPT")]
    BadOptionMagic(u64),
    #[error("request header has magic {found:#010x}, expected {expected:#010x}")]
    BadRequestMagic { found: u32, expected: u32 },
    #[error("header needs {need} bytes, got {got}")]
    Short { need: usize, got: usize },
}

/// An option whose data does not match its documented layout: answered with
/// `NBD_REP_ERR_INVALID` (the message goes back to the client), negotiation continues.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidOption(pub &'static str);

/// Flags the client sent after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Header of one option: code and length of the data that follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub code: u32,
    pub length: u32,
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// `NBD_INFO_*` items the client asked for (unknown ones kept: the server ignores them).
    pub items: Vec<u16>,
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// One parsed option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaRequest),
    SetMetaContext(MetaRequest),
    ExtendedHeaders,
    /// An option this server does not implement: answered with `NBD_REP_ERR_UNSUP`.
    Unknown(u32),
}

/// Which request and reply headers the connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStyle {
    /// Compact requests, simple replies only.
    Simple,
    /// Compact requests, structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    Structured,
    /// 32-byte requests and replies, 64-bit lengths (`NBD_OPT_EXTENDED_HEADERS`).
    Extended,
}

impl ReplyStyle {
    /// Length of a request header in this style.
    pub const fn request_header_len(self) -> usize {
        match self {
            ReplyStyle::Simple | ReplyStyle::Structured => 28,
            ReplyStyle::Extended => 32,
        }
    }

    /// Whether chunked replies (data/hole chunks, block status) may be sent.
    pub const fn chunked(self) -> bool {
        !matches!(self, ReplyStyle::Simple)
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    /// Effect length, or payload length (`NBD_CMD_WRITE`, or `NBD_CMD_FLAG_PAYLOAD_LEN` with
    /// extended headers). 32 bits on the wire in compact style.
    pub length: u64,
}

impl Request {
    /// Bytes of payload that follow this header on the wire.
    ///
    /// A write always carries `length` bytes. The extended-headers draft wants writes to set
    /// `NBD_CMD_FLAG_PAYLOAD_LEN` too, but QEMU's client (10.0) does not and QEMU's server
    /// accepts that, so the flag only decides for the other commands.
    pub fn payload_len(&self, style: ReplyStyle) -> u64 {
        if self.command == cmd::WRITE {
            return self.length;
        }
        match style {
            ReplyStyle::Extended if self.flags & cflag::PAYLOAD_LEN != 0 => self.length,
            _ => 0,
        }
    }
}

/// One extent of a block status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u32,
}

/// A bounds-checked reader over a byte slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
    }
    fn remaining(&self) -> usize {
        self.0.len()
    }
}

/// The 18-byte greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn put_greeting(buf: &mut BytesMut, flags: u16) {
    buf.put_u64(NBDMAGIC);
    buf.put_u64(IHAVEOPT);
    buf.put_u16(flags);
}

/// Parses the 4 client flags bytes; unknown bits or bits the server did not offer are refused
/// (the spec makes the server drop the connection then).
pub fn parse_client_flags(bytes: [u8; 4], offered: u16) -> Result<ClientFlags, WireError> {
    let flags = u32::from_be_bytes(bytes);
    let known = u32::from(offered) & (hflag::C_FIXED_NEWSTYLE | hflag::C_NO_ZEROES);
    if flags & !known != 0 {
        return Err(WireError::UnknownClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & hflag::C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & hflag::C_NO_ZEROES != 0,
    })
}

/// Parses a 16-byte option header.
pub fn parse_option_header(bytes: &[u8]) -> Result<OptionHeader, WireError> {
    let mut c = Cursor(bytes);
    let (Some(magic), Some(code), Some(length)) = (c.u64(), c.u32(), c.u32()) else {
        return Err(WireError::Short {
            need: 16,
            got: bytes.len(),
        });
    };
    if magic != IHAVEOPT {
        return Err(WireError::BadOptionMagic(magic));
    }
    Ok(OptionHeader { code, length })
}

/// Parses the data of option `code`.
pub fn parse_option(code: u32, data: &[u8]) -> Result<ClientOption, InvalidOption> {
    let no_data = |option| {
        if data.is_empty() {
            Ok(option)
        } else {
            Err(InvalidOption("this option carries no data"))
        }
    };
    match code {
        opt::EXPORT_NAME => Ok(ClientOption::ExportName(string(data)?)),
        // The spec asks servers to ignore data sent with NBD_OPT_ABORT.
        opt::ABORT => Ok(ClientOption::Abort),
        opt::LIST => no_data(ClientOption::List),
        opt::STARTTLS => no_data(ClientOption::StartTls),
        opt::INFO => Ok(ClientOption::Info(parse_info_request(data)?)),
        opt::GO => Ok(ClientOption::Go(parse_info_request(data)?)),
        opt::STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        opt::LIST_META_CONTEXT => Ok(ClientOption::ListMetaContext(parse_meta_request(data)?)),
        opt::SET_META_CONTEXT => Ok(ClientOption::SetMetaContext(parse_meta_request(data)?)),
        opt::EXTENDED_HEADERS => no_data(ClientOption::ExtendedHeaders),
        other => Ok(ClientOption::Unknown(other)),
    }
}

fn string(bytes: &[u8]) -> Result<String, InvalidOption> {
    if bytes.len() > MAX_STRING {
        return Err(InvalidOption("string longer than 4096 bytes"));
    }
    if bytes.contains(&0) {
        return Err(InvalidOption("string contains a NUL byte"));
    }
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| InvalidOption("string is not valid UTF-8"))
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, InvalidOption> {
    let mut c = Cursor(data);
    let len = c
        .u32()
        .ok_or(InvalidOption("option data too short for a name length"))?;
    let name = usize::try_from(len)
        .ok()
        .and_then(|len| c.take(len))
        .ok_or(InvalidOption("export name longer than the option data"))?;
    let name = string(name)?;
    let count = c
        .u16()
        .ok_or(InvalidOption("option data too short for the request count"))?;
    if c.remaining() != usize::from(count) * 2 {
        return Err(InvalidOption(
            "information request count does not match the option length",
        ));
    }
    let mut items = Vec::with_capacity(usize::from(count));
    while let Some(item) = c.u16() {
        items.push(item);
    }
    Ok(InfoRequest { name, items })
}

fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, InvalidOption> {
    let mut c = Cursor(data);
    let len = c
        .u32()
        .ok_or(InvalidOption("option data too short for a name length"))?;
    let export = usize::try_from(len)
        .ok()
        .and_then(|len| c.take(len))
        .ok_or(InvalidOption("export name longer than the option data"))?;
    let export = string(export)?;
    let count = c
        .u32()
        .ok_or(InvalidOption("option data too short for the query count"))?;
    // `count` comes off the wire: never size an allocation by it; every query needs at least
    // its 4-byte length, which bounds the loop by the data actually present.
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = c
            .u32()
            .ok_or(InvalidOption("query count larger than the option data"))?;
        let query = usize::try_from(len)
            .ok()
            .and_then(|len| c.take(len))
            .ok_or(InvalidOption("query longer than the option data"))?;
        queries.push(string(query)?);
    }
    if c.remaining() != 0 {
        return Err(InvalidOption("trailing bytes after the last query"));
    }
    Ok(MetaRequest { export, queries })
}

/// An option reply header followed by `data`.
pub fn put_option_reply(buf: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    buf.put_u64(OPTION_REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply_type);
    buf.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    buf.put_slice(data);
}

/// An error option reply with a human-readable message.
pub fn put_option_error(buf: &mut BytesMut, option: u32, reply_type: u32, message: &str) {
    put_option_reply(buf, option, reply_type, truncate(message).as_bytes());
}

/// `NBD_REP_SERVER` for one export of `NBD_OPT_LIST`.
pub fn put_rep_server(buf: &mut BytesMut, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.put_u32(u32::try_from(name.len()).unwrap_or(u32::MAX));
    data.put_slice(name.as_bytes());
    put_option_reply(buf, opt::LIST, rep::SERVER, &data);
}

/// `NBD_REP_INFO` carrying `NBD_INFO_EXPORT`.
pub fn put_info_export(buf: &mut BytesMut, option: u32, size: u64, flags: u16) {
    let mut data = [0u8; 12];
    data[0..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    data[2..10].copy_from_slice(&size.to_be_bytes());
    data[10..12].copy_from_slice(&flags.to_be_bytes());
    put_option_reply(buf, option, rep::INFO, &data);
}

/// `NBD_REP_INFO` carrying `NBD_INFO_BLOCK_SIZE`.
pub fn put_info_block_size(buf: &mut BytesMut, option: u32, min: u32, preferred: u32, max: u32) {
    let mut data = [0u8; 14];
    data[0..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    data[2..6].copy_from_slice(&min.to_be_bytes());
    data[6..10].copy_from_slice(&preferred.to_be_bytes());
    data[10..14].copy_from_slice(&max.to_be_bytes());
    put_option_reply(buf, option, rep::INFO, &data);
}

/// `NBD_REP_INFO` carrying `NBD_INFO_NAME`.
pub fn put_info_name(buf: &mut BytesMut, option: u32, name: &str) {
    let mut data = Vec::with_capacity(2 + name.len());
    data.put_u16(info::NAME);
    data.put_slice(name.as_bytes());
    put_option_reply(buf, option, rep::INFO, &data);
}

/// `NBD_REP_META_CONTEXT`.
pub fn put_meta_context(buf: &mut BytesMut, option: u32, id: u32, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.put_u32(id);
    data.put_slice(name.as_bytes());
    put_option_reply(buf, option, rep::META_CONTEXT, &data);
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size, flags and (unless `NO_ZEROES`) 124 zero bytes.
pub fn put_export_name_reply(buf: &mut BytesMut, size: u64, flags: u16, no_zeroes: bool) {
    buf.put_u64(size);
    buf.put_u16(flags);
    if !no_zeroes {
        buf.put_bytes(0, 124);
    }
}

/// Parses a request header of `style` (28 bytes compact, 32 extended).
pub fn parse_request(style: ReplyStyle, bytes: &[u8]) -> Result<Request, WireError> {
    let need = style.request_header_len();
    let mut c = Cursor(bytes);
    let short = WireError::Short {
        need,
        got: bytes.len(),
    };
    let magic = c.u32().ok_or(short.clone())?;
    let expected = match style {
        ReplyStyle::Extended => EXTENDED_REQUEST_MAGIC,
        _ => REQUEST_MAGIC,
    };
    if magic != expected {
        return Err(WireError::BadRequestMagic {
            found: magic,
            expected,
        });
    }
    let (Some(flags), Some(command), Some(cookie), Some(offset)) =
        (c.u16(), c.u16(), c.u64(), c.u64())
    else {
        return Err(short);
    };
    let length = match style {
        ReplyStyle::Extended => c.u64(),
        _ => c.u32().map(u64::from),
    }
    .ok_or(short)?;
    Ok(Request {
        flags,
        command,
        cookie,
        offset,
        length,
    })
}

/// A simple reply (16 bytes); read data, if any, follows it.
pub fn put_simple_reply(buf: &mut BytesMut, error: u32, cookie: u64) {
    buf.put_u32(SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(cookie);
}

/// A structured (20-byte) or extended (32-byte) chunk header. `request_offset` is only sent in
/// extended style, where it must echo the request's offset.
///
/// `style` must not be [`ReplyStyle::Simple`]; if it is, a structured header is written (a caller
/// bug, never reachable from client input).
pub fn put_chunk_header(
    buf: &mut BytesMut,
    style: ReplyStyle,
    flags: u16,
    kind: u16,
    cookie: u64,
    request_offset: u64,
    payload_len: u64,
) {
    match style {
        ReplyStyle::Extended => {
            buf.put_u32(EXTENDED_REPLY_MAGIC);
            buf.put_u16(flags);
            buf.put_u16(kind);
            buf.put_u64(cookie);
            buf.put_u64(request_offset);
            buf.put_u64(payload_len);
        }
        ReplyStyle::Structured | ReplyStyle::Simple => {
            buf.put_u32(STRUCTURED_REPLY_MAGIC);
            buf.put_u16(flags);
            buf.put_u16(kind);
            buf.put_u64(cookie);
            buf.put_u32(u32::try_from(payload_len).unwrap_or(u32::MAX));
        }
    }
}

/// The final `NBD_REPLY_TYPE_NONE` chunk.
pub fn put_none_chunk(buf: &mut BytesMut, style: ReplyStyle, cookie: u64, request_offset: u64) {
    put_chunk_header(
        buf,
        style,
        chunk::FLAG_DONE,
        chunk::NONE,
        cookie,
        request_offset,
        0,
    );
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a message for the user.
pub fn put_error_chunk(
    buf: &mut BytesMut,
    style: ReplyStyle,
    cookie: u64,
    request_offset: u64,
    error: u32,
    message: &str,
) {
    let message = truncate(message);
    let len = 6 + message.len() as u64;
    put_chunk_header(
        buf,
        style,
        chunk::FLAG_DONE,
        chunk::ERROR,
        cookie,
        request_offset,
        len,
    );
    buf.put_u32(error);
    buf.put_u16(u16::try_from(message.len()).unwrap_or(0));
    buf.put_slice(message.as_bytes());
}

/// An `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn put_hole_chunk(
    buf: &mut BytesMut,
    style: ReplyStyle,
    flags: u16,
    cookie: u64,
    request_offset: u64,
    hole_offset: u64,
    hole_len: u32,
) {
    put_chunk_header(
        buf,
        style,
        flags,
        chunk::OFFSET_HOLE,
        cookie,
        request_offset,
        12,
    );
    buf.put_u64(hole_offset);
    buf.put_u32(hole_len);
}

/// The header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk; `data_len` bytes of data must follow.
pub fn put_data_chunk_header(
    buf: &mut BytesMut,
    style: ReplyStyle,
    flags: u16,
    cookie: u64,
    request_offset: u64,
    data_offset: u64,
    data_len: u64,
) {
    put_chunk_header(
        buf,
        style,
        flags,
        chunk::OFFSET_DATA,
        cookie,
        request_offset,
        8 + data_len,
    );
    buf.put_u64(data_offset);
}

/// A final block status chunk for one metadata context: `NBD_REPLY_TYPE_BLOCK_STATUS` (32-bit
/// extents) in structured style, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` in extended style.
///
/// In structured style an extent longer than 32 bits cannot be sent: the list is cut before it
/// (a shorter answer is allowed), and a first extent that long is shortened, which still
/// describes the start of the range truthfully.
pub fn put_block_status_chunk(
    buf: &mut BytesMut,
    style: ReplyStyle,
    cookie: u64,
    request_offset: u64,
    context_id: u32,
    extents: &[Extent],
) {
    match style {
        ReplyStyle::Extended => {
            let count = extents.len().min(u32::MAX as usize);
            let len = 8 + 16 * count as u64;
            put_chunk_header(
                buf,
                style,
                chunk::FLAG_DONE,
                chunk::BLOCK_STATUS_EXT,
                cookie,
                request_offset,
                len,
            );
            buf.put_u32(context_id);
            buf.put_u32(count as u32);
            for e in &extents[..count] {
                buf.put_u64(e.length);
                buf.put_u64(u64::from(e.flags));
            }
        }
        ReplyStyle::Structured | ReplyStyle::Simple => {
            const LONGEST: u64 = (u32::MAX as u64) & !0xfff;
            let mut fitting: Vec<Extent> = extents
                .iter()
                .take_while(|e| e.length <= u64::from(u32::MAX))
                .copied()
                .collect();
            if fitting.is_empty() {
                if let Some(first) = extents.first() {
                    fitting.push(Extent {
                        length: LONGEST,
                        flags: first.flags,
                    });
                }
            }
            let len = 4 + 8 * fitting.len() as u64;
            put_chunk_header(
                buf,
                style,
                chunk::FLAG_DONE,
                chunk::BLOCK_STATUS,
                cookie,
                request_offset,
                len,
            );
            buf.put_u32(context_id);
            for e in &fitting {
                buf.put_u32(u32::try_from(e.length).unwrap_or(LONGEST as u32));
                buf.put_u32(e.flags);
            }
        }
    }
}

/// Cuts `message` to the protocol's string limit on a character boundary.
fn truncate(message: &str) -> &str {
    if message.len() <= MAX_STRING {
        return message;
    }
    let mut end = MAX_STRING;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn option_data_info(name: &str, items: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name.as_bytes());
        d.put_u16(items.len() as u16);
        for i in items {
            d.put_u16(*i);
        }
        d
    }

    #[test]
    fn greeting_and_client_flags() {
        let mut b = BytesMut::new();
        put_greeting(&mut b, hflag::FIXED_NEWSTYLE | hflag::NO_ZEROES);
        assert_eq!(&b[..8], b"NBDMAGIC");
        assert_eq!(&b[8..16], b"IHAVEOPT");
        assert_eq!(&b[16..], &[0, 3]);
        let offered = hflag::FIXED_NEWSTYLE | hflag::NO_ZEROES;
        assert_eq!(
            parse_client_flags([0, 0, 0, 3], offered),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            parse_client_flags([0, 0, 0, 4], offered),
            Err(WireError::UnknownClientFlags(4))
        );
        // NO_ZEROES from the client is refused when the server did not offer it.
        assert!(parse_client_flags([0, 0, 0, 2], hflag::FIXED_NEWSTYLE).is_err());
    }

    #[test]
    fn option_header_checks_magic() {
        let mut b = BytesMut::new();
        b.put_u64(IHAVEOPT);
        b.put_u32(opt::GO);
        b.put_u32(10);
        assert_eq!(
            parse_option_header(&b),
            Ok(OptionHeader {
                code: opt::GO,
                length: 10
            })
        );
        b[0] ^= 1;
        assert!(matches!(
            parse_option_header(&b),
            Err(WireError::BadOptionMagic(_))
        ));
        assert!(matches!(
            parse_option_header(&b[..15]),
            Err(WireError::Short { .. })
        ));
    }

    #[test]
    fn go_request_is_parsed_and_checked() {
        let data = option_data_info("disk0", &[info::BLOCK_SIZE, info::NAME]);
        assert_eq!(
            parse_option(opt::GO, &data),
            Ok(ClientOption::Go(InfoRequest {
                name: "disk0".into(),
                items: vec![info::BLOCK_SIZE, info::NAME]
            }))
        );
        // Count says 2 items, only one present.
        let mut bad = option_data_info("disk0", &[info::BLOCK_SIZE, info::NAME]);
        bad.truncate(bad.len() - 2);
        assert!(parse_option(opt::INFO, &bad).is_err());
        // Name length larger than the data.
        let mut bad = option_data_info("disk0", &[]);
        bad[3] = 200;
        assert!(parse_option(opt::GO, &bad).is_err());
        // Name not UTF-8.
        let bad = option_data_info("\u{0}", &[]);
        assert!(parse_option(opt::GO, &bad).is_err());
    }

    #[test]
    fn meta_request_is_parsed() {
        let mut d = Vec::new();
        d.put_u32(1);
        d.put_slice(b"x");
        d.put_u32(2);
        for q in ["base:allocation", "qemu:dirty-bitmap:a"] {
            d.put_u32(q.len() as u32);
            d.put_slice(q.as_bytes());
        }
        assert_eq!(
            parse_option(opt::SET_META_CONTEXT, &d),
            Ok(ClientOption::SetMetaContext(MetaRequest {
                export: "x".into(),
                queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:a".into()]
            }))
        );
        // A huge query count with no queries behind it is refused, not allocated.
        let mut d = Vec::new();
        d.put_u32(0);
        d.put_u32(u32::MAX);
        assert!(parse_option(opt::LIST_META_CONTEXT, &d).is_err());
    }

    #[test]
    fn data_on_dataless_options_is_invalid_and_unknown_is_kept() {
        assert!(parse_option(opt::LIST, b"x").is_err());
        assert!(parse_option(opt::STRUCTURED_REPLY, b"x").is_err());
        assert!(parse_option(opt::EXTENDED_HEADERS, b"x").is_err());
        assert_eq!(
            parse_option(opt::ABORT, b"ignored"),
            Ok(ClientOption::Abort)
        );
        assert_eq!(
            parse_option(0xdead, b"whatever"),
            Ok(ClientOption::Unknown(0xdead))
        );
    }

    #[test]
    fn requests_in_both_styles() {
        let mut b = BytesMut::new();
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(cflag::FUA);
        b.put_u16(cmd::WRITE);
        b.put_u64(7);
        b.put_u64(4096);
        b.put_u32(512);
        let r = parse_request(ReplyStyle::Structured, &b).expect("valid compact request");
        assert_eq!(
            r,
            Request {
                flags: cflag::FUA,
                command: cmd::WRITE,
                cookie: 7,
                offset: 4096,
                length: 512
            }
        );
        assert_eq!(r.payload_len(ReplyStyle::Structured), 512);
        assert!(parse_request(ReplyStyle::Extended, &b).is_err());

        let mut b = BytesMut::new();
        b.put_u32(EXTENDED_REQUEST_MAGIC);
        b.put_u16(0);
        b.put_u16(cmd::WRITE_ZEROES);
        b.put_u64(9);
        b.put_u64(0);
        b.put_u64(1 << 40);
        let r = parse_request(ReplyStyle::Extended, &b).expect("valid extended request");
        assert_eq!(r.length, 1 << 40);
        assert_eq!(r.payload_len(ReplyStyle::Extended), 0);
        assert!(matches!(
            parse_request(ReplyStyle::Extended, &b[..31]),
            Err(WireError::Short { need: 32, got: 31 })
        ));
    }

    #[test]
    fn chunk_layouts() {
        let mut b = BytesMut::new();
        put_hole_chunk(&mut b, ReplyStyle::Structured, 0, 5, 0, 4096, 512);
        assert_eq!(b.len(), 20 + 12);
        assert_eq!(&b[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&b[6..8], &chunk::OFFSET_HOLE.to_be_bytes());
        assert_eq!(&b[16..20], &12u32.to_be_bytes());

        let mut b = BytesMut::new();
        put_none_chunk(&mut b, ReplyStyle::Extended, 5, 1234);
        assert_eq!(b.len(), 32);
        assert_eq!(&b[16..24], &1234u64.to_be_bytes());

        let mut b = BytesMut::new();
        put_error_chunk(&mut b, ReplyStyle::Structured, 1, 0, errno::EINVAL, "bad");
        assert_eq!(b.len(), 20 + 6 + 3);
        assert_eq!(&b[20..24], &errno::EINVAL.to_be_bytes());
    }

    #[test]
    fn block_status_never_lies_about_long_extents() {
        let long = Extent {
            length: 1 << 33,
            flags: state::HOLE | state::ZERO,
        };
        let short = Extent {
            length: 4096,
            flags: 0,
        };
        let mut b = BytesMut::new();
        put_block_status_chunk(&mut b, ReplyStyle::Structured, 1, 0, 1, &[short, long]);
        // Only the short extent: the long one does not fit 32 bits.
        assert_eq!(b.len(), 20 + 4 + 8);
        let mut b = BytesMut::new();
        put_block_status_chunk(&mut b, ReplyStyle::Structured, 1, 0, 1, &[long]);
        let len = u32::from_be_bytes([b[24], b[25], b[26], b[27]]);
        assert!(len > 0 && u64::from(len) < long.length);
        let mut b = BytesMut::new();
        put_block_status_chunk(&mut b, ReplyStyle::Extended, 1, 0, 1, &[short, long]);
        assert_eq!(b.len(), 32 + 8 + 32);
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let msg = "é".repeat(3000);
        let cut = truncate(&msg);
        assert!(cut.len() <= MAX_STRING);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(code in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_option(code % 16, &data);
            let _ = parse_option(code, &data);
            let _ = parse_option_header(&data);
            let _ = parse_request(ReplyStyle::Simple, &data);
            let _ = parse_request(ReplyStyle::Extended, &data);
            if data.len() >= 4 {
                let _ = parse_client_flags([data[0], data[1], data[2], data[3]], 3);
            }
        }

        #[test]
        fn option_parse_inverts_info_encoding(name in "[a-z0-9:/._-]{0,64}", items in proptest::collection::vec(any::<u16>(), 0..8)) {
            let data = option_data_info(&name, &items);
            prop_assert_eq!(
                parse_option(opt::INFO, &data),
                Ok(ClientOption::Info(InfoRequest { name, items }))
            );
        }

        #[test]
        fn request_parse_reads_every_field(flags in any::<u16>(), command in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(), length in any::<u64>()) {
            let mut b = BytesMut::new();
            b.put_u32(EXTENDED_REQUEST_MAGIC);
            b.put_u16(flags);
            b.put_u16(command);
            b.put_u64(cookie);
            b.put_u64(offset);
            b.put_u64(length);
            prop_assert_eq!(
                parse_request(ReplyStyle::Extended, &b),
                Ok(Request { flags, command, cookie, offset, length })
            );
        }
    }
}
