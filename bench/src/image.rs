//! The images the benchmarks copy: sparse raw files with random data in scattered chunks, and
//! the checks run on what arrived (allocation, bytes identical).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use anyhow::{Context, Result};
use ferry_testkit::disk::XorShift;
use nix::unistd::{lseek, Whence};

/// Data is written in chunks this big, at chunk-aligned offsets.
pub const CHUNK: u64 = 4 << 20;

/// Creates `path` as a sparse file of `size` bytes holding `data` bytes of random data in
/// [`CHUNK`]s at pseudo-random (but reproducible) chunk slots, and syncs it.
pub fn create(path: &Path, size: u64, data: u64) -> Result<()> {
    let file = File::create(path).with_context(|| format!("create {}", path.display()))?;
    file.set_len(size)?;
    let slots = size / CHUNK;
    let wanted = (data / CHUNK).min(slots);
    let mut rng = XorShift::new(0x9e37_79b9_7f4a_7c15 ^ size ^ data);
    // Floyd's sampling: `wanted` distinct slots without a table of all slots.
    let mut chosen = std::collections::BTreeSet::new();
    for j in slots - wanted..slots {
        let t = rng.next_u64() % (j + 1);
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    let mut buf = vec![0u8; CHUNK as usize];
    for slot in chosen {
        rng.fill(&mut buf);
        file.write_all_at(&buf, slot * CHUNK)?;
    }
    file.sync_all()?;
    Ok(())
}

/// Creates `path` as a sparse file of `size` bytes holding `count` extents of `extent` bytes of
/// random data, spread evenly (extent `i` starts at `i * size / count`, rounded down to
/// [`CHUNK`]), and syncs it: the "few large extents" layout, where the mirror sends long runs of
/// large requests, against [`create`]'s many scattered chunks.
pub fn create_extents(path: &Path, size: u64, count: u64, extent: u64) -> Result<()> {
    anyhow::ensure!(
        count > 0 && count * extent <= size,
        "{count} extents of {extent} bytes do not fit in {size}"
    );
    let file = File::create(path).with_context(|| format!("create {}", path.display()))?;
    file.set_len(size)?;
    let mut rng = XorShift::new(0x5851_f42d_4c95_7f2d ^ size ^ extent);
    let mut buf = vec![0u8; CHUNK as usize];
    for i in 0..count {
        let start = (i * (size / count)) / CHUNK * CHUNK;
        let mut at = 0;
        while at < extent {
            let n = (extent - at).min(CHUNK) as usize;
            rng.fill(&mut buf[..n]);
            file.write_all_at(&buf[..n], start + at)?;
            at += n as u64;
        }
    }
    file.sync_all()?;
    Ok(())
}
/// Bytes the file occupies on disk.
pub fn allocated(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(meta.blocks() * 512)
}

/// Reads the whole file once so every run starts with the same (warm) page cache.
pub fn warm(path: &Path) -> Result<()> {
    let file = File::open(path)?;
    let mut buf = vec![0u8; CHUNK as usize];
    for (start, end) in extents(&file)? {
        let mut left = end - start;
        let mut at = start;
        while left > 0 {
            let n = left.min(CHUNK) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            at += n as u64;
            left -= n as u64;
        }
    }
    Ok(())
}

/// The data extents of a file (`SEEK_DATA`/`SEEK_HOLE`), as `(start, end)` byte ranges.
fn extents(file: &File) -> Result<Vec<(u64, u64)>> {
    let len = file.metadata()?.len();
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut at = 0i64;
    while (at as u64) < len {
        let start = match lseek(fd, at, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = lseek(fd, start, Whence::SeekHole)?;
        out.push((start as u64, end as u64));
        at = end;
    }
    Ok(out)
}

/// Whether two files hold the same bytes. Only the ranges where either file has data are read:
/// everywhere else both read as zeros.
pub fn identical(a: &Path, b: &Path) -> Result<bool> {
    let fa = File::open(a).with_context(|| format!("open {}", a.display()))?;
    let fb = File::open(b).with_context(|| format!("open {}", b.display()))?;
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let mut ranges = extents(&fa)?;
    ranges.extend(extents(&fb)?);
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    for (start, end) in merged {
        let mut at = start;
        while at < end {
            let n = (end - at).min(CHUNK) as usize;
            fa.read_exact_at(&mut ba[..n], at)?;
            fb.read_exact_at(&mut bb[..n], at)?;
            if ba[..n] != bb[..n] {
                return Ok(false);
            }
            at += n as u64;
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_sparse_and_comparable() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("ferry-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let a = dir.join("a.raw");
        let b = dir.join("b.raw");
        create(&a, 64 << 20, 16 << 20)?;
        let alloc = allocated(&a)?;
        assert!((16 << 20..=17 << 20).contains(&alloc), "{alloc}");
        std::fs::copy(&a, &b)?;
        assert!(identical(&a, &b)?);
        File::options()
            .write(true)
            .open(&b)?
            .write_all_at(b"x", 5)?;
        assert!(!identical(&a, &b)?, "one changed byte in a hole is seen");
        create_extents(&a, 64 << 20, 4, 4 << 20)?;
        let alloc = allocated(&a)?;
        assert!((16 << 20..=17 << 20).contains(&alloc), "{alloc}");
        let f = File::open(&a)?;
        assert_eq!(
            extents(&f)?,
            vec![
                (0, 4 << 20),
                (16 << 20, 20 << 20),
                (32 << 20, 36 << 20),
                (48 << 20, 52 << 20)
            ]
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
