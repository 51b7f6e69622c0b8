//! The agent's control-message decoder against arbitrary input: whatever a peer sends before or
//! after authenticating, `read_message` returns an error or a message, never panics, and never
//! allocates for a frame over the cap (it refuses the length before reading the body).

use ferry::protocol::{self, ProtocolError, SourceMessage, MAX_FRAME};
use proptest::prelude::*;

fn read(bytes: &[u8]) -> Result<SourceMessage, ProtocolError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut reader = bytes;
    rt.block_on(protocol::read_message::<_, SourceMessage>(&mut reader))
}

fn frame(len: u32, body: &[u8]) -> Vec<u8> {
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

proptest! {
    /// Any bytes at all.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = read(&bytes);
    }

    /// A correct length prefix over arbitrary bodies: a message or `Malformed`.
    #[test]
    fn framed_garbage_is_malformed(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        match read(&frame(body.len() as u32, &body)) {
            Ok(_) | Err(ProtocolError::Malformed(_)) => {}
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    /// Framed JSON that looks like the protocol (a tag and fields of the wrong shapes).
    #[test]
    fn framed_near_messages_never_panic(
        tag in prop::sample::select(vec!["hello", "auth", "prepare", "prepare_xl", "xl_receive", "start_destination", "switched", "abort", "x"]),
        field in "[a-z_]{0,12}",
        value in prop_oneof![
            Just("null".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            "[ -~]{0,40}".prop_map(|s| serde_json::Value::String(s).to_string()),
            Just(r#"{"argv":["qemu-system-x86_64"],"disks":[{"size":-1}]}"#.to_string()),
            Just("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]".to_string()),
        ],
    ) {
        let body = format!(r#"{{"type":"{tag}","{field}":{value}}}"#);
        let _ = read(&frame(body.len() as u32, body.as_bytes()));
    }

    /// Every length over the cap is refused as such, whatever follows.
    #[test]
    fn over_cap_lengths_are_refused(
        len in (MAX_FRAME as u32 + 1)..=u32::MAX,
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        match read(&frame(len, &tail)) {
            Err(ProtocolError::FrameTooLarge { len: got }) => prop_assert_eq!(got, len as usize),
            other => prop_assert!(false, "expected FrameTooLarge, got {other:?}"),
        }
    }

    /// A frame shorter than its length prefix is an I/O error (the peer hung up), not a hang.
    #[test]
    fn truncated_frames_are_errors(len in 1u32..=MAX_FRAME as u32, body in proptest::collection::vec(any::<u8>(), 0..256)) {
        prop_assume!((body.len() as u32) < len);
        prop_assert!(matches!(read(&frame(len, &body)), Err(ProtocolError::Io(_))));
    }
}

/// Deeply nested JSON is refused by serde_json's recursion limit, not a stack overflow.
#[test]
fn deep_nesting_is_malformed_not_a_crash() {
    let body = format!(
        r#"{{"type":"prepare","vm":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert!(matches!(
        read(&frame(body.len() as u32, body.as_bytes())),
        Err(ProtocolError::Malformed(_))
    ));
}

proptest! {
    /// Stream mode (`ferry xl migrate`): any bytes give a chunk or an error, never a panic, and
    /// a data length over the cap is refused before anything is allocated.
    #[test]
    fn stream_chunks_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let mut reader = &bytes[..];
        let result = rt.block_on(ferry::xl::wire::read_chunk(&mut reader));
        if bytes.first() == Some(&b'D') && bytes.len() >= 5 {
            let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
            if len > MAX_FRAME {
                prop_assert!(matches!(result, Err(ProtocolError::FrameTooLarge { .. })), "{result:?}");
            }
        }
    }
}
