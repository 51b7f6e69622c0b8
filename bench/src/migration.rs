//! Whole migrations of the test guest on localhost: ferry end to end (`ferry agent` + `ferry
//! migrate --json`), and the same migration done with QEMU alone the way libvirt's
//! `--copy-storage-all` does it ([`native`](crate::native)). Both boot the same guest with the
//! same QEMU options from a copy of the same image.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_testkit::{self as guest, DiskSpec, GuestImages, GuestSpec, ImageFormat, RunningGuest};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::acks::AckWatch;
use crate::image;
use crate::link::Link;

/// What one migration measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationRun {
    /// `ferry` or `native`.
    pub flow: String,
    /// Whether the VM ended up running on the destination.
    pub completed: bool,
    /// Why not, if it did not.
    pub error: Option<String>,
    /// Wall time from the first step to the guest running on the destination (bench's clock).
    pub total_s: f64,
    /// Seconds from the start of the mirror to BLOCK_JOB_READY.
    pub mirror_ready_s: Option<f64>,
    /// QEMU's `downtime` figure.
    pub downtime_ms: Option<u64>,
    /// Source STOP to destination RESUME (QEMU event timestamps, same host clock).
    pub stop_to_resume_ms: Option<f64>,
    /// Longest gap between consecutive acks around the switchover, as seen on the consoles.
    pub ack_gap_ms: Option<f64>,
    /// The guest's normal gap between acks before the migration.
    pub ack_gap_normal_ms: Option<f64>,
    /// Acks seen over the run.
    pub acks: usize,
    /// Every ack seen is in the destination image.
    pub acks_verified: Option<bool>,
    /// ferry's own phase times (negotiation, mirror, ram, switchover).
    pub phases_ms: Option<Value>,
    /// The mirror was switched to write-blocking because it did not converge (ferry).
    pub write_blocking: bool,
    /// RAM bytes the migration sent (QEMU's `ram.transferred`).
    pub ram_bytes: Option<u64>,
    /// Disk data the mirror had to copy: the source image's allocation when the mirror started.
    pub disk_bytes: u64,
    /// Seconds the shaped link needs for the disk data and the RAM sent, at its rate: the
    /// floor no flow can beat on that link.
    pub link_limit_s: Option<f64>,
}

impl MigrationRun {
    /// Fills in [`link_limit_s`](Self::link_limit_s) once the RAM figure is known.
    pub fn set_link_limit(&mut self, link: Option<&Link>) {
        if let (Some(link), Some(ram)) = (link, self.ram_bytes) {
            self.link_limit_s = Some((self.disk_bytes + ram) as f64 / link.bytes_per_s());
        }
    }
}

/// The guest and disk both flows migrate.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Disk size.
    pub disk: u64,
    /// Random data in it.
    pub data: u64,
    /// Workload records per second (0: as fast as it can).
    pub rate: u32,
    /// Give up on the mirror after this long.
    pub mirror_timeout: Duration,
    /// Guest RAM.
    pub memory_mib: u32,
    /// MiB of the guest's RAM filled with non-zero data at boot (`ferry.memfill`).
    pub memfill_mib: u64,
}

impl Setup {
    /// The default test guest (256 MiB of RAM, mostly zero pages) on a `disk`-byte disk with
    /// `data` bytes of random data, writing `rate` records a second.
    pub fn guest(disk: u64, data: u64, rate: u32, mirror_timeout_s: u64) -> Setup {
        Setup {
            disk,
            data,
            rate,
            mirror_timeout: Duration::from_secs(mirror_timeout_s),
            memory_mib: 256,
            memfill_mib: 0,
        }
    }

    /// A guest with 2 GiB of RAM, 1.5 GiB of it filled with non-zero data at boot: the RAM a
    /// migration really has to send (a zero page costs QEMU a flag).
    pub fn filled(disk: u64, data: u64) -> Setup {
        Setup {
            memory_mib: 2048,
            memfill_mib: 1536,
            ..Setup::guest(disk, data, 100, 300)
        }
    }
}

/// A booted source guest and the spec it was booted with.
pub struct Source {
    pub guest: RunningGuest,
    pub spec: GuestSpec,
}

