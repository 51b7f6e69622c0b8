//! Proving that every acknowledged record reached a disk image.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_guest_workload::record::{self, RecordError, RECORD_SIZE};

use super::{GuestError, ImageFormat};

/// What a slot held instead of the record that should be there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A valid record of this disk, but older than the acknowledged one.
    Older(u64),
    /// A valid record written by another disk.
    OtherDisk { disk: String, seq: u64 },
    /// Not a valid record.
    Invalid(RecordError),
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Older(seq) => write!(f, "the older record {seq}"),
            Self::OtherDisk { disk, seq } => write!(f, "record {seq} of disk {disk}"),
            Self::Invalid(e) => write!(f, "{e}"),
        }
    }
}

/// A disk image that holds every acknowledged record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The guest's name for the disk.
    pub disk: String,
    /// Slots in the image's ring.
    pub slots: u64,
    /// Acknowledged records given.
    pub acked: usize,
    /// Slots read: one per slot an acknowledged record maps to (where only the newest counts).
    pub checked_slots: usize,
    /// The highest acknowledged sequence number, if any.
    pub highest_acked: Option<u64>,
    /// The highest sequence number found in the checked slots (may exceed `highest_acked` by
    /// writes that completed but whose ack never reached the console).
    pub highest_found: Option<u64>,
}

/// Checks that `image` (the guest's disk `disk`, e.g. `vda`) holds every record in `acked`: for
/// each slot, the record there must be valid, belong to `disk`, and be at least as new as the
/// newest acknowledged record that maps to that slot (older ones were legitimately overwritten).
///
/// A qcow2 image is read through `qemu-img convert -U` into a temporary raw file next to it, so
/// the writer should be stopped first. The error names the lowest missing sequence number.
pub fn verify_disk(
    image: &Path,
    format: ImageFormat,
    disk: &str,
    acked: &[u64],
) -> Result<VerifyReport, GuestError> {
    let raw = match format {
        ImageFormat::Raw => RawImage::Borrowed(image.to_owned()),
        ImageFormat::Qcow2 => RawImage::Converted(TempRaw::convert(image, format)?),
    };
    let path = raw.path();
    let io = |what| {
        move |source| GuestError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    };
    let file = File::open(path).map_err(io("open the image"))?;
    let bytes = file.metadata().map_err(io("stat the image"))?.len();
    let slots = record::slots(bytes);
    if slots == 0 {
        return Err(GuestError::ImageTooSmall {
            image: image.to_owned(),
            bytes,
        });
    }

    // Per slot, only the newest acknowledged record can still be there.
    let mut newest: HashMap<u64, u64> = HashMap::new();
    for &seq in acked {
        let want = newest.entry(record::slot_of(seq, slots)).or_insert(seq);
        *want = (*want).max(seq);
    }
    let mut wanted: Vec<(u64, u64)> = newest.into_iter().map(|(slot, seq)| (seq, slot)).collect();
    wanted.sort_unstable();

    let mut buf = vec![0u8; RECORD_SIZE];
    let mut highest_found = None;
    let mut missing: Vec<(u64, u64, Found)> = Vec::new();
    for &(seq, slot) in &wanted {
        file.read_exact_at(&mut buf, record::slot_offset(slot))
            .map_err(io("read the image"))?;
        let found = match record::decode(&buf) {
            Ok(r) if r.disk != disk => Some(Found::OtherDisk {
                disk: r.disk,
                seq: r.seq,
            }),
            Ok(r) => {
                highest_found = highest_found.max(Some(r.seq));
                (r.seq < seq).then_some(Found::Older(r.seq))
            }
            Err(e) => Some(Found::Invalid(e)),
        };
        if let Some(found) = found {
            missing.push((seq, slot, found));
        }
    }
    if let Some((seq, slot, found)) = missing.first().cloned() {
        return Err(GuestError::RecordMissing {
            disk: disk.to_owned(),
            image: image.to_owned(),
            seq,
            slot,
            found,
            also_missing: missing.len() - 1,
        });
    }
    Ok(VerifyReport {
        disk: disk.to_owned(),
        slots,
        acked: acked.len(),
        checked_slots: wanted.len(),
        highest_acked: acked.iter().copied().max(),
        highest_found,
    })
}

enum RawImage {
    Borrowed(PathBuf),
    Converted(TempRaw),
}

impl RawImage {
    fn path(&self) -> &Path {
        match self {
            Self::Borrowed(p) => p,
            Self::Converted(t) => &t.0,
        }
    }
}

/// A raw copy of an image, deleted on drop. Placed next to the image: that file system had room
/// for the image, and the copy is sparse.
struct TempRaw(PathBuf);

