//! `ferry migrate` keeps the memory it frees (`ferry::tunnel::keep_freed_memory`): its relays
//! seal every TLS record into a buffer of its own, and without the setting glibc handed each
//! freed batch back to the kernel and faulted it in again for the next (BENCHMARKS.md, session
//! 13). A binary of its own: the check reads the process's resident memory, which other tests
//! running beside it would move.

/// A TLS record's buffer: 16 KiB of plaintext, its header and tag.
const RECORD: usize = 16 * 1024 + 5 + 17;
/// How much a burst allocates: more than glibc's default thresholds, less than the setting's.
const BURST: usize = 16 << 20;

/// This process's resident memory, bytes. Allocates nothing: a small allocation made after the
/// burst would sit between it and the heap's free top, and keep glibc from trimming anything.
fn resident() -> u64 {
    use std::io::Read;
    let mut buf = [0u8; 256];
    let n = std::fs::File::open("/proc/self/statm")
        .and_then(|mut f| f.read(&mut buf))
        .expect("/proc/self/statm");
    let pages: u64 = std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|s| s.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

/// On a new thread (which gets a heap of its own, as the relays' threads do), allocates and
/// fills [`BURST`] bytes in record-sized buffers and frees them all. Returns how much the
/// process grew for them, and how much of that it still holds once they are freed.
fn burst() -> (u64, u64) {
    std::thread::spawn(|| {
        let before = resident();
        let mut records = Vec::with_capacity(BURST / RECORD);
        for i in 0..BURST / RECORD {
            records.push(vec![(i % 251) as u8 + 1; RECORD]);
        }
        let grown = resident().saturating_sub(before);
        drop(records);
        (grown, resident().saturating_sub(before))
    })
    .join()
    .expect("burst thread")
}

#[test]
fn freed_record_buffers_stay_with_the_process() {
    // glibc's defaults first: the freed burst goes back to the kernel. Were it kept anyway,
    // this test could not tell the setting's effect.
    let (grown, held) = burst();
    assert!(
        grown >= BURST as u64 * 3 / 4,
        "the burst grew the process by {grown} bytes"
    );
    assert!(
        held < grown / 4,
        "glibc's defaults kept {held} of {grown} bytes: the control failed, so the setting cannot be checked"
    );

    ferry::tunnel::keep_freed_memory();
    let (grown, held) = burst();
    assert!(
        grown >= BURST as u64 * 3 / 4,
        "the burst grew the process by {grown} bytes"
    );
    assert!(
        held >= grown * 3 / 4,
        "with the setting only {held} of {grown} bytes stayed: freed record buffers go back to the kernel"
    );
}
