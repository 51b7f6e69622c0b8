//! One mirror run: a `-M none` QEMU mirrors the source image (`blockdev-mirror sync=full`, the
//! target an nbd node with `discard`/`detect-zeroes: unmap`, exactly as `ferry migrate` sets it
//! up) into a server, timed to BLOCK_JOB_READY, then completed without pivot and checked. The
//! `ferry-tls` row goes the way `ferry migrate` does it: QEMU's node on the unix socket of
//! ferry's NBD relay (`ferry::tunnel`, run in this process), which does STARTTLS and TLS with
//! the server; the other servers' TLS rows give QEMU `tls-creds` and `tls-hostname` (a client
//! `tls-creds-x509` object), as a QEMU-only setup would.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::image;
use crate::servers::{self, Target, TlsDirs, EXPORT};

/// What one mirror into one server measured.
#[derive(Debug, Clone)]
pub struct MirrorRun {
    /// Seconds from `blockdev-mirror` to BLOCK_JOB_READY.
    pub ready_s: f64,
    /// Seconds of the final flush: `block-job-cancel` to the node removed.
    pub flush_s: f64,
    /// Seconds from `blockdev-mirror` until the server stopped and an `fdatasync` of the
    /// destination returned: the copy is on disk.
    pub durable_s: f64,
    /// Server CPU seconds over the whole copy: from `blockdev-mirror` until the nbd node is
    /// removed (its final flush returned). Not just up to READY: a server that leaves its
    /// writeback to that last flush does part of its disk work after READY, while one that
    /// starts writeback early has done it all before; counting to the end charges both for
    /// the same work.
    pub cpu_s: f64,
    /// The source side's CPU seconds over the same time: the source QEMU's (its one main-loop
    /// thread reads, sends and, with QEMU's TLS, encrypts everything, so this is often what
    /// bounds the mirror), plus ferry's relay for `ferry-tls` (this process).
    pub source_cpu_s: f64,
    /// Bytes the destination allocates after the server stopped.
    pub allocated: u64,
    /// Whether source and destination hold the same bytes.
    pub identical: bool,
}

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How a mirror run is done.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Compare every byte afterwards.
    pub verify: bool,
    /// The mirror's `buf-size` (QEMU's default: 16 MiB, in requests of 1 MiB; a larger buffer
    /// also makes the requests larger, `buf-size / 16`).
    pub buf_size: Option<u64>,
}

/// Mirrors `source` into a fresh sparse `dest` served by `target` (TLS targets with the
/// credentials in `tls`).
pub async fn run(
    target: Target,
    tls: Option<&TlsDirs>,
    ferry: &servers::FerryCmd,
    source: &Path,
    dest: &Path,
    dir: &Path,
    opts: Options,
) -> Result<MirrorRun> {
    let size = std::fs::metadata(source)?.len();
    let _ = std::fs::remove_file(dest);
    std::fs::File::create(dest)?.set_len(size)?;
    image::warm(source)?;
    let srv = servers::start(target, tls, ferry, dest, dir).await?;
    // ferry's TLS row: QEMU plaintext to the relay, the relay TLS to the server.
    let relay = target.tls && target.server == servers::Server::Ferry;
    let tls = if target.tls && !relay { tls } else { None };

    let sock = dir.join("mirror-qmp.sock");
    let _ = std::fs::remove_file(&sock);
    let src = source.to_str().context("paths must be UTF-8")?;
    let mut qemu = servers::bare_qemu(&sock);
    qemu.arg("-blockdev").arg(format!(
        "driver=raw,node-name=src,file.driver=file,file.filename={src}"
    ));
    if let Some(tls) = tls {
        qemu.arg("-object").arg(tls.qemu_object("client")?);
    }
    let qemu = Qemu(
        qemu.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start the source QEMU")?,
    );
    let qmp = servers::connect_qmp(&sock).await?;
    let mut _tunnel = None;
    let server = if relay {
        let bundle = servers::TlsDirs::ensure(dir)?.client_bundle()?;
        let tunnel_dir = dir.join("tunnel");
        std::fs::create_dir_all(&tunnel_dir)?;
        let mut tunnel = ferry::tunnel::Tunnel::new(&tunnel_dir, &bundle, "127.0.0.1")?;
        let path = tunnel.nbd(srv.port)?;
        _tunnel = Some(tunnel);
        json!({"type": "unix", "path": path.to_str().context("paths must be UTF-8")?})
    } else {
        json!({"type": "inet", "host": "127.0.0.1", "port": srv.port.to_string()})
    };
    let mut node = json!({"driver": "nbd", "node-name": "dst", "export": EXPORT,
           "server": server, "discard": "unmap", "detect-zeroes": "unmap"});
    if tls.is_some() {
        node["tls-creds"] = json!("tls0");
        node["tls-hostname"] = json!(ferry::tls::migration::TLS_HOSTNAME);
    }
    qmp.execute_raw("blockdev-add", node)
        .await
        .context("blockdev-add nbd")?;
    let mut events = qmp.events();
    let cpu0 = srv.cpu_seconds()?;
    let source_cpu0 = servers::cpu_seconds(qemu.0.id())?
        + if relay {
            servers::cpu_seconds(std::process::id())?
        } else {
            0.0
        };
    let t0 = Instant::now();
    let mut mirror_args = json!({"job-id": "m", "device": "src", "target": "dst", "sync": "full"});
    if let Some(bytes) = opts.buf_size {
        mirror_args["buf-size"] = json!(bytes);
    }
    qmp.execute_raw("blockdev-mirror", mirror_args)
        .await
        .context("blockdev-mirror")?;
    wait_job(&mut events, "BLOCK_JOB_READY", Duration::from_secs(900)).await?;
    let ready_s = t0.elapsed().as_secs_f64();
    let source_cpu_s = servers::cpu_seconds(qemu.0.id())?
        + if relay {
            servers::cpu_seconds(std::process::id())?
        } else {
            0.0
        }
        - source_cpu0;
    let t1 = Instant::now();
    qmp.execute_raw("block-job-cancel", json!({"device": "m"}))
        .await?;
    wait_job(&mut events, "BLOCK_JOB_COMPLETED", Duration::from_secs(300)).await?;
    qmp.execute_raw("blockdev-del", json!({"node-name": "dst"}))
        .await?;
    let flush_s = t1.elapsed().as_secs_f64();
    let cpu_s = srv.cpu_seconds()? - cpu0;
    let _ = qmp.execute_raw("quit", Value::Null).await;
    srv.stop().await?;
    std::fs::File::options()
        .write(true)
        .open(dest)?
        .sync_data()?;
    let durable_s = t0.elapsed().as_secs_f64();
    let allocated = image::allocated(dest)?;
    let identical = if opts.verify {
        image::identical(source, dest)?
    } else {
        true
    };
    let _ = std::fs::remove_file(dest);
    Ok(MirrorRun {
        ready_s,
        flush_s,
        durable_s,
        cpu_s,
        source_cpu_s,
        allocated,
        identical,
    })
}

/// Waits for a block job event, failing on BLOCK_JOB_ERROR.
pub async fn wait_job(events: &mut qmp::Events, name: &str, timeout: Duration) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .with_context(|| format!("no {name} within {timeout:?}"))??;
        if event.name == name {
            return Ok(event.data);
        }
        if event.name == "BLOCK_JOB_ERROR" {
            bail!("mirror failed: {}", event.data);
        }
    }
}
