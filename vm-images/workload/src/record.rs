//! The on-disk record: one 4 KiB block per sequence number.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "FERRYREC"
//!      8     4  layout version (1), little endian
//!     12     4  record size (4096), little endian
//!     16     8  sequence number, little endian, >= 1
//!     24    16  guest disk name ("vda"), UTF-8, NUL padded
//!     40  4052  payload: a pseudo-random stream seeded by the sequence number
//!   4092     4  CRC-32 of bytes 0..4092, little endian
//! ```
//!
//! The disk is a ring of `size / 4096` slots and record `seq` lives in slot `seq % slots`, so a
//! long run wraps and a slot always holds the newest record that mapped to it. Sequence numbers
//! start at 1 and only grow (a restarted workload continues after the highest record it finds),
//! which is what lets a verifier accept "this slot holds seq >= the last acknowledged one".
//!
//! The payload is a function of the sequence number, so a record that passes its checksum but
//! carries another record's payload (a misdirected write) is caught too.

use std::fmt;

use crate::crc32::crc32;

/// Bytes per record, and the granularity of the ring.
pub const RECORD_SIZE: usize = 4096;
/// The first eight bytes of every record.
pub const MAGIC: [u8; 8] = *b"FERRYREC";
/// The layout version written into each record.
pub const VERSION: u32 = 1;
/// Longest disk name a record can carry, in bytes.
pub const MAX_DISK_NAME: usize = 16;

const SEQ_AT: usize = 16;
const NAME_AT: usize = 24;
const PAYLOAD_AT: usize = NAME_AT + MAX_DISK_NAME;
const CRC_AT: usize = RECORD_SIZE - 4;

/// A record's identity: which disk wrote it and its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number, >= 1.
    pub seq: u64,
    /// The guest's name for the disk, e.g. `vda`.
    pub disk: String,
}

/// Why a 4 KiB block is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// The buffer is not [`RECORD_SIZE`] bytes.
    WrongLength(usize),
    /// All zero: nothing was ever written there.
    Blank,
    /// Not a record (other data, or garbage).
    BadMagic,
    /// A record of a layout this code does not know.
    BadVersion(u32),
    /// The stored checksum does not match the bytes: a torn or corrupted write.
    BadChecksum { stored: u32, computed: u32 },
    /// Sequence number 0 is never written.
    ZeroSeq,
    /// The disk name is not NUL-padded UTF-8.
    BadDiskName,
    /// The checksum holds but the payload is not the one this sequence number produces.
    BadPayload { seq: u64 },
    /// The disk name given to [`encode`] is empty or longer than [`MAX_DISK_NAME`].
    DiskNameTooLong(usize),
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongLength(n) => write!(f, "{n} bytes instead of {RECORD_SIZE}"),
            Self::Blank => write!(f, "a blank (all-zero) block"),
            Self::BadMagic => write!(f, "no record magic (other data)"),
            Self::BadVersion(v) => write!(f, "a record of unknown layout version {v}"),
            Self::BadChecksum { stored, computed } => write!(
                f,
                "a record with a bad checksum (stored {stored:#010x}, computed {computed:#010x})"
            ),
            Self::ZeroSeq => write!(f, "a record with sequence number 0"),
            Self::BadDiskName => write!(f, "a record with an unreadable disk name"),
            Self::BadPayload { seq } => {
                write!(f, "record {seq} with a payload that is not its own")
            }
            Self::DiskNameTooLong(n) => write!(
                f,
                "a disk name of {n} bytes (must be 1 to {MAX_DISK_NAME} bytes)"
            ),
        }
    }
}

impl std::error::Error for RecordError {}

/// Number of record slots on a disk of `disk_bytes` bytes (a partial last block is unused).
pub fn slots(disk_bytes: u64) -> u64 {
    disk_bytes / RECORD_SIZE as u64
}

/// The slot that record `seq` occupies on a disk with `slots` slots. `slots` must be non-zero.
pub fn slot_of(seq: u64, slots: u64) -> u64 {
    seq % slots
}

/// Byte offset of `slot` on the disk.
pub fn slot_offset(slot: u64) -> u64 {
    slot * RECORD_SIZE as u64
}

