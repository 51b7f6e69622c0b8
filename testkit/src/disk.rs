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
    let mut rng = XorShift::new(0x9e37_79b9_7f4a_7c15);
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..data_mib {
        rng.fill(&mut chunk);
        let offset = size / 2 + i * (2 << 20);
        if offset + (1 << 20) <= size {
            file.write_all_at(&chunk, offset)?;
        }
    }
    Ok(())
}

/// The images' pseudo-random data: xorshift64, fast in a debug build and the same for a seed
/// on every run (not for anything that needs unpredictability).
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed`, which must not be 0 (xorshift stays at 0 forever).
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Fills `buf` with the next words, little-endian (a last partial word is cut short).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            word.copy_from_slice(&self.next_u64().to_le_bytes()[..word.len()]);
        }
    }
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
