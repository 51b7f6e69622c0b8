//! Lines on the guest's serial console, one event each:
//!
//! ```text
//! ferry-ready vda vdb                                  init: drivers loaded, these disks found
//! ferry-start vda serial=disk0 slots=16384 first=1     workload: ring geometry, first seq
//! ferry-filled vda 64                                  workload: bulk fill of 64 MiB done
//! ferry-memfilled 1536                                 workload: 1536 MiB of RAM filled, held
//! ferry-ack vda 1234                                   workload: record 1234 is durable
//! ferry-error vda cannot write slot 7: I/O error       workload: gave up on this disk
//! ```
//!
//! An ack is printed only after the record's write and `fdatasync` returned, so every ack on the
//! console is a promise about the disk. `serial` is the virtio-blk serial the host set (the id it
//! knows the disk by); it maps the guest's name back to the host's disk without guessing from the
//! probe order.
//!
//! The parser is meant for a console log that also holds kernel messages and may end in a half
//! written line: it accepts a line only when the event sits at the end of it (a kernel message
//! may have been printed in front) and callers pass complete lines only.

/// Printed by the guest's init once the virtio drivers are loaded.
pub const READY: &str = "ferry-ready";
/// A record is durable.
pub const ACK: &str = "ferry-ack";
/// The workload started on a disk.
pub const START: &str = "ferry-start";
/// The workload's bulk fill finished.
pub const FILLED: &str = "ferry-filled";
/// The workload filled and holds this much guest RAM (`--hold-memory`); informational, not parsed.
pub const MEMFILLED: &str = "ferry-memfilled";
/// The workload stopped on a disk because of an error.
pub const ERROR: &str = "ferry-error";

/// One recognised console event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line<'a> {
    /// Init is done; the disks it found, in order.
    Ready { disks: Vec<&'a str> },
    /// The workload began writing to `disk`.
    Start {
        disk: &'a str,
        serial: Option<&'a str>,
        slots: u64,
        first: u64,
    },
    /// `mib` MiB of filler were written and synced.
    Filled { disk: &'a str, mib: u64 },
    /// Record `seq` of `disk` is durable.
    Ack { disk: &'a str, seq: u64 },
    /// The workload on `disk` stopped.
    Error { disk: &'a str, message: &'a str },
}

/// The ack line for record `seq`, newline included.
pub fn ack(disk: &str, seq: u64) -> String {
    format!("{ACK} {disk} {seq}\n")
}

/// The start line, newline included. A serial with spaces or control characters is replaced
/// by `?`s so that the line stays parseable.
pub fn start(disk: &str, serial: Option<&str>, slots: u64, first: u64) -> String {
    let serial: String = serial
        .unwrap_or("")
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    format!("{START} {disk} serial={serial} slots={slots} first={first}\n")
}

/// The fill line, newline included.
pub fn filled(disk: &str, mib: u64) -> String {
    format!("{FILLED} {disk} {mib}\n")
}

/// The memory fill line, newline included.
pub fn memfilled(mib: u64) -> String {
    format!("{MEMFILLED} {mib}\n")
}

/// The error line, newline included; newlines in `message` are flattened.
pub fn error(disk: &str, message: &str) -> String {
    format!("{ERROR} {disk} {}\n", message.replace(['\r', '\n'], " "))
}

/// Recognises one complete console line (with or without its line ending).
pub fn parse(line: &str) -> Option<Line<'_>> {
    let line = line.trim_end_matches(['\r', '\n']);
    // A kernel message may precede the event on the same line; the event is the last one.
    let at = line.rfind("ferry-")?;
    let event = &line[at..];
    let (tag, rest) = event.split_once(' ').unwrap_or((event, ""));
    let mut words = rest.split_ascii_whitespace();
    match tag {
        READY => Some(Line::Ready {
            disks: words.collect(),
        }),
        ACK => {
            let disk = words.next()?;
            let seq = number(words.next()?)?;
            words.next().is_none().then_some(Line::Ack { disk, seq })
        }
        FILLED => {
            let disk = words.next()?;
            let mib = number(words.next()?)?;
            words.next().is_none().then_some(Line::Filled { disk, mib })
        }
        START => {
            let disk = words.next()?;
            let serial = words.next()?.strip_prefix("serial=")?;
            let slots = number(words.next()?.strip_prefix("slots=")?)?;
            let first = number(words.next()?.strip_prefix("first=")?)?;
            let serial = (!serial.is_empty()).then_some(serial);
            words.next().is_none().then_some(Line::Start {
                disk,
                serial,
                slots,
                first,
            })
        }
        ERROR => {
            let (disk, message) = rest.split_once(' ').unwrap_or((rest, ""));
            (!disk.is_empty()).then_some(Line::Error {
                disk,
                message: message.trim(),
            })
        }
        _ => None,
    }
}

/// Decimal digits only: `+5` or ` 5` are not what the workload prints.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_back() {
        assert_eq!(
            parse(&ack("vda", 1234)),
            Some(Line::Ack {
                disk: "vda",
                seq: 1234
            })
        );
        assert_eq!(
            parse(&start("vdb", Some("disk1"), 8192, 1)),
            Some(Line::Start {
                disk: "vdb",
                serial: Some("disk1"),
                slots: 8192,
                first: 1
            })
        );
        assert_eq!(
            parse(&start("vdb", None, 8192, 40)),
            Some(Line::Start {
                disk: "vdb",
                serial: None,
                slots: 8192,
                first: 40
            })
        );
        assert_eq!(
            parse(&filled("vda", 64)),
            Some(Line::Filled {
                disk: "vda",
                mib: 64
            })
        );
        assert_eq!(
            parse(&error("vda", "cannot write\nslot 3")),
            Some(Line::Error {
                disk: "vda",
                message: "cannot write slot 3"
            })
        );
        assert_eq!(
            parse("ferry-ready vda vdb\r\n"),
            Some(Line::Ready {
                disks: vec!["vda", "vdb"]
            })
        );
    }

    #[test]
    fn a_serial_with_spaces_stays_one_word() {
        let line = start("vda", Some("a b"), 1, 1);
        assert_eq!(
            parse(&line),
            Some(Line::Start {
                disk: "vda",
                serial: Some("a?b"),
                slots: 1,
                first: 1
            })
        );
    }

    #[test]
    fn tolerates_console_noise_but_not_malformed_events() {
        assert_eq!(
            parse("[    3.1] random: crng initferry-ack vda 7\r"),
            Some(Line::Ack {
                disk: "vda",
                seq: 7
            })
        );
        assert_eq!(parse("[    0.000000] Linux version 6.1.0"), None);
        assert_eq!(parse("ferry-ack vda"), None);
        assert_eq!(parse("ferry-ack vda 12x"), None);
        assert_eq!(parse("ferry-ack vda +12"), None);
        assert_eq!(parse("ferry-ack vda 1 2"), None);
        assert_eq!(parse("ferry-ack vda 99999999999999999999999"), None);
        assert_eq!(parse("ferry-bogus vda 1"), None);
    }
}
