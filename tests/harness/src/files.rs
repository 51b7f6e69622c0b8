//! Files and tools the tests check with: sparse images, random data, allocation, and external
//! programs (`cmp`, `qemu-img`, `nbdcopy`, ...) run to success or to failure.

use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use rand::{Rng, SeedableRng};

pub const MIB: u64 = 1 << 20;

pub fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
}

/// Writes `chunks` random 1 MiB chunks at distinct 1 MiB-aligned offsets of a `size` image
/// (offsets deterministic for `seed`, contents random). Returns the offsets written.
pub fn random_chunks(path: &Path, size: u64, chunks: usize, seed: u64) -> Vec<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image");
    let slots = size / MIB;
    let mut offsets = Vec::new();
    while offsets.len() < chunks {
        let at = rng.gen_range(0..slots) * MIB;
        if !offsets.contains(&at) {
            offsets.push(at);
        }
    }
    // The kernel's generator: fast even in a debug build, unlike a Rust RNG.
    let mut urandom = std::fs::File::open("/dev/urandom").expect("open /dev/urandom");
    let mut buf = vec![0u8; MIB as usize];
    for &at in &offsets {
        urandom.read_exact(&mut buf).expect("read /dev/urandom");
        f.write_all_at(&buf, at).expect("write chunk");
    }
    f.sync_all().expect("sync image");
    offsets.sort_unstable();
    offsets
}

/// Bytes actually allocated to a file (`st_blocks` × 512).
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .blocks()
        * 512
}

/// Runs a tool, fails the test with its output if it fails, returns its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (scripts/setup installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a tool; returns whether it succeeded and what it printed (stdout, then stderr).
pub fn run_output(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (scripts/setup installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs a tool that must fail; returns what it printed (stdout and stderr).
pub fn run_fails(program: &str, args: &[&str]) -> String {
    let (ok, text) = run_output(program, args);
    assert!(!ok, "{program} {args:?} succeeded but must fail:\n{text}");
    text
}

/// Files equal byte for byte, by `cmp`.
pub fn assert_same_bytes(a: &Path, b: &Path) {
    let a = a.to_str().expect("utf-8 path");
    let b = b.to_str().expect("utf-8 path");
    run("cmp", &[a, b]);
}
