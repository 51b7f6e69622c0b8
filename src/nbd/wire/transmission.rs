//! The transmission phase's wire format: requests, simple replies and structured or extended
//! reply chunks.

use bytes::{BufMut, BytesMut};

use super::*;

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    proptest! {
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