/// Writes record `seq` of disk `disk` into `buf`.
pub fn encode(seq: u64, disk: &str, buf: &mut [u8; RECORD_SIZE]) -> Result<(), RecordError> {
    let name = disk.as_bytes();
    if name.is_empty() || name.len() > MAX_DISK_NAME {
        return Err(RecordError::DiskNameTooLong(name.len()));
    }
    if seq == 0 {
        return Err(RecordError::ZeroSeq);
    }
    buf[..8].copy_from_slice(&MAGIC);
    buf[8..12].copy_from_slice(&VERSION.to_le_bytes());
    buf[12..16].copy_from_slice(&(RECORD_SIZE as u32).to_le_bytes());
    buf[SEQ_AT..SEQ_AT + 8].copy_from_slice(&seq.to_le_bytes());
    buf[NAME_AT..PAYLOAD_AT].fill(0);
    buf[NAME_AT..NAME_AT + name.len()].copy_from_slice(name);
    fill_payload(seq, &mut buf[PAYLOAD_AT..CRC_AT]);
    let crc = crc32(&buf[..CRC_AT]);
    buf[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Reads a record back, checking everything that can be checked without knowing which record
/// should be there.
pub fn decode(buf: &[u8]) -> Result<Record, RecordError> {
    if buf.len() != RECORD_SIZE {
        return Err(RecordError::WrongLength(buf.len()));
    }
    if buf[..8] != MAGIC {
        return Err(if buf.iter().all(|&b| b == 0) {
            RecordError::Blank
        } else {
            RecordError::BadMagic
        });
    }
    let stored = u32::from_le_bytes(le4(&buf[CRC_AT..]));
    let computed = crc32(&buf[..CRC_AT]);
    if stored != computed {
        return Err(RecordError::BadChecksum { stored, computed });
    }
    let version = u32::from_le_bytes(le4(&buf[8..12]));
    let size = u32::from_le_bytes(le4(&buf[12..16]));
    if version != VERSION || size as usize != RECORD_SIZE {
        return Err(RecordError::BadVersion(version));
    }
    let seq = u64::from_le_bytes(le8(&buf[SEQ_AT..SEQ_AT + 8]));
    if seq == 0 {
        return Err(RecordError::ZeroSeq);
    }
    let name = &buf[NAME_AT..PAYLOAD_AT];
    let len = name.iter().position(|&b| b == 0).unwrap_or(MAX_DISK_NAME);
    if len == 0 || name[len..].iter().any(|&b| b != 0) {
        return Err(RecordError::BadDiskName);
    }
    let disk = std::str::from_utf8(&name[..len]).map_err(|_| RecordError::BadDiskName)?;
    let mut expected = [0u8; CRC_AT - PAYLOAD_AT];
    fill_payload(seq, &mut expected);
    if buf[PAYLOAD_AT..CRC_AT] != expected {
        return Err(RecordError::BadPayload { seq });
    }
    Ok(Record {
        seq,
        disk: disk.to_owned(),
    })
}

/// Fills `out` with a pseudo-random stream (SplitMix64) seeded by `seed`. Also used by the
/// workload's bulk fill, where only "not compressible, not zero" matters.
pub fn fill_payload(seed: u64, out: &mut [u8]) {
    let mut state = seed ^ 0x6665_7272_795f_7265; // "ferry_re"
    for chunk in out.chunks_mut(8) {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

fn le4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    a
}

fn le8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(seq: u64, disk: &str) -> [u8; RECORD_SIZE] {
        let mut buf = [0u8; RECORD_SIZE];
        encode(seq, disk, &mut buf).expect("valid record");
        buf
    }

    #[test]
    fn round_trips() {
        let buf = encoded(1234, "vdb");
        assert_eq!(&buf[..8], b"FERRYREC");
        assert_eq!(
            decode(&buf),
            Ok(Record {
                seq: 1234,
                disk: "vdb".into()
            })
        );
        let longest = "abcdefghijklmnop";
        assert_eq!(
            decode(&encoded(7, longest)).map(|r| r.disk),
            Ok(longest.to_owned())
        );
    }

    #[test]
    fn payload_depends_on_seq() {
        let a = encoded(1, "vda");
        let b = encoded(2, "vda");
        assert_ne!(a[PAYLOAD_AT..CRC_AT], b[PAYLOAD_AT..CRC_AT]);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let good = encoded(99, "vda");
        for byte in (0..RECORD_SIZE).step_by(7) {
            let mut bad = good;
            bad[byte] ^= 0x10;
            assert!(decode(&bad).is_err(), "flip at byte {byte} went unnoticed");
        }
    }

    #[test]
    fn classifies_what_is_not_a_record() {
        assert_eq!(decode(&[0u8; RECORD_SIZE]), Err(RecordError::Blank));
        assert_eq!(decode(&[0xAAu8; RECORD_SIZE]), Err(RecordError::BadMagic));
        assert_eq!(decode(&[0u8; 512]), Err(RecordError::WrongLength(512)));
        let mut torn = encoded(5, "vda");
        torn[2048..].fill(0);
        assert!(matches!(
            decode(&torn),
            Err(RecordError::BadChecksum { .. })
        ));
    }

    #[test]
    fn a_recomputed_checksum_does_not_hide_a_foreign_payload() {
        let mut buf = encoded(5, "vda");
        let other = encoded(6, "vda");
        buf[PAYLOAD_AT..CRC_AT].copy_from_slice(&other[PAYLOAD_AT..CRC_AT]);
        let crc = crc32(&buf[..CRC_AT]);
        buf[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&buf), Err(RecordError::BadPayload { seq: 5 }));
    }

    #[test]
    fn rejects_bad_input_to_encode() {
        let mut buf = [0u8; RECORD_SIZE];
        assert_eq!(encode(0, "vda", &mut buf), Err(RecordError::ZeroSeq));
        assert_eq!(
            encode(1, "", &mut buf),
            Err(RecordError::DiskNameTooLong(0))
        );
        assert_eq!(
            encode(1, "abcdefghijklmnopq", &mut buf),
            Err(RecordError::DiskNameTooLong(17))
        );
    }

    #[test]
    fn ring_geometry() {
        assert_eq!(slots(64 << 20), 16384);
        assert_eq!(slots(4095), 0);
        assert_eq!(slot_of(16385, 16384), 1);
        assert_eq!(slot_offset(3), 12288);
    }
}
