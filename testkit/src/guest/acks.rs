//! What the guest acknowledged, read off its serial console.

use std::collections::BTreeMap;

use ferry_guest_workload::console::{self, Line};

/// Longest console line kept while waiting for its end; a longer one is noise and is dropped.
const MAX_LINE: usize = 4096;

/// The acknowledgements (and other workload events) seen on a guest console, per guest disk.
///
/// Fed incrementally: only complete lines count, so a half-written `ferry-ack vda 12` at the end
/// of the log (which may become `ferry-ack vda 123`) is held back until its newline arrives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acks {
    disks: BTreeMap<String, DiskAcks>,
    ready: Option<Vec<String>>,
    errors: Vec<(String, String)>,
    partial: Vec<u8>,
}

/// One guest disk's events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskAcks {
    /// Acknowledged sequence numbers, ascending.
    pub seqs: Vec<u64>,
    /// The virtio serial the host gave the disk (the host's id for it), from `ferry-start`.
    pub serial: Option<String>,
    /// The ring size the workload uses, from `ferry-start`.
    pub slots: Option<u64>,
    /// The first sequence number of this run, from `ferry-start`.
    pub first: Option<u64>,
}

impl Acks {
    /// Parses a whole console log; an unterminated last line is ignored.
    pub fn parse(text: &str) -> Self {
        let mut acks = Self::default();
        acks.feed(text.as_bytes());
        acks
    }

