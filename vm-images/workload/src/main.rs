//! The test guest's workload: `workload [--rate N] [--fill MIB] DEVICE`, or
//! `workload --hold-memory MIB MARKER`.
//!
//! Writes records 1, 2, 3, ... (see [`ferry_guest_workload::record`]) round the ring of 4 KiB
//! slots on the raw block device DEVICE, `fdatasync`s each one and only then prints
//! `ferry-ack <disk> <seq>` on stdout (the serial console). `--rate` is records per second (0: as
//! fast as the disk allows); `--fill` first writes MIB MiB of incompressible data from offset 0 so
//! that there is something to copy.
//!
//! `--hold-memory` fills MIB MiB of anonymous memory with pseudo-random data, prints
//! `ferry-memfilled MIB`, creates the file MARKER (init waits for it before it starts the disk
//! workloads) and then holds the memory until the guest dies: a guest whose RAM is mostly
//! non-zero pages, so that a migration has to send all of it (zero pages cost QEMU nothing).
//!
//! If the disk already holds records (a reboot on a used disk), the run continues after the
//! highest sequence number found, so sequence numbers on one disk only ever grow.
//!
//! Any error ends the run with a `ferry-error` line: the host sees the heartbeat stop and why.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferry_guest_workload::console;
use ferry_guest_workload::record::{self, RECORD_SIZE};

const USAGE: &str = "usage: workload [--rate RECORDS_PER_SECOND] [--fill MIB] DEVICE\n       workload --hold-memory MIB MARKER";
const CHUNK: usize = 1 << 20;

struct Args {
    device: String,
    rate: u64,
    fill_mib: u64,
}

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().map(String::as_str) == Some("--hold-memory") {
        return hold_memory(argv.skip(1));
    }
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("workload: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let disk = Path::new(&args.device)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| args.device.clone());
    let mut out = match Console::open() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("workload: cannot use stdout: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&args, &disk, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            let _ = out.line(&console::error(&disk, &msg));
            ExitCode::FAILURE
        }
    }
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut device, mut rate, mut fill_mib) = (None, 50, 0);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--rate" | "--fill" => {
                let value = it.next().ok_or(format!("{arg} needs a value"))?;
                let n: u64 = value
                    .parse()
                    .map_err(|_| format!("{arg} {value}: not a number"))?;
                if arg == "--rate" {
                    rate = n;
                } else {
                    fill_mib = n;
                }
            }
            _ if arg.starts_with('-') => return Err(format!("unknown option {arg}")),
            _ if device.is_none() => device = Some(arg),
            _ => return Err(format!("unexpected argument {arg}")),
        }
    }
    let device = device.ok_or("no DEVICE given")?;
    Ok(Args {
        device,
        rate,
        fill_mib,
    })
}

fn run(args: &Args, disk: &str, out: &mut Console) -> Result<(), String> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args.device)
        .map_err(|e| format!("cannot open {}: {e}", args.device))?;
    let size = (&dev)
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("cannot size {}: {e}", args.device))?;
    let slots = record::slots(size);
    if slots < 2 {
        return Err(format!(
            "{} is {size} bytes: too small for a ring of records",
            args.device
        ));
    }
    let first = highest_seq_on_disk(&dev, slots)?.map_or(1, |s| s + 1);
    if args.fill_mib > 0 {
        fill(&dev, size, args.fill_mib)?;
        out.line(&console::filled(disk, args.fill_mib))?;
    }
    let serial = std::fs::read_to_string(format!("/sys/block/{disk}/serial")).ok();
    let serial = serial.as_deref().map(str::trim).filter(|s| !s.is_empty());
    out.line(&console::start(disk, serial, slots, first))?;

    let interval = (args.rate > 0).then(|| Duration::from_nanos(1_000_000_000 / args.rate));
    let mut next = Instant::now();
    let mut buf = [0u8; RECORD_SIZE];
    for seq in first.. {
        record::encode(seq, disk, &mut buf)
            .map_err(|e| format!("cannot encode record {seq}: {e}"))?;
        let slot = record::slot_of(seq, slots);
        dev.write_all_at(&buf, record::slot_offset(slot))
            .map_err(|e| format!("cannot write record {seq} to slot {slot}: {e}"))?;
        dev.sync_data()
            .map_err(|e| format!("cannot flush record {seq}: {e}"))?;
        out.line(&console::ack(disk, seq))?;
        if let Some(interval) = interval {
            next += interval;
            let now = Instant::now();
            match next.checked_duration_since(now) {
                Some(wait) => std::thread::sleep(wait),
                // Far behind (the VM was paused, e.g. at switchover): don't burst to catch up.
                None if now - next > Duration::from_secs(1) => next = now,
                None => {}
            }
        }
    }
    Ok(())
}

