//! The handshake's wire format: greeting, client flags, options and option replies.

use bytes::{BufMut, BytesMut};

use super::*;

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

    proptest! {
        #[test]
        fn option_parse_inverts_info_encoding(name in "[a-z0-9:/._-]{0,64}", items in proptest::collection::vec(any::<u16>(), 0..8)) {
            let data = option_data_info(&name, &items);
            prop_assert_eq!(
                parse_option(opt::INFO, &data),
                Ok(ClientOption::Info(InfoRequest { name, items }))
            );
        }

    }
}
