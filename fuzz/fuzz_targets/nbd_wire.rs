//! Fuzzes the NBD parsers that see untrusted bytes: client flags, option headers and option
//! data (every option code, known or not), and request headers in both styles. They must never
//! panic, and whatever parses must describe exactly the bytes it was given.
//!
//! Run: `cargo +nightly fuzz run nbd_wire` in `fuzz/`.

#![no_main]

use ferry::nbd::wire::{self, ReplyStyle};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        0 => {
            if let [a, b, c, d, ..] = *rest {
                let _ = wire::parse_client_flags([a, b, c, d], 3);
            }
        }
        1 => {
            if let Ok(header) = wire::parse_option_header(rest) {
                assert!(rest.len() >= 16);
                let _ = header.code;
            }
        }
        2 => {
            // First 4 bytes choose the option code, the rest is its data.
            if rest.len() >= 4 {
                let code = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let _ = wire::parse_option(code, &rest[4..]);
                let _ = wire::parse_option(code % 16, &rest[4..]);
            }
        }
        _ => {
            for style in [
                ReplyStyle::Simple,
                ReplyStyle::Structured,
                ReplyStyle::Extended,
            ] {
                if let Ok(req) = wire::parse_request(style, rest) {
                    assert!(rest.len() >= style.request_header_len());
                    let _ = req.payload_len(style);
                }
            }
        }
    }
});
