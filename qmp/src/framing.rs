//! QMP framing: newline-delimited JSON objects, read with a cap on the line length, and sorted
//! into greeting, reply and event.
//!
//! Pure apart from [`LineReader`]'s reads, so that everything here is unit-tested without QEMU.
//! Nothing in this module may panic on what the peer sends or allocate more than the cap (plus
//! one read's worth) for a line.

use bytes::{Buf, BytesMut};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::events::{Event, Timestamp};
use crate::QemuVersion;

/// The longest line accepted from the peer, newline excluded. QEMU's largest replies
/// (`query-qmp-schema`: ~200 KiB) are far below it.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// How much to read at a time; also how far past the cap the buffer may grow before the cap
/// check sees it.
const READ_CHUNK: usize = 64 * 1024;

/// Why [`LineReader::next_line`] could not produce a line.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// More than `limit` bytes without a newline.
    TooLong { limit: usize },
    /// The peer closed the socket after part of a line.
    EofMidLine,
    /// The read failed.
    Io(std::io::Error),
}

/// Splits a byte stream into lines, refusing lines over a cap instead of buffering them.
pub(crate) struct LineReader<R> {
    reader: R,
    buf: BytesMut,
    /// Bytes of `buf` already known to hold no newline, so each byte is scanned once.
    scanned: usize,
    limit: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(crate) fn new(reader: R, limit: usize) -> Self {
        LineReader {
            reader,
            buf: BytesMut::with_capacity(8 * 1024),
            scanned: 0,
            limit,
        }
    }

    /// The next line without its `\n` (and without a `\r` before it), skipping blank lines;
    /// `Ok(None)` when the peer closed the socket between lines.
    pub(crate) async fn next_line(&mut self) -> Result<Option<BytesMut>, FrameError> {
        loop {
            if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos;
                self.scanned = 0;
                if end > self.limit {
                    return Err(FrameError::TooLong { limit: self.limit });
                }
                let mut line = self.buf.split_to(end + 1);
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(line));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.limit {
                return Err(FrameError::TooLong { limit: self.limit });
            }
            self.buf.reserve(READ_CHUNK);
            // `take` keeps one read from landing more than READ_CHUNK bytes past the cap.
            let n = (&mut self.reader)
                .take(READ_CHUNK as u64)
                .read_buf(&mut self.buf)
                .await
                .map_err(FrameError::Io)?;
            if n == 0 {
                return if self.buf.iter().all(u8::is_ascii_whitespace) {
                    self.buf.advance(self.buf.len());
                    Ok(None)
                } else {
                    Err(FrameError::EofMidLine)
                };
            }
        }
    }
}

/// What one line from the peer turned out to be.
#[derive(Debug)]
pub(crate) enum Message {
    /// An answer to a command: `{"return": ..., "id": ...}` or `{"error": {...}, "id": ...}`.
    Reply {
        id: Option<Value>,
        result: Result<Value, QmpFailure>,
    },
    /// An asynchronous event.
    Event(Event),
    /// A JSON object of no kind this client knows (a future QMP extension): ignored.
    Unknown,
}

/// QEMU's error reply, before it is attached to the command that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QmpFailure {
    pub(crate) class: String,
    pub(crate) desc: String,
}

/// Sorts one line into reply or event. `Err` carries a description for
/// [`Error::Malformed`](crate::Error::Malformed): the line is not a JSON object, or a reply or
/// event lacks a member QMP requires.
pub(crate) fn parse_message(line: &[u8]) -> Result<Message, String> {
    let mut obj = parse_object(line)?;
    if let Some(name) = obj.remove("event") {
        let Value::String(name) = name else {
            return Err(format!("event name is not a string in {}", snippet(line)));
        };
        let timestamp = match obj.remove("timestamp").map(Timestamp::deserialize) {
            Some(Ok(ts)) => ts,
            _ => return Err(format!("event {name} has no valid timestamp")),
        };
        let data = obj
            .remove("data")
            .unwrap_or_else(|| Value::Object(Map::new()));
        return Ok(Message::Event(Event {
            name,
            data,
            timestamp,
        }));
    }
    let id = obj.remove("id");
    if let Some(value) = obj.remove("return") {
        return Ok(Message::Reply {
            id,
            result: Ok(value),
        });
    }
    if let Some(error) = obj.remove("error") {
        #[derive(Deserialize)]
        struct ErrorBody {
            class: String,
            desc: String,
        }
        return match ErrorBody::deserialize(error) {
            Ok(ErrorBody { class, desc }) => Ok(Message::Reply {
                id,
                result: Err(QmpFailure { class, desc }),
            }),
            Err(e) => Err(format!("error reply without class and desc: {e}")),
        };
    }
    Ok(Message::Unknown)
}