impl TempRaw {
    fn convert(image: &Path, format: ImageFormat) -> Result<Self, GuestError> {
        let name = image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = image.parent().unwrap_or(Path::new("."));
        let temp = Self(dir.join(format!(".{name}.verify-{}-{nanos}.raw", std::process::id())));
        // -U: the image may still be open (and locked) by a stopped or paused QEMU.
        let out = Command::new("qemu-img")
            .args(["convert", "-U", "-f", format.as_str(), "-O", "raw"])
            .arg(image)
            .arg(&temp.0)
            .output()
            .map_err(|e| GuestError::QemuImg {
                image: image.to_owned(),
                detail: format!(
                    "cannot run qemu-img ({e}): install qemu-utils (scripts/setup does)"
                ),
            })?;
        if !out.status.success() {
            return Err(GuestError::QemuImg {
                image: image.to_owned(),
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(temp)
    }
}

impl Drop for TempRaw {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "cannot remove a temporary raw image");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOTS: u64 = 16;

    /// A raw image of SLOTS slots holding records `seqs` of `disk`, written in order.
    fn image(
        dir: &Path,
        disk: &str,
        seqs: impl IntoIterator<Item = u64>,
    ) -> std::io::Result<PathBuf> {
        let path = dir.join(format!("{disk}.raw"));
        let file = File::create(&path)?;
        file.set_len(SLOTS * RECORD_SIZE as u64)?;
        let mut buf = [0u8; RECORD_SIZE];
        for seq in seqs {
            record::encode(seq, disk, &mut buf).map_err(std::io::Error::other)?;
            file.write_all_at(&buf, record::slot_offset(record::slot_of(seq, SLOTS)))?;
        }
        Ok(path)
    }

    fn missing(err: GuestError) -> (u64, u64, Found, usize) {
        match err {
            GuestError::RecordMissing {
                seq,
                slot,
                found,
                also_missing,
                ..
            } => (seq, slot, found, also_missing),
            other => panic!("expected RecordMissing, got {other}"),
        }
    }

    #[test]
    fn a_complete_image_verifies_after_wrapping() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        // 40 records round a ring of 16: slots hold 33..40 and 17..32 overwritten by nothing.
        let path = image(dir.path(), "vda", 1..=40)?;
        let acked: Vec<u64> = (1..=39).collect();
        let report = verify_disk(&path, ImageFormat::Raw, "vda", &acked)?;
        assert_eq!(report.slots, SLOTS);
        assert_eq!(report.acked, 39);
        assert_eq!(report.checked_slots, 16);
        assert_eq!(report.highest_acked, Some(39));
        assert_eq!(report.highest_found, Some(40));
        Ok(())
    }

    #[test]
    fn a_lost_write_is_named() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        // Record 21 (slot 5) never arrived: slot 5 still holds record 5.
        let path = image(dir.path(), "vda", (1..=30).filter(|&s| s != 21))?;
        let acked: Vec<u64> = (1..=30).collect();
        let err =
            verify_disk(&path, ImageFormat::Raw, "vda", &acked).expect_err("record 21 is lost");
        assert_eq!(
            err.to_string(),
            format!(
                "disk vda: acknowledged record 21 is missing from {} (slot 5 holds the older record 5)",
                path.display()
            )
        );
        Ok(())
    }

    #[test]
    fn a_corrupted_record_is_named_with_the_other_losses() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let path = image(dir.path(), "vda", 1..=10)?;
        let file = std::fs::OpenOptions::new().write(true).open(&path)?;
        file.write_all_at(b"X", record::slot_offset(4) + 1000)?; // payload of record 4
        file.write_all_at(&[0u8; RECORD_SIZE], record::slot_offset(7))?; // record 7 gone
        let acked: Vec<u64> = (1..=10).collect();
        let (seq, slot, found, also) =
            missing(verify_disk(&path, ImageFormat::Raw, "vda", &acked).expect_err("corrupt"));
        assert_eq!((seq, slot, also), (4, 4, 1));
        assert!(
            matches!(found, Found::Invalid(RecordError::BadChecksum { .. })),
            "{found:?}"
        );
        Ok(())
    }

    #[test]
    fn records_of_another_disk_do_not_count() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = image(dir.path(), "vdb", 1..=3)?;
        let (seq, _, found, _) = missing(
            verify_disk(&path, ImageFormat::Raw, "vda", &[1, 2, 3]).expect_err("wrong disk"),
        );
        assert_eq!(
            (seq, found),
            (
                1,
                Found::OtherDisk {
                    disk: "vdb".into(),
                    seq: 1
                }
            )
        );
        Ok(())
    }

    #[test]
    fn nothing_acked_checks_nothing() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = image(dir.path(), "vda", [])?;
        let report = verify_disk(&path, ImageFormat::Raw, "vda", &[])?;
        assert_eq!((report.checked_slots, report.highest_found), (0, None));
        let (seq, _, found, _) =
            missing(verify_disk(&path, ImageFormat::Raw, "vda", &[1]).expect_err("blank"));
        assert_eq!((seq, found), (1, Found::Invalid(RecordError::Blank)));
        Ok(())
    }

    #[test]
    fn qcow2_images_are_read_through_qemu_img() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let raw = image(dir.path(), "vdb", 1..=20)?;
        let qcow2 = dir.path().join("vdb.qcow2");
        let status = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow2)
            .status()?;
        assert!(status.success(), "qemu-img convert to qcow2: {status}");
        let acked: Vec<u64> = (1..=20).collect();
        let report = verify_disk(&qcow2, ImageFormat::Qcow2, "vdb", &acked)?;
        assert_eq!((report.slots, report.highest_found), (SLOTS, Some(20)));
        // Reading the qcow2 file as if it were raw finds no records: the format matters.
        assert!(verify_disk(&qcow2, ImageFormat::Raw, "vdb", &acked).is_err());
        // The temporary raw copy is gone.
        let names: Vec<_> = std::fs::read_dir(dir.path())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        assert_eq!(names.len(), 2, "{names:?}");
        Ok(())
    }
}