/// The highest valid record on the disk, if the disk was written by an earlier run. Slot 1 holds
/// record 1 or a later one as soon as a run got going, so a fresh disk costs one read.
fn highest_seq_on_disk(dev: &File, slots: u64) -> Result<Option<u64>, String> {
    let mut block = [0u8; RECORD_SIZE];
    dev.read_exact_at(&mut block, record::slot_offset(1))
        .map_err(|e| format!("cannot read slot 1: {e}"))?;
    if record::decode(&block).is_err() {
        return Ok(None);
    }
    let mut best = None;
    let mut chunk = vec![0u8; CHUNK];
    let end = record::slot_offset(slots);
    let mut offset = 0;
    while offset < end {
        let len = (end - offset).min(CHUNK as u64) as usize;
        dev.read_exact_at(&mut chunk[..len], offset)
            .map_err(|e| format!("cannot read at byte {offset}: {e}"))?;
        for block in chunk[..len].chunks_exact(RECORD_SIZE) {
            if let Ok(r) = record::decode(block) {
                best = best.max(Some(r.seq));
            }
        }
        offset += len as u64;
    }
    Ok(best)
}

fn fill(dev: &File, size: u64, mib: u64) -> Result<(), String> {
    let end = size.min(mib.saturating_mul(1 << 20));
    let mut chunk = vec![0u8; CHUNK];
    let mut offset = 0;
    while offset < end {
        let len = (end - offset).min(CHUNK as u64) as usize;
        record::fill_payload(u64::MAX - offset, &mut chunk[..len]);
        dev.write_all_at(&chunk[..len], offset)
            .map_err(|e| format!("cannot fill at byte {offset}: {e}"))?;
        offset += len as u64;
    }
    dev.sync_data()
        .map_err(|e| format!("cannot flush the fill: {e}"))
}

/// `--hold-memory MIB MARKER`: see the module doc. Never returns once the memory is filled.
fn hold_memory(mut it: impl Iterator<Item = String>) -> ExitCode {
    let (Some(mib), Some(marker), None) = (it.next(), it.next(), it.next()) else {
        eprintln!("workload: --hold-memory needs MIB and MARKER\n{USAGE}");
        return ExitCode::from(2);
    };
    let Ok(mib) = mib.parse::<usize>() else {
        eprintln!("workload: --hold-memory {mib}: not a number\n{USAGE}");
        return ExitCode::from(2);
    };
    let mut out = match Console::open() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("workload: cannot use stdout: {e}");
            return ExitCode::FAILURE;
        }
    };
    // One pseudo-random MiB, copied into every other one: no page is zero, and a copy is
    // several times cheaper than generating under TCG (1.5 GiB took 45 s that way). Neither
    // QEMU nor ferry deduplicates pages, so a repeated MiB costs a migration as much as a
    // unique one.
    let mut pattern = vec![0u8; CHUNK];
    record::fill_payload(0x6d65_6d00, &mut pattern);
    // One allocation, so that with transparent huge pages (init turns them on) the kernel
    // faults it in 2 MiB at a time: the faults, not the copies, were most of the time.
    let mut held = vec![0u8; mib * CHUNK];
    for chunk in held.chunks_exact_mut(CHUNK) {
        chunk.copy_from_slice(&pattern);
    }
    let _ = out.line(&console::memfilled(mib as u64));
    if let Err(e) = std::fs::write(&marker, b"") {
        let _ = out.line(&console::error(
            "mem",
            &format!("cannot create {marker}: {e}"),
        ));
        return ExitCode::FAILURE;
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
        // Keeps the allocation alive for the optimizer as well as for the reader.
        std::hint::black_box(&held);
    }
}

/// stdout as a plain file: each line goes out in one `write`, so lines of workloads running on
/// several disks never interleave on the console.
struct Console(File);

impl Console {
    fn open() -> std::io::Result<Self> {
        Ok(Self(File::from(
            std::io::stdout().as_fd().try_clone_to_owned()?,
        )))
    }

    fn line(&mut self, line: &str) -> Result<(), String> {
        self.0
            .write_all(line.as_bytes())
            .map_err(|e| format!("cannot print on the console: {e}"))
    }
}
