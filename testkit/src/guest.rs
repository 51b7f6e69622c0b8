//! ferry's test guest, seen from the host: find its kernel and initrd, boot it under QEMU with
//! some disks, follow its acknowledgements on the serial console, and prove afterwards that every
//! acknowledged write is in the disk images.
//!
//! The guest (built by `vm-images/build`, see `vm-images/init`) runs one workload per virtio disk
//! that writes numbered, checksummed 4 KiB records round a ring on the raw device and prints
//! `ferry-ack vda 1234` only after the record is durable. The record layout and the console lines
//! are defined once, in the `ferry-guest-workload` crate, re-exported here as [`workload`].
//!
//! ```text
//!  host                                     guest (QEMU, TCG)
//!  launch() ── qemu -kernel -initrd ──────► /init: insmod virtio, "ferry-ready vda vdb"
//!                                           workload /dev/vda: write rec n, fdatasync,
//!  serial.log ◄─────────── "ferry-ack vda n" ┘ then ack; n+1 ...
//!  Acks::feed(serial.log) → acked seqs per disk
//!  (QEMU killed or migrated away)
//!  verify_disk(image, acked) → every acked record present, or the first one missing
//! ```
//!
//! Used by the integration tests, the benchmarks and `ferry demo`; never by a real migration. Nothing here
//! may hide a lost write: the verifier fails on the first acknowledged record it cannot find.

mod acks;
mod images;
mod launch;
mod verify;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::str::FromStr;
use std::time::Duration;

pub use acks::{Acks, DiskAcks};
pub use ferry_guest_workload as workload;
pub use images::GuestImages;
pub use launch::{launch, wait_for_acks, DiskSpec, GuestSpec, RunningGuest, DEFAULT_QEMU};
pub use verify::{verify_disk, Found, VerifyReport};

/// The image formats the test guest's disks can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// A plain file, byte for byte the guest's disk.
    Raw,
    /// A qcow2 image (read through `qemu-img` when verifying).
    Qcow2,
}

impl ImageFormat {
    /// The QEMU block driver name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ImageFormat {
    type Err = GuestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Self::Raw),
            "qcow2" => Ok(Self::Qcow2),
            other => Err(GuestError::UnknownFormat(other.to_owned())),
        }
    }
}

/// What went wrong with the test guest, from finding its files to verifying its disks.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// No kernel and initrd in any of the places searched.
    #[error("the test guest is not built (looked for vmlinuz and initrd.img in {}): run scripts/setup", list(.tried))]
    ImagesMissing { tried: Vec<PathBuf> },
    /// `FERRY_GUEST_DIR` names a directory without the guest's files.
    #[error("FERRY_GUEST_DIR={} holds no vmlinuz and initrd.img: run scripts/setup, or unset the variable", .dir.display())]
    ImagesNotInGuestDir { dir: PathBuf },
    /// A format name other than `raw` or `qcow2`.
    #[error("unknown image format {0:?}: the test guest's disks are raw or qcow2")]
    UnknownFormat(String),
    /// A disk id QEMU or the guest cannot carry.
    #[error("disk id {id:?} is not usable: {reason}")]
    BadDiskId { id: String, reason: &'static str },
    /// A path QEMU's command line cannot carry.
    #[error("path {} is not UTF-8: QEMU's option syntax needs text", .path.display())]
    PathNotUtf8 { path: PathBuf },
    /// A file or directory operation failed.
    #[error("cannot {what} {}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be started at all.
    #[error("cannot start {}: is qemu-system-x86 installed? (scripts/setup installs it)", .qemu.display())]
    Spawn {
        qemu: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited while we were waiting on it.
    #[error("QEMU exited ({status}) {during}; its stderr ends with: {stderr}; its console ends with: {console}")]
    QemuExited {
        status: ExitStatus,
        during: &'static str,
        stderr: String,
        console: String,
    },
    /// QEMU did not create its QMP socket in time.
    #[error("QEMU did not open its QMP socket {} within {waited:?}", .path.display())]
    QmpSocketTimeout { path: PathBuf, waited: Duration },
    /// Fewer acknowledgements than asked for arrived in time.
    #[error("disk {disk}: {got} of {wanted} acknowledgements after {waited:?} in {}; the console ends with: {console}", .serial_log.display())]
    AckTimeout {
        disk: String,
        wanted: usize,
        got: usize,
        waited: Duration,
        serial_log: PathBuf,
        console: String,
    },
    /// The guest's workload printed `ferry-error` for a disk and stopped writing to it.
    #[error("the guest's workload stopped on disk {disk}: {message}")]
    WorkloadFailed { disk: String, message: String },
    /// `qemu-img` could not be run, or failed, while reading an image.
    #[error("cannot read {} through qemu-img: {detail}", .image.display())]
    QemuImg { image: PathBuf, detail: String },
    /// The image has no room for even one record slot.
    #[error("{} is {bytes} bytes: too small to hold the workload's records", .image.display())]
    ImageTooSmall { image: PathBuf, bytes: u64 },
    /// An acknowledged record is not in the image: the write was lost.
    #[error(
        "disk {disk}: acknowledged record {seq} is missing from {} (slot {slot} holds {found}){}",
        .image.display(),
        more_missing(*.also_missing)
    )]
    RecordMissing {
        disk: String,
        image: PathBuf,
        /// The lowest acknowledged sequence number that is missing.
        seq: u64,
        slot: u64,
        found: Found,
        /// How many other acknowledged records (one per slot) are missing too.
        also_missing: usize,
    },
}

fn list(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

fn more_missing(n: usize) -> String {
    match n {
        0 => String::new(),
        n => format!("; {n} more acknowledged records are missing"),
    }
}
