//! Shared pieces of the end-to-end migration tests: a `ferry agent` subprocess, a `ferry migrate`
//! run with its JSON events, and guards that never leave a QEMU behind.

#![allow(dead_code)] // each test binary uses a different part of this module

pub mod handover;
pub mod ops;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::{DiskSpec, GuestImages, GuestSpec, ImageFormat, RunningGuest};
use serde_json::Value;

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// A `ferry agent` subprocess on 127.0.0.1 with a random port; killed on drop.
pub struct AgentProc {
    pub child: Child,
    pub addr: String,
    pub storage: PathBuf,
}

impl AgentProc {
    /// Starts an agent that may load the test guest's kernel and initrd (`--allow-path` their
    /// directory), plus `extra` flags.
    pub fn start(storage: &Path, token_file: &Path, extra: &[&str]) -> AgentProc {
        let kernel = guest_images().kernel;
        let guest_dir = kernel.parent().expect("guest image directory");
        let mut args: Vec<&std::ffi::OsStr> = vec!["--allow-path".as_ref(), guest_dir.as_os_str()];
        args.extend(extra.iter().map(|e| std::ffi::OsStr::new(*e)));
        AgentProc::start_bare(storage, token_file, &args)
    }

    /// Starts an agent with exactly these flags besides listen, storage and token.
    pub fn start_bare(storage: &Path, token_file: &Path, extra: &[&std::ffi::OsStr]) -> AgentProc {
        std::fs::create_dir_all(storage).expect("create storage");
        let mut child = Command::new(FERRY)
            .args(["agent", "--listen", "127.0.0.1:0", "--storage"])
            .arg(storage)
            .arg("--token-file")
            .arg(token_file)
            .arg("--state-dir")
            .arg(agent_state_dir(storage))
            .args(extra)
            .env("FERRY_LOG", "ferry=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ferry agent");
        let stdout = child.stdout.take().expect("agent stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("agent prints its address");
        let addr = line.trim().rsplit(' ').next().expect("address").to_string();
        assert!(addr.starts_with("127.0.0.1:"), "agent said {line:?}");
        AgentProc {
            child,
            addr,
            storage: storage.to_path_buf(),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Entries left in the storage directory (a refused or rolled-back migration leaves none).
    pub fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(&self.storage)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills a daemonized destination QEMU when the test ends, whatever happened.
pub struct PidGuard(pub Option<u32>);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// The outcome of one `ferry migrate --json` run.
pub struct MigrateRun {
    pub code: i32,
    pub events: Vec<Value>,
    pub stderr: String,
}

impl MigrateRun {
    pub fn last(&self) -> &Value {
        self.events.last().expect("at least one event")
    }

    pub fn of(&self, name: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == name).collect()
    }
}

/// The source state directory of a test: beside its token file, so each test has its own.
/// The agent's own state directory (its TLS identity) beside its storage.
pub fn agent_state_dir(storage: &Path) -> PathBuf {
    storage.with_extension("agent-state")
}

pub fn state_dir(token_file: &Path) -> PathBuf {
    token_file.parent().expect("token dir").join("source-state")
}

pub fn migrate_command(qmp: &Path, to: &str, token_file: &Path) -> Command {
    let mut cmd = Command::new(FERRY);
    cmd.args(["migrate", "--json", "--qmp"])
        .arg(qmp)
        .args(["--to", to, "--token-file"])
        .arg(token_file)
        .env("FERRY_STATE_DIR", state_dir(token_file))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `ferry migrate --json` to completion.
pub fn migrate(qmp: &Path, to: &str, token_file: &Path) -> MigrateRun {
    migrate_with(qmp, to, token_file, &[])
}

/// [`migrate`] with more flags.
pub fn migrate_with(qmp: &Path, to: &str, token_file: &Path, extra: &[&str]) -> MigrateRun {
    let out = migrate_command(qmp, to, token_file)
        .args(extra)
        .output()
        .expect("run ferry migrate");
    collect(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr)
}

pub fn collect(code: i32, stdout: &[u8], stderr: &[u8]) -> MigrateRun {
    let events = String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    MigrateRun {
        code,
        events,
        stderr: String::from_utf8_lossy(stderr).into_owned(),
    }
}

/// A token file as the README says to make one: readable by its owner only.
pub fn token_file(dir: &Path, content: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("token-{}", content.len()));
    std::fs::write(&path, content).expect("write token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    path
}

/// The usual end-to-end setup: a temporary directory, a token file in it, a raw disk `vda` of
/// `size` bytes with `data_mib` MiB of data, and the test guest booted on it writing `rate`
/// records a second (0: as fast as it can).
pub struct OneDisk {
    pub tmp: tempfile::TempDir,
    pub token: PathBuf,
    pub image: PathBuf,
    pub guest: RunningGuest,
}

impl OneDisk {
    /// Boots on the system's QEMU.
    pub async fn boot(token: &str, size: u64, data_mib: u64, rate: u32) -> OneDisk {
        OneDisk::boot_with(
            token,
            size,
            data_mib,
            rate,
            Path::new(ferry_testkit::DEFAULT_QEMU),
        )
        .await
    }

    /// Boots on `qemu`.
    pub async fn boot_with(
        token: &str,
        size: u64,
        data_mib: u64,
        rate: u32,
        qemu: &Path,
    ) -> OneDisk {
        let tmp = tempfile::tempdir().expect("tempdir");
        let token = token_file(tmp.path(), token);
        let image = tmp.path().join("vda.raw");
        raw_image(&image, size, data_mib);
        let guest = boot_with(
            &tmp.path().join("src"),
            vec![disk(&image, ImageFormat::Raw, "vda")],
            rate,
            qemu,
        )
        .await;
        OneDisk {
            tmp,
            token,
            image,
            guest,
        }
    }

    /// Where the agent's storage goes.
    pub fn storage(&self) -> PathBuf {
        self.tmp.path().join("storage")
    }

    /// An agent on localhost with this setup's storage and token, plus `extra` flags.
    pub fn agent(&self, extra: &[&str]) -> AgentProc {
        AgentProc::start(&self.storage(), &self.token, extra)
    }
}

/// A sparse raw image with `data_mib` MiB of pseudo-random data from the middle of the disk on
/// (see [`ferry_testkit::disk::raw_image`]).
pub fn raw_image(path: &Path, size: u64, data_mib: u64) {
    ferry_testkit::disk::raw_image(path, size, data_mib).expect("create raw image");
}

pub fn qcow2_image(path: &Path, size: u64) {
    ferry_testkit::disk::qcow2_image(path, size).expect("create qcow2 image");
}

pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Boots the test guest on the given disks and waits until each disk has acknowledged writes.
pub async fn boot(dir: &Path, disks: Vec<DiskSpec>, rate: u32) -> RunningGuest {
    boot_with(dir, disks, rate, Path::new(ferry_testkit::DEFAULT_QEMU)).await
}

/// [`boot`] with a given QEMU binary.
pub async fn boot_with(dir: &Path, disks: Vec<DiskSpec>, rate: u32, qemu: &Path) -> RunningGuest {
    let mut spec = GuestSpec::new(guest_images());
    spec.rate = rate;
    for d in disks {
        spec = spec.disk(d);
    }
    boot_spec(dir, &spec, qemu).await
}

pub fn guest_images() -> GuestImages {
    GuestImages::locate().expect("test guest images (run scripts/setup)")
}

/// Boots `spec` and waits until each of its disks (`vda`, `vdb`, ...) has acknowledged writes.
pub async fn boot_spec(dir: &Path, spec: &GuestSpec, qemu: &Path) -> RunningGuest {
    let mut guest = ferry_testkit::launch(dir, spec, qemu)
        .await
        .expect("launch guest");
    let names = (0..spec.disks.len()).map(|i| format!("vd{}", (b'a' + i as u8) as char));
    for name in names {
        guest
            .wait_for_acks(&name, 10, Duration::from_secs(90))
            .await
            .expect("guest acknowledges writes");
    }
    guest
}

pub fn disk(path: &Path, format: ImageFormat, id: &str) -> DiskSpec {
    DiskSpec::new(path, format, id)
}

/// Waits until QEMU has exited (the source quits after a migration).
pub fn wait_exit(guest: &mut RunningGuest, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if matches!(guest.try_wait(), Ok(Some(_))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Proves the guest is still alive on `serial` by waiting for `more` new acks on `disk`.
pub async fn still_acking(serial: &Path, disk: &str, more: usize) {
    let now = ferry_testkit::Acks::parse(&std::fs::read_to_string(serial).unwrap_or_default())
        .count(disk);
    ferry_testkit::wait_for_acks(serial, disk, now + more, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("guest stopped acknowledging on {}: {e}", serial.display()));
}

/// Asks a QEMU to quit over QMP and waits (up to 20 s) until the process is gone, so that its
/// images are closed before anyone reads them.
pub async fn quit(qmp_path: &Path) {
    let q = qmp::Qmp::connect_unix(qmp_path)
        .await
        .unwrap_or_else(|e| panic!("QMP {}: {e}", qmp_path.display()));
    let pid = q.peer_pid().expect("QEMU's pid");
    let _ = q.execute_raw("quit", Value::Null).await;
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, s)| s.starts_with('Z'))
        })
    };
    let start = Instant::now();
    while !gone() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "QEMU {pid} did not quit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
