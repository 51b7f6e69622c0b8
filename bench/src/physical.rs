//! The machine's own limits, measured in the same run as the servers so the table shows how close
//! each gets: the disk's write speed (`dd` with `fdatasync`, as much as the mirror writes) and TCP
//! loopback throughput (one writer thread, one reader thread).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// MiB per second of one limit.
#[derive(Debug, Clone)]
pub struct Limit {
    /// Row key.
    pub name: &'static str,
    /// How it was measured.
    pub how: String,
    /// MiB/s.
    pub mib_s: f64,
}

fn dd(args: &[String]) -> Result<f64> {
    let started = Instant::now();
    let status = Command::new("dd")
        .args(args)
        .arg("status=none")
        .status()
        .context("run dd")?;
    if !status.success() {
        bail!("dd {args:?} failed: {status}");
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Writes `bytes` of zeros to a new file in `dir` and syncs it.
pub fn disk_write(dir: &Path, bytes: u64) -> Result<Limit> {
    let out = dir.join("dd-write.out");
    let count = bytes / (4 << 20);
    let secs = dd(&[
        "if=/dev/zero".into(),
        format!("of={}", out.display()),
        "bs=4M".into(),
        format!("count={count}"),
        "conv=fdatasync".into(),
    ])?;
    let _ = std::fs::remove_file(&out);
    Ok(Limit {
        name: "disk write",
        how: format!("dd if=/dev/zero bs=4M count={count} conv=fdatasync"),
        mib_s: (count * 4) as f64 / secs,
    })
}

/// Pushes `bytes` through a 127.0.0.1 TCP connection in 4 MiB writes.
pub fn loopback(bytes: u64) -> Result<Limit> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut sock, _) = listener.accept()?;
        let mut buf = vec![0u8; 4 << 20];
        let mut total = 0u64;
        loop {
            let n = sock.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let started = Instant::now();
    let mut sock = TcpStream::connect(addr)?;
    let buf = vec![0x5au8; 4 << 20];
    let mut sent = 0;
    while sent < bytes {
        sock.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    drop(sock);
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("loopback reader panicked"))??;
    let secs = started.elapsed().as_secs_f64();
    Ok(Limit {
        name: "tcp loopback",
        how: "one 127.0.0.1 TCP stream, 4 MiB writes".into(),
        mib_s: (got >> 20) as f64 / secs,
    })
}
