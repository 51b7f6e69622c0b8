//! Free space in the storage directory, shared by the migrations in progress.
//!
//! Each migration reserves what its disks may still need before anything is created, and the
//! next one is admitted only if the file system's free space covers its own need plus every
//! reservation still outstanding: two migrations that each fit alone must not both be admitted
//! when they do not fit together, or both fail mid-copy. A reservation shrinks as its images
//! fill (what they allocated is already gone from the free space) and is released when its
//! migration ends, either way ([`Reservation`] is dropped with the migration). A restarted
//! agent re-reserves, without a check, what the migrations it resumes recorded
//! (`migration.json`, see [`super::inventory`]).
//!
//! What a migration needs depends on the operator's policy, `--space-check`:
//! - `full` (default): the disks' full size. The images are sparse, but the guest may fill them;
//!   promising space that is not there would fail mid-migration instead.
//! - `data`: the data the source reports allocated, plus [`data_margin`]. Thin storage is
//!   overcommitted on purpose, as libvirt does: a 100 GiB disk holding 256 MiB of data goes to a
//!   host with 68 GiB free. A source too old to report its data counts as full.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::human_bytes;
use crate::vm::VmDescription;

/// Room kept free beyond every reservation, for QEMU's own files and the file system.
pub const HEADROOM: u64 = 64 << 20;

/// How free space is judged (`ferry agent --space-check`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SpaceCheck {
    /// The disks' full size must fit.
    #[default]
    Full,
    /// The disks' allocated data plus a margin must fit (thin provisioning).
    Data,
}

/// The margin `--space-check data` adds to the data: what the guest may write while its disks
/// copy and the first minutes after, 1 GiB plus a tenth of the data.
pub fn data_margin(data: u64) -> u64 {
    (1u64 << 30).saturating_add(data / 10)
}

/// What `vm` needs under `check`, and the per-disk detail for messages.
pub fn needed(vm: &VmDescription, check: SpaceCheck) -> (u64, String) {
    let mut total = 0u64;
    let mut detail = Vec::new();
    for disk in &vm.disks {
        let need = match (check, disk.allocated) {
            (SpaceCheck::Data, Some(data)) => {
                detail.push(format!(
                    "{} {} of data in {}",
                    disk.name,
                    human_bytes(data),
                    human_bytes(disk.size)
                ));
                data.min(disk.size)
            }
            _ => {
                detail.push(format!("{} {}", disk.name, human_bytes(disk.size)));
                disk.size
            }
        };
        total = total.saturating_add(need);
    }
    if check == SpaceCheck::Data {
        let margin = data_margin(total);
        detail.push(format!("margin {}", human_bytes(margin)));
        total = total.saturating_add(margin);
    }
    (total, detail.join(", "))
}

/// Not enough room for a migration.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    /// The free space minus the other migrations' reservations does not cover this one.
    #[error(transparent)]
    NoSpace(Box<NoSpace>),
    /// `statvfs` failed.
    #[error("cannot read free space of {dir}")]
    Statvfs {
        /// The storage directory.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The numbers of a refusal for space.
#[derive(Debug, thiserror::Error)]
#[error(
    "destination has {free} free in {dir}{others}, the disks need {needed} ({detail}): {advice}"
)]
pub struct NoSpace {
    /// Free space, human-readable.
    free: String,
    /// ", of which N is reserved by M migrations in progress", or nothing.
    others: String,
    /// Needed space, human-readable.
    needed: String,
    /// Per-disk sizes.
    detail: String,
    /// The storage directory.
    dir: String,
    /// What the operator can do.
    advice: String,
}

struct Held {
    bytes: u64,
    images: Vec<PathBuf>,
}

impl Held {
    /// What is still to come: the reservation less what the images took already.
    fn outstanding(&self) -> u64 {
        self.bytes
            .saturating_sub(super::storage::allocated_bytes(&self.images))
    }
}

/// The reservations of the migrations in progress in one storage directory.
pub struct Ledger {
    storage: PathBuf,
    held: Mutex<(u64, HashMap<u64, Held>)>,
}

/// One migration's reservation, released on drop.
pub struct Reservation {
    ledger: Arc<Ledger>,
    key: u64,
    /// The bytes reserved.
    pub bytes: u64,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reservation({} bytes)", self.bytes)
    }
}

