//! The agent's storage directory: one subdirectory per migration holding its images, the
//! destination QEMU's sockets and files, and a `phase` file.
//!
//! The `phase` file is what lets a restarted agent tell a half-finished migration (kill its QEMU,
//! remove the directory) from a VM that now lives here (leave it alone).

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::vm::{human_bytes, safe_name, VmDescription};

/// Room kept free beyond the disks' full size, for QEMU's own files and the file system.
const HEADROOM: u64 = 64 << 20;

/// Where a migration stands, as recorded on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Images created and served; no destination QEMU yet or not yet running the VM.
    Receiving,
    /// The destination QEMU runs the VM: its directory must be kept.
    Running,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Receiving => "receiving",
            Phase::Running => "running",
        }
    }
}

/// A storage failure, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Not enough space for the disks' full size.
    #[error(
        "destination has {free} free in {dir}, the disks need {needed} ({detail}): free space in \
         --storage or pick another host"
    )]
    NoSpace {
        /// Free space, human-readable.
        free: String,
        /// Needed space, human-readable.
        needed: String,
        /// Per-disk sizes.
        detail: String,
        /// The storage directory.
        dir: String,
    },
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// On which path.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// Refuses a VM whose disks do not fit in `dir` at their full size. The images are sparse, but a
/// guest may fill them: promising space that is not there would fail mid-migration instead.
pub fn preflight(dir: &Path, vm: &VmDescription) -> Result<(), StorageError> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| StorageError::Io {
        what: "cannot read free space of",
        path: dir.display().to_string(),
        source: e.into(),
    })?;
    let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    let needed = vm.total_disk_bytes();
    if free < needed.saturating_add(HEADROOM) {
        let detail = vm
            .disks
            .iter()
            .map(|d| format!("{} {}", d.name, human_bytes(d.size)))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(StorageError::NoSpace {
            free: human_bytes(free),
            needed: human_bytes(needed),
            detail,
            dir: dir.display().to_string(),
        });
    }
    Ok(())
}

/// One migration's directory.
#[derive(Debug)]
pub struct MigrationDir {
    /// The migration id (the directory's name).
    pub id: String,
    /// The directory.
    pub path: PathBuf,
}

impl MigrationDir {
    /// Creates a fresh, uniquely named directory under `storage`.
    pub fn create(storage: &Path) -> Result<MigrationDir, StorageError> {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let suffix: u32 = rand::random();
        let id = format!("m{secs}-{suffix:08x}");
        let path = storage.join(&id);
        // 0700 and images 0600: a VM's disks and sockets are nobody else's business on this host.
        std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
            .create(&path)
            .map_err(io_err("cannot create migration directory", &path))?;
        let dir = MigrationDir { id, path };
        dir.set_phase(Phase::Receiving)?;
        Ok(dir)
    }

    /// The image path for a disk.
    pub fn image_path(&self, disk_name: &str) -> PathBuf {
        self.path.join(format!("disk-{}.raw", safe_name(disk_name)))
    }

    /// Creates an exact-size sparse raw image: nothing is allocated until data arrives.
    pub fn create_image(&self, disk_name: &str, size: u64) -> Result<PathBuf, StorageError> {
        let path = self.image_path(disk_name);
        let file = std::os::unix::fs::OpenOptionsExt::mode(
            File::options().write(true).create_new(true),
            0o600,
        )
        .open(&path)
        .map_err(io_err("cannot create image", &path))?;
        file.set_len(size)
            .map_err(io_err("cannot size image", &path))?;
        Ok(path)
    }

    /// Records the phase (write to a temporary file, then rename: a crash leaves the old or the new
    /// phase, never a torn one).
    pub fn set_phase(&self, phase: Phase) -> Result<(), StorageError> {
        let tmp = self.path.join("phase.tmp");
        let dst = self.path.join("phase");
        fs::write(&tmp, phase.as_str()).map_err(io_err("cannot write", &tmp))?;
        fs::rename(&tmp, &dst).map_err(io_err("cannot write", &dst))
    }

    /// Removes the directory and everything in it.
    pub fn remove(&self) -> Result<(), StorageError> {
        fs::remove_dir_all(&self.path).map_err(io_err("cannot remove", &self.path))
    }
}

/// Bytes allocated on disk by the given files (what `du` would say).
pub fn allocated_bytes<'a>(paths: impl IntoIterator<Item = &'a PathBuf>) -> u64 {
    paths
        .into_iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// `fdatasync`s each file, on the blocking pool: the NBD server writes through its own file
/// descriptors, and a sync of any descriptor of the same file makes that data durable.
pub async fn sync_files(paths: Vec<PathBuf>) -> Result<(), StorageError> {
    let work = tokio::task::spawn_blocking(move || {
        for path in &paths {
            File::open(path)
                .and_then(|f| f.sync_data())
                .map_err(io_err("cannot flush", path))?;
        }
        Ok(())
    });
    match work.await {
        Ok(result) => result,
        Err(e) => Err(StorageError::Io {
            what: "flush task failed for",
            path: String::new(),
            source: io::Error::other(e),
        }),
    }
}

/// The phase recorded in a migration directory, if it has one.
pub fn read_phase(dir: &Path) -> Option<Phase> {
    match fs::read_to_string(dir.join("phase")).ok()?.trim() {
        "receiving" => Some(Phase::Receiving),
        "running" => Some(Phase::Running),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::DiskDescription;

    fn vm_with(size: u64) -> VmDescription {
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
                read_only: false,
            }],
        }
    }

    #[test]
    fn preflight_refuses_what_does_not_fit_and_says_how_much() {
        let dir = tempfile::tempdir().expect("tempdir");
        preflight(dir.path(), &vm_with(1 << 20)).expect("1 MiB fits");
        let err = preflight(dir.path(), &vm_with(1 << 60)).expect_err("1 EiB does not fit");
        let text = err.to_string();
        assert!(text.starts_with("destination has "), "{text}");
        assert!(
            text.contains("the disks need 1048576.0 TiB (vda 1048576.0 TiB)"),
            "{text}"
        );
    }

    #[test]
    fn images_are_exact_size_and_sparse() {
        let storage = tempfile::tempdir().expect("tempdir");
        let dir = MigrationDir::create(storage.path()).expect("create");
        assert_eq!(read_phase(&dir.path), Some(Phase::Receiving));
        let image = dir.create_image("#block1", 10 << 30).expect("image");
        assert_eq!(fs::metadata(&image).expect("stat").len(), 10 << 30);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path), 0o700, "directory private");
        assert_eq!(mode(&image), 0o600, "image private");
        assert!(allocated_bytes([&image]) < 1 << 20);
        dir.set_phase(Phase::Running).expect("phase");
        assert_eq!(read_phase(&dir.path), Some(Phase::Running));
        dir.remove().expect("remove");
        assert!(!dir.path.exists());
    }
}
