//! Small state files that must survive a crash of the process or the host: written to a
//! temporary file, `fsync`ed, renamed over the old one, and the directory `fsync`ed, so that after
//! any crash the file holds the old or the new content, never a torn one, and a rename that was
//! reported done is not lost with the page cache.
//!
//! Both ends of a migration journal their phase this way *before* acting on it (see
//! `docs/protocol.md`): a process that replaces a dead one trusts the file, not a guess.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

/// Writes `value` as JSON to `path`, atomically and durably.
pub fn write<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let body = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let dir = path.parent().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "journal path has no directory")
    })?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut file = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(&body)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Reads a journal written by [`write`]; `Ok(None)` when there is none.
pub fn read<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(body) => serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes a journal (and makes the removal durable); a missing one is fine.
pub fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_replace_and_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        assert_eq!(read::<Vec<u32>>(&path).expect("read"), None);
        write(&path, &vec![1u32, 2]).expect("write");
        write(&path, &vec![3u32]).expect("replace");
        assert_eq!(read::<Vec<u32>>(&path).expect("read"), Some(vec![3]));
        assert!(!dir.path().join("state.json.tmp").exists());
        std::fs::write(&path, b"{torn").expect("corrupt");
        assert!(
            read::<Vec<u32>>(&path).is_err(),
            "a corrupt journal is an error, not nothing"
        );
        remove(&path).expect("remove");
        remove(&path).expect("remove twice");
        assert_eq!(read::<Vec<u32>>(&path).expect("read"), None);
    }
}
