//! Whether the destination preallocates the guest's RAM (`--preallocate-ram`): the rule behind
//! its default, `auto`.
//!
//! Preallocating touches all of the guest's RAM on the destination before the RAM stream
//! starts, so the incoming side writes into memory that is already mapped and zeroed instead
//! of faulting each page in as it arrives: measured on a 2 GiB guest with 1.5 GiB in use, the
//! RAM stream ran about 3x faster and the guest's pause was shorter (BENCHMARKS.md). It is done
//! while the disks copy, but the source waits for it before it sends the RAM, so when the
//! mirror is shorter than the preallocation the difference is added to the migration (paired
//! runs with a 0.5 s mirror: 1.1 s slower in median). It also commits the guest's whole RAM on
//! the destination, used or not.
//!
//! So `auto` preallocates only when the disks' copy is expected to take at least twice as long
//! as the preallocation: then it is hidden behind the mirror even if it runs at half the
//! expected speed (it shares the CPU with the NBD server), and only the shorter RAM phase is
//! seen. The estimates are deliberately on the side of not preallocating: the mirror at
//! [`MIRROR_RATE`] (or the `--bandwidth` cap, if lower), the preallocation at
//! [`PREALLOC_RATE`].

use clap::ValueEnum;

/// When the destination preallocates the guest's RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum RamPrealloc {
    /// When the disks' copy is expected to take at least twice as long as the preallocation,
    /// which then costs no time.
    #[default]
    Auto,
    /// Always, even when the source then waits for it.
    Always,
    /// Never: the destination allocates the guest's RAM as the stream fills it.
    Never,
}

/// The fastest a mirror is expected to copy a disk, bytes per second: a local NVMe disk or a
/// 10 Gbit/s link. A faster mirror only makes `auto` preallocate less often than it could.
pub const MIRROR_RATE: u64 = 1 << 30;

/// The slowest a destination is expected to preallocate RAM, bytes per second: 2 GiB took
/// 2.6-4.4 s with two threads on a loaded 2-vCPU VM host, where the first touch of memory is
/// slow (BENCHMARKS.md); a host with more CPUs preallocates with more threads.
pub const PREALLOC_RATE: u64 = 512 << 20;

/// How much longer than the preallocation the mirror must be expected to take.
const MARGIN: f64 = 2.0;

/// What the rule looks at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// The guest's RAM, bytes.
    pub ram_bytes: u64,
    /// The data each disk's mirror copies (allocated bytes, or the size when unknown).
    pub disk_bytes: u64,
    /// The largest one disk copies.
    pub largest_disk_bytes: u64,
    /// The cap on each disk's copy (`--bandwidth`), bytes per second.
    pub mirror_speed: Option<u64>,
}

impl Estimate {
    /// Seconds the disks' copy is expected to take at best: all disks share [`MIRROR_RATE`],
    /// and each goes no faster than its cap.
    pub fn mirror_s(&self) -> f64 {
        let shared = self.disk_bytes as f64 / MIRROR_RATE as f64;
        let capped = match self.mirror_speed {
            Some(cap) if cap > 0 => self.largest_disk_bytes as f64 / cap as f64,
            _ => 0.0,
        };
        shared.max(capped)
    }

    /// Seconds the preallocation is expected to take at worst.
    pub fn prealloc_s(&self) -> f64 {
        self.ram_bytes as f64 / PREALLOC_RATE as f64
    }
}

impl RamPrealloc {
    /// Whether to preallocate; `estimate` is only needed (and only asked for) under `auto`,
    /// and `auto` without one does not preallocate.
    pub fn decide(self, estimate: Option<Estimate>) -> bool {
        match self {
            RamPrealloc::Always => true,
            RamPrealloc::Never => false,
            RamPrealloc::Auto => {
                estimate.is_some_and(|e| e.ram_bytes > 0 && e.mirror_s() >= MARGIN * e.prealloc_s())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn estimate(ram_bytes: u64, disks: &[u64], mirror_speed: Option<u64>) -> Estimate {
        Estimate {
            ram_bytes,
            disk_bytes: disks.iter().sum(),
            largest_disk_bytes: disks.iter().copied().max().unwrap_or(0),
            mirror_speed,
        }
    }

    #[test]
    fn auto_preallocates_only_behind_a_long_enough_mirror() {
        let auto = |e| RamPrealloc::Auto.decide(Some(e));
        // The bench's filled guest: 2 GiB of RAM (4 s to preallocate at worst), 128 MiB or
        // 512 MiB of disk data (well under a second): the wait would show.
        assert!(!auto(estimate(2 * GIB, &[128 * MIB], None)));
        assert!(!auto(estimate(2 * GIB, &[512 * MIB], None)));
        // The 256 MiB guest with 512 MiB of data: 0.5 s either way, not twice.
        assert!(!auto(estimate(256 * MIB, &[512 * MIB], None)));
        // 8 GiB of data for 2 GiB of RAM: 8 s of mirror against 4 s.
        assert!(auto(estimate(2 * GIB, &[8 * GIB], None)));
        assert!(
            auto(estimate(2 * GIB, &[4 * GIB, 4 * GIB], None)),
            "disks add up"
        );
        // A 64 GiB guest with a 100 GiB disk: 100 s of mirror, 128 s to preallocate.
        assert!(!auto(estimate(64 * GIB, &[100 * GIB], None)));
    }

    #[test]
    fn a_bandwidth_cap_lengthens_the_mirror() {
        let auto = |e| RamPrealloc::Auto.decide(Some(e));
        // 128 MiB at 12 MiB/s: 10.7 s against 4 s.
        assert!(auto(estimate(2 * GIB, &[128 * MIB], Some(12 * MIB))));
        // At 64 MiB/s: 2 s, not enough.
        assert!(!auto(estimate(2 * GIB, &[128 * MIB], Some(64 * MIB))));
        // The cap is per disk: two disks of 64 MiB at 12 MiB/s each take 5.3 s, not 10.7.
        assert!(!auto(estimate(
            2 * GIB,
            &[64 * MIB, 64 * MIB],
            Some(12 * MIB)
        )));
        assert_eq!(
            estimate(GIB, &[GIB], Some(0)).mirror_s(),
            1.0,
            "a zero cap is no cap"
        );
    }

    #[test]
    fn always_and_never_ignore_the_estimate_and_auto_needs_one() {
        let long = estimate(GIB, &[100 * GIB], None);
        assert!(RamPrealloc::Always.decide(None));
        assert!(RamPrealloc::Always.decide(Some(estimate(GIB, &[0], None))));
        assert!(!RamPrealloc::Never.decide(Some(long)));
        assert!(RamPrealloc::Auto.decide(Some(long)));
        assert!(
            !RamPrealloc::Auto.decide(None),
            "no estimate: no preallocation"
        );
        assert!(
            !RamPrealloc::Auto.decide(Some(estimate(0, &[100 * GIB], None))),
            "no RAM reported"
        );
    }
}