/// The greeting QEMU sends on connect: `{"QMP": {"version": {...}, "capabilities": [...]}}`.
#[derive(Debug, Clone)]
pub(crate) struct Greeting {
    pub(crate) version: QemuVersion,
    pub(crate) package: String,
}

/// Parses the greeting; `Err` is the detail for [`Error::NotQmp`](crate::Error::NotQmp).
pub(crate) fn parse_greeting(line: &[u8]) -> Result<Greeting, String> {
    #[derive(Deserialize)]
    struct Outer {
        #[serde(rename = "QMP")]
        qmp: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        version: Version,
        // Required so that a look-alike without it is refused; the content is not needed
        // because this client never enables optional capabilities.
        #[allow(dead_code)]
        capabilities: Vec<Value>,
    }
    #[derive(Deserialize)]
    struct Version {
        qemu: QemuVersion,
        #[serde(default)]
        package: String,
    }
    let expected = r#"expected a greeting like {"QMP": {"version": ..., "capabilities": [...]}}"#;
    let obj = parse_object(line).map_err(|e| format!("{expected}, got {e}"))?;
    match Outer::deserialize(Value::Object(obj)) {
        Ok(outer) => Ok(Greeting {
            version: outer.qmp.version.qemu,
            package: outer.qmp.version.package,
        }),
        Err(e) => Err(format!("{expected}, got {} ({e})", snippet(line))),
    }
}

fn parse_object(line: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(format!(
            "a JSON value that is not an object: {}",
            snippet(line)
        )),
        Err(e) => Err(format!("a line that is not JSON: {} ({e})", snippet(line))),
    }
}

