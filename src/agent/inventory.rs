//! What `ferry status` shows: the migrations in a storage directory, read from the directories
//! themselves (journal, `migration.json`, pid file, images), never from the agent's memory.
//!
//! One code path serves both ways of asking: the agent answers a `Status` request with it, and
//! `ferry status --storage DIR` runs it on the host with the agent stopped (the agent may be
//! down precisely when an operator wants to know what it left). Reading changes nothing.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::received::read_pid;
use super::storage::{allocated_bytes, MigrationDir, Phase};
use crate::vm::VmDescription;

/// The file beside the journal describing the migration (written once, when it is admitted).
pub const INFO_NAME: &str = "migration.json";

/// The most migrations one status answer lists (newest first): the answer must fit a control
/// frame however long the agent has been running.
pub const MAX_LISTED: usize = 1000;

/// What a migration is, as recorded when it was admitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// The guest's name (`-name`), when it has one.
    pub vm: Option<String>,
    /// The disks: name and size.
    pub disks: Vec<DiskInfo>,
    /// When the migration was admitted, in seconds since the epoch.
    pub created_unix: u64,
    /// Bytes of free space reserved for it (see [`super::space`]).
    pub reserved: u64,
}

/// One disk of a migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The disk's name (its image is `disk-NAME.raw`).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes its image holds on this host (what has arrived); 0 in `migration.json`.
    #[serde(default)]
    pub received: u64,
}

impl MigrationInfo {
    /// The record of `vm` admitted now with `reserved` bytes.
    pub fn new(vm: &VmDescription, reserved: u64) -> MigrationInfo {
        MigrationInfo {
            vm: vm.name(),
            disks: vm
                .disks
                .iter()
                .map(|d| DiskInfo {
                    name: d.name.clone(),
                    size: d.size,
                    received: 0,
                })
                .collect(),
            created_unix: now_unix(),
            reserved,
        }
    }

    /// Writes it durably into the migration's directory.
    pub fn write(&self, dir: &MigrationDir) -> std::io::Result<()> {
        crate::journal::write(&dir.path.join(INFO_NAME), self)
    }

    /// Reads it back; `None` for a directory an older agent made, or a damaged file.
    pub fn read(dir: &MigrationDir) -> Option<MigrationInfo> {
        crate::journal::read(&dir.path.join(INFO_NAME))
            .ok()
            .flatten()
    }
}

/// One migration as `ferry status` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationSummary {
    /// The migration id (its directory's name).
    pub id: String,
    /// The journaled phase.
    pub phase: Phase,
    /// The guest's name, if known.
    pub vm: Option<String>,
    /// The disks, with what has arrived of each.
    pub disks: Vec<DiskInfo>,
    /// Bytes arrived over all disks (what the images hold on this host).
    pub received: u64,
    /// The disks' total size.
    pub size: u64,
    /// Seconds since the migration was admitted (from the directory's age for older ones).
    pub age_secs: u64,
    /// The destination QEMU's pid, while it runs.
    pub pid: Option<u32>,
    /// Bytes of free space reserved for it at admission.
    pub reserved: u64,
}

/// The migrations under `storage`, newest first, at most [`MAX_LISTED`]; also how many more
/// there are.
pub fn collect(storage: &Path) -> (Vec<MigrationSummary>, usize) {
    let Ok(entries) = std::fs::read_dir(storage) else {
        return (Vec::new(), 0);
    };
    let mut all: Vec<MigrationSummary> = entries
        .flatten()
        .filter_map(|e| MigrationDir::open(storage, &e.file_name().to_string_lossy()))
        .filter_map(|dir| summarize(&dir))
        .collect();
    all.sort_by(|a, b| a.age_secs.cmp(&b.age_secs).then(a.id.cmp(&b.id)));
    let more = all.len().saturating_sub(MAX_LISTED);
    all.truncate(MAX_LISTED);
    (all, more)
}

/// One directory's summary; `None` when it holds no readable journal (not a migration).
pub fn summarize(dir: &MigrationDir) -> Option<MigrationSummary> {
    let record = dir.read_record()?;
    let info = MigrationInfo::read(dir);
    let created = info.as_ref().map(|i| i.created_unix).unwrap_or_else(|| {
        std::fs::metadata(&dir.path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs())
    });
    let disks: Vec<DiskInfo> = match &info {
        Some(info) => info
            .disks
            .iter()
            .map(|d| DiskInfo {
                received: allocated_bytes(&[dir.image_path(&d.name)]),
                ..d.clone()
            })
            .collect(),
        None => dir
            .images()
            .iter()
            .map(|p| DiskInfo {
                name: p
                    .file_stem()
                    .map(|s| s.to_string_lossy().trim_start_matches("disk-").to_string())
                    .unwrap_or_default(),
                size: std::fs::metadata(p).map_or(0, |m| m.len()),
                received: allocated_bytes([p]),
            })
            .collect(),
    };
    Some(MigrationSummary {
        id: dir.id.clone(),
        phase: record.phase,
        vm: info.as_ref().and_then(|i| i.vm.clone()),
        received: disks.iter().map(|d| d.received).sum(),
        size: disks.iter().map(|d| d.size).sum(),
        disks,
        age_secs: now_unix().saturating_sub(created),
        pid: read_pid(&dir.path).filter(|pid| super::destination::is_ours(*pid, &dir.path)),
        reserved: info.map_or(0, |i| i.reserved),
    })
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::DiskDescription;

    #[test]
    fn a_migration_directory_is_summarized_from_its_files() {
        let storage = tempfile::tempdir().expect("tempdir");
        let dir = MigrationDir::create(storage.path(), true).expect("create");
        let vm = VmDescription {
            argv: vec!["qemu".into(), "-name".into(), "guest=web".into()],
            machine: None,
            running: true,
            disks: vec![DiskDescription {
                name: "vda".into(),
                node_name: "vda".into(),
                device: String::new(),
                file: "/x".into(),
                format: "raw".into(),
                size: 64 << 20,
                allocated: None,
                read_only: false,
            }],
        };
        MigrationInfo::new(&vm, 64 << 20).write(&dir).expect("info");
        let image = dir.create_image("vda", 64 << 20).expect("image");
        std::fs::write(&image, vec![7u8; 1 << 20]).expect("data");
        std::fs::create_dir(storage.path().join("not-a-migration")).expect("mkdir");

        let (list, more) = collect(storage.path());
        assert_eq!((list.len(), more), (1, 0));
        let m = &list[0];
        assert_eq!(
            (m.id.as_str(), m.phase),
            (dir.id.as_str(), Phase::Receiving)
        );
        assert_eq!(m.vm.as_deref(), Some("web"));
        assert_eq!((m.disks[0].name.as_str(), m.size), ("vda", 64 << 20));
        assert!(m.received >= 1 << 20, "{}", m.received);
        assert_eq!((m.pid, m.reserved), (None, 64 << 20));
        assert!(m.age_secs < 60);
    }
}
