//! Disk images for the test guest and the benchmarks: a sparse raw image holding some
//! pseudo-random data (so that a mirror carries both data and holes), or an empty qcow2.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

/// A sparse raw image of `size` bytes with `data_mib` MiB of pseudo-random data (xorshift), in
/// 1 MiB chunks every 2 MiB from the middle of the disk on (as many as fit).
pub fn raw_image(path: &Path, size: u64, data_mib: u64) -> io::Result<()> {
    let file = std::fs::File::create(path)?;
    file.set_len(size)?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..data_mib {
        for word in chunk.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        let offset = size / 2 + i * (2 << 20);
        if offset + (1 << 20) <= size {
            file.write_all_at(&chunk, offset)?;
        }
    }
    Ok(())
}

/// An empty qcow2 image of virtual size `size` (`qemu-img create`).
pub fn qcow2_image(path: &Path, size: u64) -> io::Result<()> {
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "qemu-img create {} failed: {status}",
            path.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn raw_images_are_sparse_with_data_from_the_middle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.raw");
        raw_image(&path, 64 << 20, 4).expect("image");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.len(), 64 << 20);
        assert!(meta.blocks() * 512 >= 4 << 20 && meta.blocks() * 512 < 8 << 20);
        let data = std::fs::read(&path).expect("read");
        assert!(data[..32 << 20].iter().all(|b| *b == 0));
        assert!(data[32 << 20..(32 << 20) + 4096].iter().any(|b| *b != 0));
    }
}