/// The start of a line, printable, for error messages (never the whole 16 MiB).
fn snippet(line: &[u8]) -> String {
    const MAX: usize = 80;
    let text = String::from_utf8_lossy(&line[..line.len().min(MAX)]).into_owned();
    if line.len() > MAX {
        format!("{text:?}...")
    } else {
        format!("{text:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], limit: usize) -> (Vec<String>, Option<FrameError>) {
        let mut reader = LineReader::new(input, limit);
        let mut out = Vec::new();
        loop {
            match reader.next_line().await {
                Ok(Some(line)) => out.push(String::from_utf8_lossy(&line).into_owned()),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[tokio::test]
    async fn splits_lines_and_strips_crlf_and_blank_lines() {
        let (got, err) = lines(b"{\"a\":1}\r\n\n  \n{\"b\":2}\n", 100).await;
        assert_eq!(got, vec!["{\"a\":1}", "{\"b\":2}"]);
        assert!(err.is_none());
    }

    #[tokio::test]
    async fn eof_mid_line_is_an_error_not_a_line() {
        let (got, err) = lines(b"{\"a\":1}\n{\"b\":", 100).await;
        assert_eq!(got, vec!["{\"a\":1}"]);
        assert!(matches!(err, Some(FrameError::EofMidLine)), "{err:?}");
    }

    #[tokio::test]
    async fn line_at_the_cap_passes_and_one_byte_more_fails() {
        let ok = format!("{}\n", "x".repeat(10));
        assert_eq!(lines(ok.as_bytes(), 10).await.0, vec!["x".repeat(10)]);
        let long = format!("{}\nafter\n", "x".repeat(11));
        let (got, err) = lines(long.as_bytes(), 10).await;
        assert!(got.is_empty());
        assert!(
            matches!(err, Some(FrameError::TooLong { limit: 10 })),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn endless_line_is_refused_without_buffering_it_all() {
        // A reader that never ends and never sends a newline: the cap must stop it.
        let endless = tokio::io::repeat(b'x');
        let mut reader = LineReader::new(endless, 1000);
        let err = reader.next_line().await.err();
        assert!(
            matches!(err, Some(FrameError::TooLong { limit: 1000 })),
            "{err:?}"
        );
        assert!(
            reader.buf.len() <= 1000 + READ_CHUNK,
            "buffered {}",
            reader.buf.len()
        );
    }

    #[tokio::test]
    async fn byte_at_a_time_delivery_gives_the_same_lines() {
        let (client, mut server) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            server
                .write_all(b"{\"return\": {}, \"id\": 1}\n{\"x\":2}\n")
                .await
                .expect("write");
        });
        let mut reader = LineReader::new(client, 100);
        let first = reader.next_line().await.expect("read").expect("a line");
        assert_eq!(&first[..], b"{\"return\": {}, \"id\": 1}");
        let second = reader.next_line().await.expect("read").expect("a line");
        assert_eq!(&second[..], b"{\"x\":2}");
        writer.await.expect("writer task");
        assert!(reader.next_line().await.expect("read").is_none());
    }

    #[test]
    fn reply_with_return_and_id() {
        match parse_message(br#"{"return": {"running": true}, "id": 7}"#) {
            Ok(Message::Reply { id, result }) => {
                assert_eq!(id, Some(Value::from(7)));
                assert_eq!(result, Ok(serde_json::json!({"running": true})));
            }
            other => panic!("not a reply: {other:?}"),
        }
    }

    #[test]
    fn error_reply_keeps_class_and_desc() {
        let line = br#"{"id": 3, "error": {"class": "CommandNotFound", "desc": "The command foo has not been found"}}"#;
        match parse_message(line) {
            Ok(Message::Reply { id, result: Err(f) }) => {
                assert_eq!(id, Some(Value::from(3)));
                assert_eq!(f.class, "CommandNotFound");
                assert_eq!(f.desc, "The command foo has not been found");
            }
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn event_with_and_without_data() {
        let line =
            br#"{"timestamp": {"seconds": 1700000000, "microseconds": 42}, "event": "STOP"}"#;
        let Ok(Message::Event(ev)) = parse_message(line) else {
            panic!("not an event")
        };
        assert_eq!(ev.name, "STOP");
        assert_eq!(ev.data, serde_json::json!({}));
        assert_eq!(ev.timestamp.as_micros(), 1_700_000_000_000_042);
        let line = br#"{"event": "SHUTDOWN", "data": {"guest": false}, "timestamp": {"seconds": 1, "microseconds": 2}}"#;
        let Ok(Message::Event(ev)) = parse_message(line) else {
            panic!("not an event")
        };
        assert_eq!(ev.data, serde_json::json!({"guest": false}));
    }

    #[test]
    fn malformed_lines_are_errors_with_a_readable_snippet() {
        for line in [
            &b"garbage"[..],
            b"[1,2]",
            b"{\"event\": 5}",
            b"{\"event\": \"X\"}",
            b"{\"error\": \"x\"}",
        ] {
            let err = parse_message(line).expect_err("must be refused");
            assert!(!err.is_empty());
        }
        let huge = vec![b'z'; 10_000];
        let err = parse_message(&huge).expect_err("not JSON");
        assert!(
            err.len() < 300,
            "error text must not carry the whole line: {} bytes",
            err.len()
        );
    }

    #[test]
    fn unknown_object_is_ignored_not_fatal() {
        assert!(matches!(
            parse_message(br#"{"something": "new"}"#),
            Ok(Message::Unknown)
        ));
    }

    #[test]
    fn greeting_of_qemu_7_2_and_10_0() {
        let g = parse_greeting(br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#)
            .expect("7.2 greeting");
        assert_eq!(
            g.version,
            QemuVersion {
                major: 7,
                minor: 2,
                micro: 22
            }
        );
        assert_eq!(g.package, "Debian 1:7.2+dfsg-7+deb12u18+b3");
        let g = parse_greeting(br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}"#)
            .expect("10.0 greeting");
        assert!(
            g.version
                > QemuVersion {
                    major: 7,
                    minor: 2,
                    micro: 22
                }
        );
    }

    #[test]
    fn not_a_greeting() {
        for line in [
            &b"SSH-2.0-OpenSSH_9.2"[..],
            br#"{"return": {}}"#,
            br#"{"QMP": {"version": 1}}"#,
        ] {
            let detail = parse_greeting(line).expect_err("must be refused");
            assert!(detail.contains("expected a greeting"), "{detail}");
        }
    }
}
