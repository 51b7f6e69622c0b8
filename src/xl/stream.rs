//! The framing of the stream `xl migrate` writes to its transport, parsed just far enough to
//! find the libxl END record, which ferry must hold back until the disks are final.
//!
//! Sender → receiver, as Xen writes it (`tools/xl/xl_saverestore.c`
//! `save_domain_core_writeconfig`, `docs/specs/libxl-migration-stream.pandoc`,
//! `docs/specs/libxc-migration-stream.pandoc`):
//!
//! ```text
//!  xl header   magic[32] "Xen saved domain, xl format\n \0 \r", then four u32 in the
//!              domain's byte order: byteorder 0x01020304, mandatory_flags, optional_flags,
//!              optional_data_len; then optional_data_len bytes (u32 config length, the config)
//!  libxl       ident "LibxlFmt" (8), version u32 BE = 2, options u32 BE (bit 0: big-endian)
//!  records     type u32, length u32, body, zero padding to a multiple of 8
//!    LIBXC_CONTEXT (1, length 0) is followed inline by the libxc stream:
//!      image header: marker u64 all ones, id "XENF", version u32 BE = 3, options u16 BE, 6 reserved
//!      domain header: 16 bytes
//!      records: type u32, length u32, body, padding to 8; END (0) closes the libxc stream
//!    EMULATOR_XENSTORE_DATA (2), EMULATOR_CONTEXT (3): bodies skipped
//!    END (0, length 0): the last record; the receiver starts the domain's devices after it
//!  then, later: "domain is yours, you are cleared to unpause\0" (the point of no return)
//! ```
//!
//! The parser never buffers a body: it counts bytes to skip, so its memory is a few dozen bytes
//! whatever the stream holds. A stream it does not understand (another magic, big-endian,
//! checkpoint records of Remus/COLO) is an error: ferry must never forward an END it did not see.

/// `savefileheader_magic` in `tools/xl/xl.h`.
pub const XL_MAGIC: &[u8; 32] = b"Xen saved domain, xl format\n \0 \r";
/// `SAVEFILE_BYTEORDER_VALUE`, written in the domain's (here: little-endian) byte order.
const XL_BYTEORDER: u32 = 0x0102_0304;
/// `RESTORE_STREAM_IDENT`.
pub const LIBXL_IDENT: &[u8; 8] = b"LibxlFmt";
/// `REC_TYPE_*` of the libxl stream.
pub const REC_END: u32 = 0;
/// The marker record the libxc stream follows.
pub const REC_LIBXC_CONTEXT: u32 = 1;
/// The device model's xenstore keys.
pub const REC_EMULATOR_XENSTORE_DATA: u32 = 2;
/// The device model's saved state (HVM).
pub const REC_EMULATOR_CONTEXT: u32 = 3;
const REC_CHECKPOINT_END: u32 = 4;
const REC_CHECKPOINT_STATE: u32 = 5;
/// The libxc image header's id, "XENF".
const LIBXC_ID: u32 = 0x5845_4E46;

/// The biggest xl header option data accepted (the domain's JSON config): generous, but capped.
pub const MAX_CONFIG: u32 = 16 << 20;

/// What the parser found in a piece of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Nothing to act on in this piece.
    Nothing,
    /// The libxl END record starts at this offset of the piece fed.
    End(usize),
}

/// The stream is not one ferry understands; nothing after it may be forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the xl migration stream {0}: ferry forwards only streams it can follow (see docs/xen.md)")]
pub struct StreamError(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    XlHeader,
    XlOptional,
    LibxlHeader,
    LibxlRecord,
    LibxcImageHeader,
    LibxcDomainHeader,
    LibxcRecord,
    /// The libxl END record was seen: what follows is the go message.
    Tail,
}

/// Follows the sender → receiver direction; see the module doc.
#[derive(Debug)]
pub struct SenderStream {
    state: State,
    /// The fixed-size header being gathered.
    head: Vec<u8>,
    /// Bytes of the current body (and padding) still to pass.
    skip: u64,
    /// The state after the skip.
    after: State,
    /// Bytes of the stream seen so far (for error messages).
    offset: u64,
    /// The domain's JSON config, when [`SenderStream::keep_config`] asked for it.
    config: Option<Vec<u8>>,
    keep_config: bool,
    /// The libxc stream ended.
    libxc_ended: bool,
    /// A libxl record header came after the libxc stream (see [`SenderStream::suspended`]).
    after_libxc: bool,
}

