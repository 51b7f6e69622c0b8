//! The test guest as the end-to-end tests use it: the usual one-disk setup, booting on given
//! disks until every disk acknowledges writes, and proofs that it is alive or gone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_testkit::{DiskSpec, GuestImages, GuestSpec, ImageFormat, RunningGuest};
use serde_json::Value;

use crate::agent::{token_file, AgentProc};
use crate::Ferry;

/// The usual end-to-end setup: a temporary directory, a token file in it, a raw disk `vda` of
/// `size` bytes with `data_mib` MiB of data, and the test guest booted on it writing `rate`
/// records a second (0: as fast as it can).
pub struct OneDisk {
    pub tmp: tempfile::TempDir,
    pub token: PathBuf,
    pub image: PathBuf,
    pub guest: RunningGuest,
}

impl OneDisk {
    /// Boots on the system's QEMU.
    pub async fn boot(token: &str, size: u64, data_mib: u64, rate: u32) -> OneDisk {
        OneDisk::boot_with(
            token,
            size,
            data_mib,
            rate,
            Path::new(ferry_testkit::DEFAULT_QEMU),
        )
        .await
    }

    /// Boots on `qemu`.
    pub async fn boot_with(
        token: &str,
        size: u64,
        data_mib: u64,
        rate: u32,
        qemu: &Path,
    ) -> OneDisk {
        let tmp = tempfile::tempdir().expect("tempdir");
        let token = token_file(tmp.path(), token);
        let image = tmp.path().join("vda.raw");
        raw_image(&image, size, data_mib);
        let guest = boot_with(
            &tmp.path().join("src"),
            vec![disk(&image, ImageFormat::Raw, "vda")],
            rate,
            qemu,
        )
        .await;
        OneDisk {
            tmp,
            token,
            image,
            guest,
        }
    }

    /// Where the agent's storage goes.
    pub fn storage(&self) -> PathBuf {
        self.tmp.path().join("storage")
    }

    /// An agent on localhost with this setup's storage and token, plus `extra` flags.
    pub fn agent(&self, ferry: Ferry, extra: &[&str]) -> AgentProc {
        ferry.agent(&self.storage(), &self.token, extra)
    }
}

/// A sparse raw image with `data_mib` MiB of pseudo-random data from the middle of the disk on
/// (see [`ferry_testkit::disk::raw_image`]).
pub fn raw_image(path: &Path, size: u64, data_mib: u64) {
    ferry_testkit::disk::raw_image(path, size, data_mib).expect("create raw image");
}

pub fn qcow2_image(path: &Path, size: u64) {
    ferry_testkit::disk::qcow2_image(path, size).expect("create qcow2 image");
}

/// Boots the test guest on the given disks and waits until each disk has acknowledged writes.
pub async fn boot(dir: &Path, disks: Vec<DiskSpec>, rate: u32) -> RunningGuest {
    boot_with(dir, disks, rate, Path::new(ferry_testkit::DEFAULT_QEMU)).await
}

/// [`boot`] with a given QEMU binary.
pub async fn boot_with(dir: &Path, disks: Vec<DiskSpec>, rate: u32, qemu: &Path) -> RunningGuest {
    let mut spec = GuestSpec::new(guest_images());
    spec.rate = rate;
    for d in disks {
        spec = spec.disk(d);
    }
    boot_spec(dir, &spec, qemu).await
}

pub fn guest_images() -> GuestImages {
    GuestImages::locate().expect("test guest images (run scripts/setup)")
}

/// Boots `spec` and waits until each of its disks (`vda`, `vdb`, ...) has acknowledged writes.
pub async fn boot_spec(dir: &Path, spec: &GuestSpec, qemu: &Path) -> RunningGuest {
    let mut guest = ferry_testkit::launch(dir, spec, qemu)
        .await
        .expect("launch guest");
    let names = (0..spec.disks.len()).map(|i| format!("vd{}", (b'a' + i as u8) as char));
    for name in names {
        guest
            .wait_for_acks(&name, 10, Duration::from_secs(90))
            .await
            .expect("guest acknowledges writes");
    }
    guest
}

pub fn disk(path: &Path, format: ImageFormat, id: &str) -> DiskSpec {
    DiskSpec::new(path, format, id)
}

/// Waits until QEMU has exited (the source quits after a migration).
pub fn wait_exit(guest: &mut RunningGuest, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if matches!(guest.try_wait(), Ok(Some(_))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Proves the guest is still alive on `serial` by waiting for `more` new acks on `disk`.
pub async fn still_acking(serial: &Path, disk: &str, more: usize) {
    let now = ferry_testkit::Acks::parse(&std::fs::read_to_string(serial).unwrap_or_default())
        .count(disk);
    ferry_testkit::wait_for_acks(serial, disk, now + more, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("guest stopped acknowledging on {}: {e}", serial.display()));
}

/// Asks a QEMU to quit over QMP and waits (up to 20 s) until the process is gone, so that its
/// images are closed before anyone reads them.
pub async fn quit(qmp_path: &Path) {
    let q = qmp::Qmp::connect_unix(qmp_path)
        .await
        .unwrap_or_else(|e| panic!("QMP {}: {e}", qmp_path.display()));
    let pid = q.peer_pid().expect("QEMU's pid");
    let _ = q.execute_raw("quit", Value::Null).await;
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, s)| s.starts_with('Z'))
        })
    };
    let start = Instant::now();
    while !gone() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "QEMU {pid} did not quit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
