//! The guest-visible gap: a poller thread tails the source's and the destination's console logs
//! every millisecond and stamps each `ferry-ack` line with the host time it appeared. The guest's
//! own clock cannot measure this: under TCG the guest's time stands still while the VM is stopped.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_testkit::workload::console::{self, Line};

const POLL: Duration = Duration::from_millis(1);

struct Tail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

/// Watches console logs for acks of one disk.
pub struct AckWatch {
    files: Arc<Mutex<Vec<PathBuf>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<BTreeMap<u64, Instant>>>,
}

impl AckWatch {
    /// Starts watching `first` for acks of `disk`.
    pub fn start(first: PathBuf, disk: &str) -> Self {
        let files = Arc::new(Mutex::new(vec![first]));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s, disk) = (files.clone(), stop.clone(), disk.to_owned());
        let thread = std::thread::spawn(move || poll(&f, &s, &disk));
        AckWatch {
            files,
            stop,
            thread: Some(thread),
        }
    }

    /// Adds another log (the destination's, once its path is known).
    pub fn add(&self, path: PathBuf) {
        if let Ok(mut files) = self.files.lock() {
            files.push(path);
        }
    }

    /// Stops and returns each ack's sequence number with the time it was first seen.
    pub fn finish(mut self) -> Acks {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        Acks { seen }
    }
}

impl Drop for AckWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn poll(files: &Mutex<Vec<PathBuf>>, stop: &AtomicBool, disk: &str) -> BTreeMap<u64, Instant> {
    let mut tails: Vec<Tail> = Vec::new();
    let mut seen = BTreeMap::new();
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(files) = files.lock() {
            for path in files.iter().skip(tails.len()) {
                tails.push(Tail {
                    path: path.clone(),
                    offset: 0,
                    partial: Vec::new(),
                });
            }
        }
        let now = Instant::now();
        for tail in &mut tails {
            let Ok(mut file) = File::open(&tail.path) else {
                continue;
            };
            buf.clear();
            if file.seek(SeekFrom::Start(tail.offset)).is_err()
                || file.read_to_end(&mut buf).is_err()
            {
                continue;
            }
            tail.offset += buf.len() as u64;
            tail.partial.extend_from_slice(&buf);
            while let Some(end) = tail.partial.iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&tail.partial[..end]).into_owned();
                tail.partial.drain(..=end);
                if let Some(Line::Ack { disk: d, seq }) = console::parse(&line) {
                    if d == disk {
                        seen.entry(seq).or_insert(now);
                    }
                }
            }
            if tail.partial.len() > 4096 {
                tail.partial.clear();
            }
        }
        std::thread::sleep(POLL);
    }
    seen
}

/// Acks with the host time each was first seen.
pub struct Acks {
    seen: BTreeMap<u64, Instant>,
}

impl Acks {
    /// How many acks were seen.
    pub fn count(&self) -> usize {
        self.seen.len()
    }

    /// Gaps between consecutive acks (by sequence number), with the time the gap started.
    fn gaps(&self) -> impl Iterator<Item = (Instant, Instant)> + '_ {
        self.seen
            .values()
            .zip(self.seen.values().skip(1))
            .map(|(a, b)| (*a, *b))
    }

    /// The longest gap (ms) that overlaps `[from, to]`.
    pub fn max_gap_ms(&self, from: Instant, to: Instant) -> Option<f64> {
        self.gaps()
            .filter(|(a, b)| *b >= from && *a <= to)
            .map(|(a, b)| b.saturating_duration_since(a).as_secs_f64() * 1000.0)
            .reduce(f64::max)
    }

    /// The median gap (ms) of the acks seen before `before`: the guest's normal rhythm.
    pub fn median_gap_ms(&self, before: Instant) -> Option<f64> {
        let mut gaps: Vec<f64> = self
            .gaps()
            .filter(|(_, b)| *b < before)
            .map(|(a, b)| b.saturating_duration_since(a).as_secs_f64() * 1000.0)
            .collect();
        crate::median(&mut gaps)
    }
}