impl Default for SenderStream {
    fn default() -> Self {
        SenderStream::new()
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn padded(len: u32) -> u64 {
    (u64::from(len) + 7) & !7
}

impl SenderStream {
    /// A parser at the start of the stream.
    pub fn new() -> SenderStream {
        SenderStream {
            state: State::XlHeader,
            head: Vec::with_capacity(48),
            skip: 0,
            after: State::XlHeader,
            offset: 0,
            config: None,
            keep_config: false,
            libxc_ended: false,
            after_libxc: false,
        }
    }

    /// Whether libxl wrote a record after the libxc stream: the guest is suspended (libxc's
    /// last pass ran with it suspended and, for HVM, the device model stopped and saved) and
    /// libxc's clean-up, which talks to the device model over QMP, is over. From here libxl does
    /// not use the device model's QMP socket again before the go message.
    pub fn suspended(&self) -> bool {
        self.after_libxc
    }

    /// Also keep the xl header's option data (the domain config; capped at [`MAX_CONFIG`]).
    pub fn keep_config(mut self) -> SenderStream {
        self.keep_config = true;
        self
    }

    /// The xl header's option data, once read (u32 length, then the config).
    pub fn config(&self) -> Option<&[u8]> {
        self.config.as_deref()
    }

    /// Whether the libxl END record was seen.
    pub fn ended(&self) -> bool {
        self.state == State::Tail
    }

    fn need(&self) -> usize {
        match self.state {
            State::XlHeader => 48,
            State::LibxlHeader => 16,
            State::LibxlRecord | State::LibxcRecord => 8,
            State::LibxcImageHeader => 24,
            State::LibxcDomainHeader => 16,
            State::XlOptional | State::Tail => 0,
        }
    }

    fn bad(&self, what: impl std::fmt::Display) -> StreamError {
        StreamError(format!("{what} at byte {}", self.offset))
    }

    /// Feeds the next piece; reports where the libxl END record starts, if it is in `data`.
    /// After an error the parser must not be fed again.
    pub fn feed(&mut self, data: &[u8]) -> Result<Found, StreamError> {
        let mut i = 0;
        while i < data.len() {
            if self.state == State::Tail {
                return Ok(Found::Nothing);
            }
            if self.skip > 0 {
                let n = (self.skip.min((data.len() - i) as u64)) as usize;
                if self.keep_config && self.state == State::XlOptional {
                    if let Some(config) = self.config.as_mut() {
                        config.extend_from_slice(&data[i..i + n]);
                    }
                }
                self.skip -= n as u64;
                self.offset += n as u64;
                i += n;
                if self.skip == 0 {
                    self.state = self.after;
                }
                continue;
            }
            if self.state == State::XlOptional {
                // Empty option data.
                self.state = State::LibxlHeader;
                continue;
            }
            // Where this header starts in `data`: 0 when its first bytes came in an earlier
            // piece (already forwarded: an incomplete header the receiver cannot act on).
            let header_start = if self.head.is_empty() { i } else { 0 };
            let want = self.need() - self.head.len();
            let n = want.min(data.len() - i);
            self.head.extend_from_slice(&data[i..i + n]);
            i += n;
            if self.head.len() < self.need() {
                self.offset += n as u64;
                continue;
            }
            let head = std::mem::take(&mut self.head);
            if self.header(&head)?.is_some() {
                self.offset += n as u64;
                return Ok(Found::End(header_start));
            }
            self.offset += n as u64;
        }
        Ok(Found::Nothing)
    }

    /// Acts on a complete fixed header; `Some(())` when it is the libxl END record.
    fn header(&mut self, h: &[u8]) -> Result<Option<()>, StreamError> {
        match self.state {
            State::XlHeader => {
                if &h[..32] != XL_MAGIC {
                    return Err(self.bad("does not start with xl's save file magic"));
                }
                if le32(&h[32..36]) != XL_BYTEORDER {
                    return Err(self.bad("is not little-endian (xl header byte order)"));
                }
                let optional = le32(&h[44..48]);
                if optional > MAX_CONFIG.saturating_add(4) {
                    return Err(self.bad(format!(
                        "has {optional} bytes of header data, over the {MAX_CONFIG} accepted"
                    )));
                }
                if self.keep_config {
                    self.config = Some(Vec::with_capacity(optional as usize));
                }
                self.state = State::XlOptional;
                self.skip = u64::from(optional);
                self.after = State::LibxlHeader;
                if optional == 0 {
                    self.state = State::LibxlHeader;
                }
            }
            State::LibxlHeader => {
                if &h[..8] != LIBXL_IDENT {
                    return Err(self.bad("has no libxl stream header (LibxlFmt)"));
                }
                let version = be32(&h[8..12]);
                if version != 2 {
                    return Err(self.bad(format!("is libxl stream version {version}, not 2")));
                }
                if be32(&h[12..16]) & 1 != 0 {
                    return Err(self.bad("is big-endian"));
                }
                self.state = State::LibxlRecord;
            }
            State::LibxlRecord => {
                let (ty, len) = (le32(&h[..4]), le32(&h[4..8]));
                if self.libxc_ended {
                    self.after_libxc = true;
                }
                match ty {
                    REC_END => {
                        self.state = State::Tail;
                        return Ok(Some(()));
                    }
                    REC_LIBXC_CONTEXT => {
                        self.skip = padded(len);
                        self.after = State::LibxcImageHeader;
                        if self.skip == 0 {
                            self.state = State::LibxcImageHeader;
                        }
                    }
                    REC_CHECKPOINT_END | REC_CHECKPOINT_STATE => {
                        return Err(self.bad("holds checkpoint records (Remus/COLO)"));
                    }
                    _ => {
                        self.skip = padded(len);
                        self.after = State::LibxlRecord;
                    }
                }
            }
            State::LibxcImageHeader => {
                if h[..8] != [0xff; 8] || be32(&h[8..12]) != LIBXC_ID {
                    return Err(self.bad("has no libxc image header (XENF)"));
                }
                let version = be32(&h[12..16]);
                if version != 3 {
                    return Err(self.bad(format!("is libxc stream version {version}, not 3")));
                }
                if u16::from_be_bytes([h[16], h[17]]) & 1 != 0 {
                    return Err(self.bad("is big-endian (libxc)"));
                }
                self.state = State::LibxcDomainHeader;
            }
            State::LibxcDomainHeader => self.state = State::LibxcRecord,
            State::LibxcRecord => {
                let (ty, len) = (le32(&h[..4]), le32(&h[4..8]));
                if ty == REC_END {
                    self.state = State::LibxlRecord;
                    self.libxc_ended = true;
                } else {
                    self.skip = padded(len);
                    self.after = State::LibxcRecord;
                }
            }
            State::XlOptional | State::Tail => {}
        }
        Ok(None)
    }
}

/// The receiver's report banner (`migrate_report` in `tools/xl/xl.h`, sent with its NUL), then
/// one status byte: 0 when the domain runs on the receiver.
pub const REPORT: &[u8] = b"my copy unpause results are as follows\0";

/// The status byte after the report banner in what the receiver sent, if it came.
pub fn receiver_report(output: &[u8]) -> Option<u8> {
    let at = output.windows(REPORT.len()).position(|w| w == REPORT)?;
    output.get(at + REPORT.len()).copied()
}

/// Writers for the framing, shared by the tests' stand-in for `xl` and the unit tests.
pub mod write {
    use super::*;

    /// The xl header carrying `config` (JSON, with its trailing NUL), as
    /// `save_domain_core_writeconfig` writes it (flags: stream v2, JSON config).
    pub fn xl_header(config: &[u8]) -> Vec<u8> {
        let mut out = XL_MAGIC.to_vec();
        out.extend_from_slice(&XL_BYTEORDER.to_le_bytes());
        out.extend_from_slice(&(0b11u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(config.len() as u32 + 4).to_le_bytes());
        out.extend_from_slice(&(config.len() as u32).to_le_bytes());
        out.extend_from_slice(config);
        out
    }

    /// The libxl stream header, version 2, little-endian.
    pub fn libxl_header() -> Vec<u8> {
        let mut out = LIBXL_IDENT.to_vec();
        out.extend_from_slice(&2u32.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out
    }

    /// One record (libxl or libxc: the same layout) with its padding.
    pub fn record(ty: u32, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + body.len() + 7);
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        out.resize(8 + padded(body.len() as u32) as usize, 0);
        out
    }

    /// The libxc image header (version 3, little-endian) and an x86 HVM domain header.
    pub fn libxc_headers() -> Vec<u8> {
        let mut out = vec![0xff; 8];
        out.extend_from_slice(&LIBXC_ID.to_be_bytes());
        out.extend_from_slice(&3u32.to_be_bytes());
        out.extend_from_slice(&[0u8; 8]);
        out.extend_from_slice(&2u32.to_le_bytes());
        out.extend_from_slice(&[12, 0, 0, 0]);
        out.extend_from_slice(&4u32.to_le_bytes());
        out.extend_from_slice(&19u32.to_le_bytes());
        out
    }

    /// An emulator record's body: emulator id (QEMU upstream, 2), index 0, then `data`.
    pub fn emulator_body(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + data.len());
        out.extend_from_slice(&2u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(data);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::write::*;
    use super::*;

    /// A whole stream up to and including END, and where END starts.
    fn sample() -> (Vec<u8>, usize) {
        let mut s = xl_header(b"{\"c_info\":{}}\0");
        s.extend(libxl_header());
        s.extend(record(REC_LIBXC_CONTEXT, &[]));
        s.extend(libxc_headers());
        s.extend(record(1, &[7u8; 4096 + 13]));
        s.extend(record(0x8000_0001, b"optional"));
        s.extend(record(REC_END, &[]));
        s.extend(record(
            REC_EMULATOR_XENSTORE_DATA,
            &emulator_body(b"k\0v\0"),
        ));
        s.extend(record(REC_EMULATOR_CONTEXT, &emulator_body(&[0u8; 1000])));
        let end = s.len();
        s.extend(record(REC_END, &[]));
        s.extend(b"domain is yours, you are cleared to unpause\0");
        (s, end)
    }

    #[test]
    fn finds_end_whatever_the_piece_size() {
        let (s, end) = sample();
        for size in [1, 3, 7, 8, 9, 64, 4096, s.len()] {
            let mut p = SenderStream::new().keep_config();
            let mut fed = 0;
            let mut found = None;
            for piece in s.chunks(size) {
                if let Found::End(at) = p.feed(piece).expect("must succeed") {
                    found = Some(fed + at);
                    break;
                }
                fed += piece.len();
            }
            // Everything before `at` may go before the final sync: at most the first bytes of
            // the END header, never all of it.
            let at = found.unwrap_or_else(|| panic!("no END with pieces of {size}"));
            assert!(at >= end && at - end < 8, "size {size}: {at} vs {end}");
            assert!(p.ended());
            assert_eq!(
                &p.config().expect("must succeed")[4..],
                b"{\"c_info\":{}}\0"
            );
        }
        let mut p = SenderStream::new();
        assert_eq!(p.feed(&s).expect("must succeed"), Found::End(end));
        assert!(p.suspended());
        // Suspended only once libxl writes again after the libxc stream: the xenstore record
        // (24 bytes) and the emulator record (1016) sit between the libxc END and END.
        let mut p = SenderStream::new();
        let cut = end - 1016 - 24;
        assert_eq!(p.feed(&s[..cut]).expect("must succeed"), Found::Nothing);
        assert!(!p.suspended());
        assert_eq!(
            p.feed(&s[cut..cut + 8]).expect("must succeed"),
            Found::Nothing
        );
        assert!(p.suspended());
    }

    #[test]
    fn refuses_what_it_cannot_follow() {
        let (mut s, _) = sample();
        s[0] = b'x';
        assert!(SenderStream::new()
            .feed(&s)
            .expect_err("must fail")
            .0
            .contains("magic"));
        let mut s = xl_header(b"{}\0");
        s.extend(libxl_header());
        s.extend(record(REC_CHECKPOINT_STATE, &[0; 8]));
        let e = SenderStream::new().feed(&s).expect_err("must fail");
        assert!(e.0.contains("checkpoint"), "{e}");
        let mut s = xl_header(b"{}\0");
        let over = (MAX_CONFIG + 100).to_le_bytes();
        s[44..48].copy_from_slice(&over);
        assert!(SenderStream::new().feed(&s).is_err());
    }
}