impl Ledger {
    /// An empty ledger for `storage`.
    pub fn new(storage: &Path) -> Arc<Ledger> {
        Arc::new(Ledger {
            storage: storage.to_path_buf(),
            held: Mutex::new((0, HashMap::new())),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<u64, Held>)> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes still reserved by the migrations in progress, and how many they are.
    pub fn outstanding(&self) -> (u64, usize) {
        let held = self.lock();
        let bytes = held.1.values().map(Held::outstanding).sum();
        (bytes, held.1.len())
    }

    /// Reserves what `vm` needs under `check`, or refuses with the numbers.
    pub fn reserve(
        self: &Arc<Self>,
        vm: &VmDescription,
        check: SpaceCheck,
    ) -> Result<Reservation, SpaceError> {
        // Under the lock from the free-space reading to the insert: two migrations admitted at
        // the same moment each see the other's reservation.
        let mut held = self.lock();
        let needed = self.admit(&held, vm, check)?;
        Ok(self.insert(&mut held, needed))
    }

    /// Whether `vm` would be admitted now, reserving nothing (`ferry migrate --dry-run`).
    pub fn check(&self, vm: &VmDescription, check: SpaceCheck) -> Result<(), SpaceError> {
        let held = self.lock();
        self.admit(&held, vm, check).map(|_| ())
    }

    /// The bytes `vm` needs if free space covers them on top of the reservations in `held`;
    /// otherwise the refusal with the numbers.
    fn admit(
        &self,
        held: &(u64, HashMap<u64, Held>),
        vm: &VmDescription,
        check: SpaceCheck,
    ) -> Result<u64, SpaceError> {
        let dir = self.storage.display().to_string();
        let (needed, detail) = needed(vm, check);
        let stat = nix::sys::statvfs::statvfs(&self.storage).map_err(|e| SpaceError::Statvfs {
            dir: dir.clone(),
            source: e.into(),
        })?;
        let free = (stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64);
        let reserved: u64 = held.1.values().map(Held::outstanding).sum();
        if free < needed.saturating_add(reserved).saturating_add(HEADROOM) {
            let (others, advice) = if held.1.is_empty() {
                (
                    String::new(),
                    "free space in --storage or pick another host",
                )
            } else {
                (
                    format!(
                        ", of which {} is reserved by {} migration(s) in progress",
                        human_bytes(reserved),
                        held.1.len()
                    ),
                    "retry once they finish, free space in --storage or pick another host",
                )
            };
            let advice =
                if check == SpaceCheck::Full && vm.disks.iter().any(|d| d.allocated.is_some()) {
                    format!(
                    "{advice} (an agent run with --space-check data counts only the disks' data)"
                )
                } else {
                    advice.to_string()
                };
            return Err(SpaceError::NoSpace(Box::new(NoSpace {
                free: human_bytes(free),
                others,
                needed: human_bytes(needed),
                detail,
                dir,
                advice,
            })));
        }
        Ok(needed)
    }

    /// Re-reserves `bytes` for a migration a previous agent admitted (no check: it is here).
    pub fn hold(self: &Arc<Self>, bytes: u64) -> Reservation {
        let mut held = self.lock();
        self.insert(&mut held, bytes)
    }

    fn insert(self: &Arc<Self>, held: &mut (u64, HashMap<u64, Held>), bytes: u64) -> Reservation {
        held.0 += 1;
        let key = held.0;
        held.1.insert(
            key,
            Held {
                bytes,
                images: Vec::new(),
            },
        );
        Reservation {
            ledger: self.clone(),
            key,
            bytes,
        }
    }
}

impl Reservation {
    /// The images this reservation fills: what they allocate no longer counts as reserved.
    pub fn track(&self, images: Vec<PathBuf>) {
        if let Some(held) = self.ledger.lock().1.get_mut(&self.key) {
            held.images = images;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.ledger.lock().1.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::DiskDescription;

    fn vm(size: u64, allocated: Option<u64>) -> VmDescription {
        VmDescription {
            running: true,
            argv: vec![],
            machine: None,
            disks: vec![DiskDescription {
                name: "vda".into(),
                node_name: "vda".into(),
                device: String::new(),
                file: "/x".into(),
                format: "raw".into(),
                size,
                allocated,
                read_only: false,
            }],
        }
    }

    fn free(dir: &Path) -> u64 {
        let stat = nix::sys::statvfs::statvfs(dir).expect("statvfs");
        stat.blocks_available() as u64 * stat.fragment_size() as u64
    }

    #[test]
    fn a_second_migration_sees_the_first_ones_reservation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::new(dir.path());
        let each = free(dir.path()) / 10 * 6;
        let first = ledger
            .reserve(&vm(each, None), SpaceCheck::Full)
            .expect("first fits");
        let err = ledger
            .reserve(&vm(each, None), SpaceCheck::Full)
            .expect_err("both do not fit");
        let text = err.to_string();
        assert!(
            text.contains("reserved by 1 migration(s) in progress"),
            "{text}"
        );
        assert!(text.contains("retry once they finish"), "{text}");
        drop(first);
        assert_eq!(ledger.outstanding(), (0, 0), "released with the migration");
        let _again = ledger
            .reserve(&vm(each, None), SpaceCheck::Full)
            .expect("fits once the first is gone");
    }

    #[test]
    fn data_policy_counts_allocated_data_and_a_margin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::new(dir.path());
        let sparse = vm(free(dir.path()) * 2, Some(1 << 20));
        let err = ledger
            .reserve(&sparse, SpaceCheck::Full)
            .expect_err("full size does not fit");
        assert!(err.to_string().contains("--space-check data"), "{err}");
        let held = ledger
            .reserve(&sparse, SpaceCheck::Data)
            .expect("data fits");
        assert_eq!(held.bytes, (1 << 20) + data_margin(1 << 20));
        // A source that does not report its data counts at full size.
        assert!(ledger
            .reserve(&vm(free(dir.path()) * 2, None), SpaceCheck::Data)
            .is_err());
    }

    #[test]
    fn what_the_images_hold_already_no_longer_counts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::new(dir.path());
        let held = ledger.hold(8 << 20);
        let image = dir.path().join("img");
        std::fs::write(&image, vec![1u8; 4 << 20]).expect("write");
        held.track(vec![image]);
        let (left, n) = ledger.outstanding();
        assert_eq!(n, 1);
        assert!(left <= 4 << 20, "{left}");
    }
}
