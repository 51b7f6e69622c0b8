//! The agent's storage directory: one subdirectory per migration holding its images, the
//! destination QEMU's sockets and files, and a `journal.json`.
//!
//! The journal is what lets a restarted agent tell a half-finished migration (kill its QEMU,
//! remove the directory) from a destination waiting for the source's verdict (keep it paused)
//! and from a VM that now lives here (leave it alone). It is written durably (see
//! [`crate::journal`]) before the agent acts on the phase it names.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::vm::safe_name;

/// Where a migration stands, as recorded on disk.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Images created and served; no destination QEMU. Nothing here matters yet: a restarted
    /// agent removes it.
    Receiving,
    /// The destination QEMU was started (paused, `-incoming defer`): it waits for the RAM and for
    /// the source's verdict. Kept while its QEMU lives; never started without a verdict.
    Started,
    /// The source's QEMU completed, the source said so, and the images are durable: `cont` is
    /// about to be, or was, issued. The guest may have run here: never removed. (A destination
    /// found dead in `Started` never ran, so the source may take the VM back.)
    Resuming,
    /// The VM lives here (running, or kept paused as it was on the source). Never removed.
    Running,
}

impl Phase {
    /// The phase's name, as journaled and as `ferry status` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Receiving => "receiving",
            Phase::Started => "started",
            Phase::Resuming => "resuming",
            Phase::Running => "running",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The journal of one migration directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// Where the migration stands.
    pub phase: Phase,
    /// Whether the guest is to run after the hand-over (it ran on the source).
    pub resume: bool,
}

/// A storage failure, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
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

/// Bytes available to the agent in `dir`'s file system.
pub fn free_space(dir: &Path) -> Result<u64, StorageError> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| StorageError::Io {
        what: "cannot read free space of",
        path: dir.display().to_string(),
        source: e.into(),
    })?;
    Ok(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

/// The file name of a disk's image in a migration directory (`disk-vda.raw`): the one place it
/// is made, so the agent, its restart and `ferry demo` agree.
pub fn image_file_name(disk_name: &str) -> String {
    format!("disk-{}.raw", safe_name(disk_name))
}

/// One migration's directory.
#[derive(Debug, Clone)]
pub struct MigrationDir {
    /// The migration id (the directory's name).
    pub id: String,
    /// The directory.
    pub path: PathBuf,
}

impl MigrationDir {
    /// Creates a fresh, uniquely named directory under `storage`, journaled as `Receiving`.
    pub fn create(storage: &Path, resume: bool) -> Result<MigrationDir, StorageError> {
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
        dir.record(Record {
            phase: Phase::Receiving,
            resume,
        })?;
        Ok(dir)
    }

    /// The image path for a disk.
    pub fn image_path(&self, disk_name: &str) -> PathBuf {
        self.path.join(image_file_name(disk_name))
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

    /// An existing migration directory (a restarted agent, a recovering source's `Resolve`).
    pub fn open(storage: &Path, id: &str) -> Option<MigrationDir> {
        // The id comes from the network on `Resolve`: only a name this agent could have made.
        let valid = id.len() <= 64
            && id.starts_with('m')
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let path = storage.join(id);
        (valid && path.is_dir()).then(|| MigrationDir {
            id: id.to_string(),
            path,
        })
    }

    /// Journals the migration's state durably: a crash leaves the old or the new record.
    /// Every phase change goes through here, so this is where it is logged: one line per
    /// change, with the migration id and the phase as fields (journald keeps them apart).
    pub fn record(&self, record: Record) -> Result<(), StorageError> {
        let path = self.journal_path();
        crate::journal::write(&path, &record).map_err(io_err("cannot write journal", &path))?;
        tracing::info!(migration = %self.id, phase = record.phase.as_str(), "phase");
        Ok(())
    }

    /// The journaled state; `None` for a directory without a readable journal.
    pub fn read_record(&self) -> Option<Record> {
        crate::journal::read(&self.journal_path()).ok().flatten()
    }

    fn journal_path(&self) -> PathBuf {
        self.path.join(crate::vm::argv::JOURNAL_NAME)
    }

    /// The images of this migration, in name order (what a restarted agent flushes and reports).
    pub fn images(&self) -> Vec<PathBuf> {
        let mut images: Vec<PathBuf> = fs::read_dir(&self.path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("disk-") && n.ends_with(".raw"))
            })
            .collect();
        images.sort();
        images
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

/// Drops the images' clean pages from the page cache (`POSIX_FADV_DONTNEED`), on the blocking
/// pool. The destination QEMU does this itself when `cont` activates an image it opened
/// without `O_DIRECT` (QEMU's file driver flushes and then drops the whole file's cache, so
/// that it reads what another process wrote): for an image whose data the NBD server wrote
/// through the page cache, that walk over hundreds of MiB of cached pages lands in the guest's
/// pause. Done here, after a flush made those pages clean, it happens while the RAM streams
/// and leaves QEMU's own pass only the pages written since.
pub async fn drop_cached(paths: Vec<PathBuf>) -> Result<(), StorageError> {
    let work = tokio::task::spawn_blocking(move || {
        for path in &paths {
            let file = File::open(path).map_err(io_err("cannot open", path))?;
            nix::fcntl::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .map_err(|e| io_err("cannot drop the page cache of", path)(e.into()))?;
        }
        Ok(())
    });
    match work.await {
        Ok(result) => result,
        Err(e) => Err(StorageError::Io {
            what: "page cache task failed for",
            path: String::new(),
            source: io::Error::other(e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_exact_size_and_sparse() {
        let storage = tempfile::tempdir().expect("tempdir");
        let dir = MigrationDir::create(storage.path(), true).expect("create");
        assert_eq!(dir.read_record().map(|r| r.phase), Some(Phase::Receiving));
        let image = dir.create_image("#block1", 10 << 30).expect("image");
        assert_eq!(fs::metadata(&image).expect("stat").len(), 10 << 30);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path), 0o700, "directory private");
        assert_eq!(mode(&image), 0o600, "image private");
        assert!(allocated_bytes([&image]) < 1 << 20);
        assert_eq!(dir.images(), vec![image.clone()]);
        let running = Record {
            phase: Phase::Running,
            resume: true,
        };
        dir.record(running).expect("record");
        assert_eq!(dir.read_record(), Some(running));
        let again = MigrationDir::open(storage.path(), &dir.id).expect("open by id");
        assert_eq!(again.read_record(), Some(running));
        assert!(MigrationDir::open(storage.path(), "../etc").is_none());
        assert!(MigrationDir::open(storage.path(), "m-nonexistent").is_none());
        dir.remove().expect("remove");
        assert!(!dir.path.exists());
    }
}
