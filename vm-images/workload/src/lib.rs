//! The contract between ferry's test guest and the host that checks it.
//!
//! The guest's workload writes fixed-size, sequence-numbered, checksummed records to a raw block
//! device, makes each one durable, and only then announces it on the serial console. The host
//! reads the console (which writes the guest saw complete) and later the disk image (what actually
//! arrived) and proves that every announced record is there. Both sides use this crate, so the
//! layout and the console lines cannot drift apart.
//!
//! - [`record`]: the 4 KiB on-disk record and where a sequence number lives on the disk.
//! - [`console`]: the lines printed on the serial console (`ferry-ack vda 1234`, ...).
//! - [`crc32`]: the checksum (IEEE CRC-32), written here to keep the guest binary dependency-free.
//!
//! This crate must stay free of dependencies and of I/O: it is linked into a static binary that
//! runs as the guest's only program, and into ferry itself.

pub mod console;
pub mod crc32;
pub mod record;
