//! Boots the real test guest (vm-images/out, built by scripts/setup) under QEMU/TCG with a raw and
//! a qcow2 disk, and checks the whole chain the migration tests rely on: the guest announces its
//! disks under the host's ids, acknowledges durable writes, and the verifier finds every
//! acknowledged record in the images — and names the one record we then corrupt.

use std::error::Error;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_testkit::workload::record;
use ferry_testkit::{
    launch, verify_disk, DiskSpec, GuestError, GuestImages, GuestSpec, ImageFormat,
};

use ferry_testkit::qemu::available_qemus;

const MIB: u64 = 1 << 20;
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn guest_acknowledges_writes_that_the_verifier_finds() -> Result<(), Box<dyn Error>> {
    for qemu in available_qemus() {
        eprintln!("QEMU {}:", qemu.name);
        boot_verify_corrupt(&qemu.program).await?;
    }
    Ok(())
}

async fn boot_verify_corrupt(qemu: &Path) -> Result<(), Box<dyn Error>> {
    let images = GuestImages::locate()?;
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("disk0.raw");
    File::create(&raw)?.set_len(64 * MIB)?;
    let qcow2 = dir.path().join("disk1.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow2)
        .arg("32M")
        .status()?;
    assert!(status.success(), "qemu-img create: {status}");

    let spec = GuestSpec::new(images)
        .disk(DiskSpec::new(&raw, ImageFormat::Raw, "disk0"))
        .disk(DiskSpec::new(&qcow2, ImageFormat::Qcow2, "disk1"));
    let started = Instant::now();
    let mut guest = launch(&dir.path().join("run"), &spec, qemu).await?;
    assert!(
        guest.qmp_socket().exists(),
        "launch returns once QMP listens"
    );
    guest.wait_for_acks("vda", 1, BOOT_TIMEOUT).await?;
    let first_ack = started.elapsed();
    guest.wait_for_acks("vda", 20, BOOT_TIMEOUT).await?;
    guest.wait_for_acks("vdb", 20, BOOT_TIMEOUT).await?;
    let status = guest.kill()?;
    assert!(
        !status.success(),
        "QEMU was killed, it did not exit on its own: {status}"
    );
    // Whatever reached the console before the kill counts.
    let acks = guest.acks()?.clone();
    eprintln!(
        "  first ack after {first_ack:?}; vda acked {}, vdb acked {} after {:?}",
        acks.count("vda"),
        acks.count("vdb"),
        started.elapsed()
    );

    assert_eq!(
        acks.ready(),
        Some(&["vda".to_owned(), "vdb".to_owned()][..])
    );
    assert_eq!(acks.disk_for_serial("disk0"), Some("vda"));
    assert_eq!(acks.disk_for_serial("disk1"), Some("vdb"));
    assert_eq!(
        acks.disk("vda").and_then(|d| d.slots),
        Some(64 * MIB / 4096)
    );
    assert_eq!(
        acks.disk("vdb").and_then(|d| d.slots),
        Some(32 * MIB / 4096)
    );
    assert!(acks.errors().is_empty(), "{:?}", acks.errors());
    for disk in ["vda", "vdb"] {
        let seqs = acks.seqs(disk);
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "{disk}: acks are 1, 2, 3, ... without gaps");
    }

    let vda = verify_disk(&raw, ImageFormat::Raw, "vda", acks.seqs("vda"))?;
    let vdb = verify_disk(&qcow2, ImageFormat::Qcow2, "vdb", acks.seqs("vdb"))?;
    for (report, disk) in [(&vda, "vda"), (&vdb, "vdb")] {
        assert_eq!(
            report.checked_slots,
            acks.count(disk),
            "{disk}: no wrap yet, one slot per ack"
        );
        assert!(report.highest_found >= report.highest_acked, "{report:?}");
    }
    // The images are not interchangeable: vdb's records are not vda's.
    assert!(verify_disk(&qcow2, ImageFormat::Qcow2, "vda", acks.seqs("vda")).is_err());

    // Corrupt one acknowledged record's payload in the raw image: the verifier must name it.
    let victim = acks.seqs("vda")[10];
    let offset = record::slot_offset(record::slot_of(victim, vda.slots)) + 1000;
    let file = OpenOptions::new().read(true).write(true).open(&raw)?;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset)?;
    file.write_all_at(&[byte[0] ^ 0xFF], offset)?;
    drop(file);
    let err =
        verify_disk(&raw, ImageFormat::Raw, "vda", acks.seqs("vda")).expect_err("corrupted record");
    assert!(
        matches!(err, GuestError::RecordMissing { seq, also_missing: 0, .. } if seq == victim),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "disk vda: acknowledged record {victim} is missing from "
        )),
        "{text}"
    );
    assert!(text.contains("a record with a bad checksum"), "{text}");
    Ok(())
}
