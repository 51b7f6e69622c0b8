//! Helpers of the operations tests (`tests/ops.rs`): an agent with its metrics endpoint and
//! its stderr in a file, `curl` scrapes, `ferry status` runs, control-protocol sources that
//! send a made-up VM without booting one, and a tmpfs for storage of a known size.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry::migrate::control::{AgentAuth, AgentLink};
use ferry::vm::{DiskDescription, VmDescription};
use serde_json::Value;

use crate::{agent_state_dir, guest_images, AgentProc, Ferry};

pub const TOKEN: &str = "ops-test-token-0123456789abcdef";

/// Where [`agent_with_metrics`] sends the agent's stderr (a file, as under systemd).
pub fn agent_log(storage: &Path) -> PathBuf {
    storage.with_extension("agent.log")
}

/// An agent started with `extra` flags and `--metrics 127.0.0.1:0`; its metrics address.
pub fn agent_with_metrics(
    ferry: Ferry,
    storage: &Path,
    token: &Path,
    extra: &[&str],
) -> (AgentProc, String) {
    std::fs::create_dir_all(storage).expect("create storage");
    let log = std::fs::File::create(agent_log(storage)).expect("agent log");
    let kernel = guest_images().kernel;
    let mut child = ferry
        .command()
        .args([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .arg("--storage")
        .arg(storage)
        .arg("--token-file")
        .arg(token)
        .arg("--state-dir")
        .arg(agent_state_dir(storage))
        .arg("--allow-path")
        .arg(kernel.parent().expect("guest image directory"))
        .args(extra)
        // The agent's own default level: info for ferry.
        .env_remove("FERRY_LOG")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn ferry agent");
    let mut out = BufReader::new(child.stdout.take().expect("agent stdout"));
    let mut lines = [String::new(), String::new()];
    for line in &mut lines {
        out.read_line(line).expect("agent prints its addresses");
    }
    let addr = lines[0]
        .trim()
        .rsplit(' ')
        .next()
        .expect("address")
        .to_string();
    let metrics = lines[1]
        .trim()
        .strip_prefix("ferry agent metrics on http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("agent said {lines:?}"))
        .to_string();
    let agent = AgentProc {
        child,
        addr,
        storage: storage.to_path_buf(),
    };
    (agent, metrics)
}

/// `curl`'s view of the metrics endpoint.
pub fn scrape(metrics: &str) -> String {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            &format!("http://{metrics}/metrics"),
        ])
        .output()
        .expect("run curl (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 exposition")
}

/// The value of one sample line (`name{labels} value`).
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// `ferry status ... --json`.
pub fn status(ferry: Ferry, args: &[&std::ffi::OsStr]) -> Value {
    let out = ferry
        .command()
        .arg("status")
        .args(args)
        .arg("--json")
        .output()
        .expect("run ferry status");
    assert!(
        out.status.success(),
        "ferry status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

pub fn remote_status(ferry: Ferry, agent: &AgentProc, token: &Path) -> Value {
    status(
        ferry,
        &[
            "--agent".as_ref(),
            agent.addr.as_ref(),
            "--token-file".as_ref(),
            token.as_os_str(),
        ],
    )
}

pub fn local_status(ferry: Ferry, storage: &Path) -> Value {
    status(ferry, &["--storage".as_ref(), storage.as_os_str()])
}

pub fn ids(status: &Value) -> Vec<String> {
    let mut ids: Vec<String> = status["migrations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

pub fn free_bytes(dir: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(dir).expect("statvfs");
    stat.blocks_available() as u64 * stat.fragment_size() as u64
}

/// A VM of one raw disk `vda` of `size` bytes holding `allocated` (as the source reports it),
/// on the system's QEMU: what a source's `Prepare` carries, without booting anything.
pub fn vm(size: u64, allocated: Option<u64>) -> VmDescription {
    let words = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-m",
        "64",
        "-display",
        "none",
        "-name",
        "guest=ops-test",
        "-blockdev",
        "driver=raw,node-name=vda,file.driver=file,file.filename=/src/vda.raw",
        "-device",
        "virtio-blk-pci,drive=vda",
    ];
    VmDescription {
        argv: words.iter().map(|w| w.to_string()).collect(),
        machine: None,
        running: true,
        disks: vec![DiskDescription {
            name: "vda".into(),
            node_name: "vda".into(),
            device: String::new(),
            file: "/src/vda.raw".into(),
            format: "raw".into(),
            size,
            allocated,
            read_only: false,
        }],
    }
}

pub async fn link(agent: &AgentProc) -> AgentLink {
    AgentLink::connect(
        &agent.addr,
        &AgentAuth::with_token(TOKEN.as_bytes().to_vec()),
    )
    .await
    .expect("connect and authenticate")
}

/// Waits until the agent's storage holds `n` entries (a rollback runs after the link drops).
pub async fn wait_leftovers(agent: &AgentProc, n: usize) {
    let start = Instant::now();
    while agent.leftovers().len() != n {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "storage holds {:?}, expected {n} entries",
            agent.leftovers()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tmpfs mounted for the test's storage (free space of its own, not the shared disk's, which
/// other processes fill and empty); unmounted on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
