//! What the end-to-end tests check from outside: where the VM runs, that it kept every
//! acknowledged write, what ferry left behind on either end (QEMU nodes, jobs, capabilities,
//! journals, key files, processes), and waits on conditions with a deadline.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_testkit::{verify_disk, Acks, ImageFormat, RunningGuest};
use serde_json::Value;

use crate::agent::AgentProc;
use crate::guest::{quit, still_acking, wait_exit};
use crate::migrate::state_dir;

/// Kills a daemonized destination QEMU when the test ends, whatever happened.
pub struct PidGuard(pub Option<u32>);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            kill9(pid);
        }
    }
}

/// Waits until `path` contains `needle`.
pub fn wait_for_text(path: &Path, needle: &str, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} never said {needle:?}", path.display());
}

/// Waits until `cond` holds.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within {timeout:?}");
}

/// What ferry left in a source QEMU: its NBD nodes and jobs, and the migration capabilities on.
pub async fn source_leftovers(qmp_path: &Path) -> Vec<String> {
    let q = qmp::Qmp::connect_unix(qmp_path)
        .await
        .expect("source QMP free after ferry");
    let mut left = Vec::new();
    let nodes = q
        .execute_raw("query-named-block-nodes", serde_json::json!({"flat": true}))
        .await
        .expect("nodes");
    for n in nodes.as_array().into_iter().flatten() {
        let name = n["node-name"].as_str().unwrap_or("");
        if name.starts_with("ferry-") {
            left.push(format!("node {name}"));
        }
    }
    let jobs = q
        .execute_raw("query-block-jobs", Value::Null)
        .await
        .expect("jobs");
    for j in jobs.as_array().into_iter().flatten() {
        left.push(format!("job {}", j["device"]));
    }
    let caps = q
        .execute_raw("query-migrate-capabilities", Value::Null)
        .await
        .expect("caps");
    for c in caps.as_array().into_iter().flatten() {
        let name = c["capability"].as_str().unwrap_or("");
        if c["state"] == Value::Bool(true)
            && [
                "events",
                "pause-before-switchover",
                "return-path",
                "multifd",
            ]
            .contains(&name)
        {
            left.push(format!("capability {name}"));
        }
    }
    // The migration's TLS: its client object and the RAM stream's parameters.
    let objects = q
        .execute_raw("qom-list", serde_json::json!({"path": "/objects"}))
        .await
        .expect("objects");
    for o in objects.as_array().into_iter().flatten() {
        let name = o["name"].as_str().unwrap_or("");
        if name.starts_with("ferry-tls") {
            left.push(format!("object {name}"));
        }
    }
    let params = q
        .execute_raw("query-migrate-parameters", Value::Null)
        .await
        .expect("parameters");
    // ferry lifts the RAM bandwidth cap for the migration; a VM that stays gets QEMU's default
    // (128 MiB/s, which the test guests never change) back.
    if params["max-bandwidth"] != serde_json::json!(128u64 << 20) {
        left.push(format!("max-bandwidth {}", params["max-bandwidth"]));
    }
    if params["tls-creds"].as_str().is_some_and(|c| !c.is_empty()) {
        left.push(format!("tls-creds {}", params["tls-creds"]));
    }
    left
}

/// Journals left on the source.
pub fn journals(token: &Path) -> Vec<String> {
    names_in(&state_dir(token).join("source"))
}

/// Key directories of encrypted migrations left on the source.
pub fn source_keys(token: &Path) -> Vec<String> {
    names_in(&state_dir(token).join("tls"))
}

fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The VM stayed on the source: it runs and acknowledges, nothing of the migration is left on
/// either end, no destination QEMU is alive.
pub async fn assert_on_source(guest: &mut RunningGuest, token: &Path, agent: &AgentProc) {
    assert!(
        matches!(guest.try_wait(), Ok(None)),
        "the source QEMU must still run"
    );
    still_acking(guest.serial_log(), "vda", 5).await;
    assert_eq!(
        source_leftovers(guest.qmp_socket()).await,
        Vec::<String>::new()
    );
    assert_eq!(
        journals(token),
        Vec::<String>::new(),
        "source journal removed"
    );
    assert_eq!(
        source_keys(token),
        Vec::<String>::new(),
        "source key files removed"
    );
    wait_until(
        "the agent's storage empties",
        Duration::from_secs(30),
        || agent.leftovers().is_empty(),
    );
    assert_eq!(destination_qemus(&agent.storage), Vec::<String>::new());
}

/// Live QEMU processes whose command line names the agent's storage.
pub fn destination_qemus(storage: &Path) -> Vec<String> {
    let needle = format!("{}/", storage.display());
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.contains("qemu-system") && cmd.contains(&needle))
                .then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// The only migration directory of the agent.
pub fn migration_dir(storage: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(storage)
        .expect("storage")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "one migration directory in {dirs:?}");
    dirs[0].clone()
}

/// The VM moved: the source QEMU exited, the destination acknowledges, and after it stops every
/// acknowledged record (from both serial logs) is on the destination image.
pub async fn assert_on_destination(guest: &mut RunningGuest, token: &Path, agent: &AgentProc) {
    assert!(
        wait_exit(guest, Duration::from_secs(20)),
        "the source QEMU must quit once the destination owns the VM"
    );
    let dir = migration_dir(&agent.storage);
    let _guard = PidGuard(
        std::fs::read_to_string(dir.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok()),
    );
    let serial = dir.join("serial.log");
    still_acking(&serial, "vda", 5).await;
    assert_eq!(
        journals(token),
        Vec::<String>::new(),
        "source journal removed"
    );
    assert_eq!(
        source_keys(token),
        Vec::<String>::new(),
        "source key files removed"
    );
    let journal = std::fs::read_to_string(dir.join("journal.json")).expect("agent journal");
    assert!(journal.contains("\"running\""), "{journal}");
    assert!(
        !dir.join("tls").exists(),
        "the destination's key files must be removed once it runs"
    );
    quit(&dir.join("qmp.sock")).await;
    wait_until(
        "the destination QEMU exits",
        Duration::from_secs(20),
        || destination_qemus(&agent.storage).is_empty(),
    );
    let mut acks =
        Acks::parse(&std::fs::read_to_string(guest.serial_log()).expect("source serial"));
    acks.merge(&Acks::parse(
        &std::fs::read_to_string(&serial).expect("destination serial"),
    ));
    let report = verify_disk(
        &dir.join("disk-vda.raw"),
        ImageFormat::Raw,
        "vda",
        acks.seqs("vda"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(report.acked >= 15, "only {} records checked", report.acked);
}

/// A destination "QEMU" that drops the guest's virtio-blk device: it starts, takes the RAM, and
/// fails to load the device state (a section it does not know).
pub fn qemu_without_virtio_blk(dir: &Path, real: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let path = bin.join("qemu-system-x86_64");
    let real = which(real);
    std::fs::write(
        &path,
        format!(
            "#!/bin/bash\nargs=()\nprev=\nfor a in \"$@\"; do\n  if [[ $prev == -device && $a == virtio-blk* ]]; then unset 'args[-1]'; prev=; continue; fi\n  args+=(\"$a\"); prev=$a\ndone\nexec {} \"${{args[@]}}\"\n",
            real.display()
        ),
    )
    .expect("wrapper");
    Command::new("chmod")
        .arg("755")
        .arg(&path)
        .status()
        .expect("chmod");
    path
}

pub fn which(bin: &Path) -> PathBuf {
    if bin.is_absolute() {
        return bin.to_path_buf();
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {}", bin.display()))
        .output()
        .expect("sh");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

pub fn kill9(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}