/// Boots the test guest on a fresh image in `dir`, and waits until it acknowledges writes.
pub async fn boot_source(dir: &Path, setup: &Setup) -> Result<Source> {
    std::fs::create_dir_all(dir)?;
    let image = dir.join("vda.raw");
    image::create(&image, setup.disk, setup.data)?;
    let images = GuestImages::locate()?;
    let mut spec =
        GuestSpec::new(images).disk(DiskSpec::new(image.clone(), ImageFormat::Raw, "vda"));
    spec.rate = setup.rate;
    spec.memory_mib = setup.memory_mib;
    if setup.memfill_mib > 0 {
        spec.extra_kernel_args
            .push(format!("ferry.memfill={}", setup.memfill_mib));
    }
    let mut guest = guest::launch(&dir.join("src"), &spec, Path::new(guest::DEFAULT_QEMU)).await?;
    guest
        .wait_for_acks("vda", 10, Duration::from_secs(120))
        .await?;
    Ok(Source { guest, spec })
}

/// Kills a daemonized destination QEMU when dropped.
struct PidGuard(Option<u32>);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Reads every ack seen against the destination image, after its QEMU quit.
pub fn verify(image: &Path, acked: &[u64]) -> Result<bool> {
    match guest::verify_disk(image, ImageFormat::Raw, "vda", acked) {
        Ok(_) => Ok(true),
        Err(guest::GuestError::RecordMissing { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Quits a QEMU through its QMP socket.
pub async fn quit(qmp: &Path) {
    if let Ok(q) = qmp::Qmp::connect_unix(qmp).await {
        let _ = q.execute_raw("quit", Value::Null).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// ferry end to end: `ferry agent` on 127.0.0.1 (or inside `link`'s namespace) and `ferry
/// migrate --json` with `flags` (none: the defaults, encrypted). The row is named `ferry`
/// followed by the flags.
pub async fn ferry(
    ferry_bin: &Path,
    dir: &Path,
    setup: &Setup,
    flags: &[&str],
    link: Option<&Link>,
) -> Result<MigrationRun> {
    let mut run = MigrationRun {
        flow: std::iter::once("ferry")
            .chain(flags.iter().copied())
            .collect::<Vec<_>>()
            .join(" "),
        ..Default::default()
    };
    let source = boot_source(dir, setup).await?;
    run.disk_bytes = image::allocated(&dir.join("vda.raw"))?;
    let token = dir.join("token");
    std::fs::write(&token, "bench-token-0123456789abcdef-0123")?;
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let storage = dir.join("storage");
    std::fs::create_dir_all(&storage)?;
    // The agent may load the test guest's kernel and initrd.
    let kernel = GuestImages::locate()?.kernel;
    let (mut agent, host) = match link {
        Some(link) => (link.command(ferry_bin), link.dest_ip.as_str()),
        None => (tokio::process::Command::new(ferry_bin), "127.0.0.1"),
    };
    let mut agent = agent
        .args(["agent", "--listen", &format!("{host}:0"), "--storage"])
        .arg(&storage)
        .arg("--token-file")
        .arg(&token)
        .arg("--allow-path")
        .arg(kernel.parent().unwrap_or(Path::new("/")))
        .arg("--state-dir")
        .arg(dir.join("agent-state"))
        .stdout(Stdio::piped())
        .stderr(log_file("agent")?)
        .kill_on_drop(true)
        .spawn()
        .context("start ferry agent")?;
    let mut lines = BufReader::new(agent.stdout.take().context("agent stdout")?).lines();
    let first = lines.next_line().await?.unwrap_or_default();
    let addr = first.rsplit(' ').next().unwrap_or_default().to_owned();

    let watch = AckWatch::start(source.guest.serial_log().to_path_buf(), "vda");
    // A second of the guest's normal rhythm before anything happens.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let mut migrate = tokio::process::Command::new(ferry_bin)
        .args(["migrate", "--json", "--qmp"])
        .arg(source.guest.qmp_socket())
        .args(["--to", &addr, "--token-file"])
        .arg(&token)
        .args([
            "--mirror-timeout",
            &setup.mirror_timeout.as_secs().to_string(),
        ])
        .args(flags)
        .env("FERRY_STATE_DIR", dir.join("source-state"))
        .stdout(Stdio::piped())
        .stderr(log_file("migrate")?)
        .kill_on_drop(true)
        .spawn()
        .context("start ferry migrate")?;
    let mut events = BufReader::new(migrate.stdout.take().context("migrate stdout")?).lines();
    let mut migration_dir = None;
    let mut mirror_started = None;
    let (mut switch_at, mut done_at) = (None, None);
    let mut dest_pid = PidGuard(None);
    let mut dest_qmp = None;
    while let Some(line) = events.next_line().await? {
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        match event["event"].as_str().unwrap_or("") {
            "prepared" => {
                let id = event["migration_id"].as_str().unwrap_or_default();
                let d = storage.join(id);
                watch.add(d.join("serial.log"));
                migration_dir = Some(d);
                mirror_started = Some(Instant::now());
            }
            "mirror_ready" => {
                run.mirror_ready_s = mirror_started.map(|t| t.elapsed().as_secs_f64());
            }
            "mirror_write_blocking" => run.write_blocking = true,
            "switchover" => switch_at = Some(Instant::now()),
            "completed" => {
                done_at = Some(Instant::now());
                run.total_s = started.elapsed().as_secs_f64();
                run.completed = true;
                run.downtime_ms = event["downtime_ms"].as_u64();
                run.stop_to_resume_ms = event["stop_to_resume_ms"].as_f64();
                run.phases_ms = Some(event["phases_ms"].clone());
                run.ram_bytes = event["ram_bytes"].as_u64();
                run.set_link_limit(link);
                dest_pid.0 = event["destination"]["pid"].as_u64().map(|p| p as u32);
                dest_qmp = event["destination"]["qmp"].as_str().map(PathBuf::from);
            }
            "failed" => run.error = Some(format!("{}: {}", event["phase"], event["error"])),
            _ => {}
        }
    }
    let _ = migrate.wait().await;
    finish_acks(&mut run, watch, started, switch_at, done_at).await;
    if let Some(qmp) = dest_qmp {
        quit(&qmp).await;
    }
    if run.completed {
        if let Some(d) = migration_dir {
            let image = d.join("disk-vda.raw");
            run.acks_verified = Some(verify(&image, &run_seqs(&source, &d))?);
        }
    }
    let _ = agent.kill().await;
    Ok(run)
}

/// Where a ferry process's log goes: nowhere, unless `FERRY_BENCH_LOGS` names a directory
/// (then `NAME.PID-of-bench.N.log` there; with `FERRY_LOG=debug` the switchover's steps are
/// timestamped, to compare with QEMU's events).
fn log_file(name: &str) -> Result<Stdio> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let Some(dir) = std::env::var_os("FERRY_BENCH_LOGS") else {
        return Ok(Stdio::null());
    };
    let n = RUN.fetch_add(1, Ordering::Relaxed) / 2;
    let path = Path::new(&dir).join(format!("{name}.{}.{n}.log", std::process::id()));
    let file =
        std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
    Ok(file.into())
}

/// Every ack in the source and destination logs, merged.
fn run_seqs(source: &Source, migration_dir: &Path) -> Vec<u64> {
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let mut acks = guest::Acks::parse(&read(source.guest.serial_log()));
    acks.merge(&guest::Acks::parse(&read(
        &migration_dir.join("serial.log"),
    )));
    acks.seqs("vda").to_vec()
}

/// Lets the destination ack for a while, then fills in the gap figures.
pub async fn finish_acks(
    run: &mut MigrationRun,
    watch: AckWatch,
    started: Instant,
    switch_at: Option<Instant>,
    done_at: Option<Instant>,
) {
    if done_at.is_some() {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let acks = watch.finish();
    run.acks = acks.count();
    run.ack_gap_normal_ms = acks.median_gap_ms(started);
    if let (Some(from), Some(to)) = (switch_at, done_at) {
        run.ack_gap_ms = acks.max_gap_ms(from, to + Duration::from_millis(500));
    }
}