    /// Adds the next bytes of the console log.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let line = if self.partial.is_empty() {
                String::from_utf8_lossy(&rest[..end]).into_owned()
            } else {
                self.partial.extend_from_slice(&rest[..end]);
                let line = String::from_utf8_lossy(&self.partial).into_owned();
                self.partial.clear();
                line
            };
            self.line(&line);
            rest = &rest[end + 1..];
        }
        if self.partial.len() + rest.len() <= MAX_LINE {
            self.partial.extend_from_slice(rest);
        } else {
            self.partial.clear();
        }
    }

    fn line(&mut self, line: &str) {
        match console::parse(line) {
            Some(Line::Ack { disk, seq }) => {
                let seqs = &mut self.disk_mut(disk).seqs;
                if seqs.last().is_some_and(|&last| last >= seq) {
                    // Out of order only across merged logs or a rebooted guest: keep it sorted.
                    if let Err(at) = seqs.binary_search(&seq) {
                        seqs.insert(at, seq);
                    }
                } else {
                    seqs.push(seq);
                }
            }
            Some(Line::Start {
                disk,
                serial,
                slots,
                first,
            }) => {
                let d = self.disk_mut(disk);
                d.serial = serial.map(str::to_owned);
                d.slots = Some(slots);
                d.first = Some(first);
            }
            Some(Line::Ready { disks }) => {
                self.ready = Some(disks.into_iter().map(str::to_owned).collect());
            }
            Some(Line::Error { disk, message }) => {
                self.errors.push((disk.to_owned(), message.to_owned()));
            }
            Some(Line::Filled { .. }) | None => {}
        }
    }

    fn disk_mut(&mut self, disk: &str) -> &mut DiskAcks {
        self.disks.entry(disk.to_owned()).or_default()
    }

    /// Adds another log's events, e.g. the destination's console after a migration.
    pub fn merge(&mut self, other: &Acks) {
        for (name, theirs) in &other.disks {
            let ours = self.disk_mut(name);
            ours.seqs.extend_from_slice(&theirs.seqs);
            ours.seqs.sort_unstable();
            ours.seqs.dedup();
            ours.serial = ours.serial.take().or_else(|| theirs.serial.clone());
            ours.slots = ours.slots.or(theirs.slots);
            ours.first = ours.first.or(theirs.first);
        }
        if self.ready.is_none() {
            self.ready.clone_from(&other.ready);
        }
        self.errors.extend(other.errors.iter().cloned());
    }

    /// The highest acknowledged sequence number of `disk`.
    pub fn max_seq(&self, disk: &str) -> Option<u64> {
        self.seqs(disk).last().copied()
    }

    /// Every acknowledged sequence number of `disk`, ascending (empty if none).
    pub fn seqs(&self, disk: &str) -> &[u64] {
        self.disks.get(disk).map_or(&[], |d| &d.seqs)
    }

    /// How many records of `disk` were acknowledged.
    pub fn count(&self, disk: &str) -> usize {
        self.seqs(disk).len()
    }

    /// Everything seen about `disk`.
    pub fn disk(&self, disk: &str) -> Option<&DiskAcks> {
        self.disks.get(disk)
    }

    /// The guest disk names seen, sorted.
    pub fn disks(&self) -> impl Iterator<Item = &str> {
        self.disks.keys().map(String::as_str)
    }

    /// The guest's name (`vdb`) for the disk the host launched with id/serial `serial`.
    pub fn disk_for_serial(&self, serial: &str) -> Option<&str> {
        self.disks
            .iter()
            .find(|(_, d)| d.serial.as_deref() == Some(serial))
            .map(|(name, _)| name.as_str())
    }

    /// The disks the guest's init announced, once it has.
    pub fn ready(&self) -> Option<&[String]> {
        self.ready.as_deref()
    }

    /// `(disk, message)` for every workload that gave up.
    pub fn errors(&self) -> &[(String, String)] {
        &self.errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "ferry-ready vda vdb\r\n\
        ferry-start vda serial=disk0 slots=16384 first=1\r\n\
        ferry-start vdb serial=disk1 slots=8192 first=1\r\n\
        ferry-ack vda 1\r\n\
        ferry-ack vdb 1\r\n\
        [    4.2] some kernel message\r\n\
        ferry-ack vda 2\r\n\
        ferry-ack vdb 2\r\n\
        ferry-ack vda 3\r\n\
        ferry-ack vda 31";

    #[test]
    fn parses_a_console_log() {
        let acks = Acks::parse(LOG);
        assert_eq!(acks.seqs("vda"), &[1, 2, 3]);
        assert_eq!(acks.max_seq("vdb"), Some(2));
        assert_eq!(acks.count("vdc"), 0);
        assert_eq!(acks.max_seq("vdc"), None);
        assert_eq!(
            acks.ready(),
            Some(&["vda".to_owned(), "vdb".to_owned()][..])
        );
        assert_eq!(acks.disk_for_serial("disk1"), Some("vdb"));
        assert_eq!(acks.disk_for_serial("disk9"), None);
        assert_eq!(acks.disk("vda").and_then(|d| d.slots), Some(16384));
        assert_eq!(acks.disks().collect::<Vec<_>>(), ["vda", "vdb"]);
        assert!(acks.errors().is_empty());
    }

    #[test]
    fn a_partial_last_line_waits_for_its_end() {
        // "ferry-ack vda 31" has no newline yet: it must not count as 31, nor as 3.
        let mut acks = Acks::parse(LOG);
        assert_eq!(acks.max_seq("vda"), Some(3));
        acks.feed(b"4\r\n");
        assert_eq!(acks.max_seq("vda"), Some(314));
    }

    #[test]
    fn byte_by_byte_feeding_equals_parsing_at_once() {
        let mut acks = Acks::default();
        for b in LOG.as_bytes() {
            acks.feed(std::slice::from_ref(b));
        }
        let mut whole = Acks::parse(LOG);
        whole.partial.clear();
        acks.partial.clear();
        assert_eq!(acks, whole);
    }

    #[test]
    fn merges_source_and_destination_logs() {
        let mut source = Acks::parse("ferry-ack vda 1\nferry-ack vda 2\n");
        let destination = Acks::parse("ferry-ack vda 3\nferry-ack vda 2\nferry-error vda boom\n");
        source.merge(&destination);
        assert_eq!(source.seqs("vda"), &[1, 2, 3]);
        assert_eq!(source.errors(), &[("vda".to_owned(), "boom".to_owned())]);
    }

    #[test]
    fn survives_garbage() {
        let mut acks = Acks::default();
        acks.feed(&[0xff, 0xfe, b'\n']);
        acks.feed(&vec![b'x'; 3 * MAX_LINE]);
        acks.feed(b"\nferry-ack vda 9\n");
        assert_eq!(acks.seqs("vda"), &[9]);
    }
}
