//! Pieces of the hand-over and fault-matrix tests: agents with their stderr in a file (where
//! they say they hold), `ferry migrate` held at a fault point, `ferry recover`, the checks that
//! exactly one copy of the VM runs with every acknowledged write and nothing left behind, and a
//! network namespace that plays the destination host.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::{verify_disk, Acks, ImageFormat, RunningGuest};
use serde_json::Value;

use super::*;

/// A `ferry agent` with its stderr in a file (to see where it holds) on a given address.
pub fn spawn_agent(storage: &Path, token: &Path, listen: &str, env: &[(&str, &str)]) -> AgentProc {
    spawn_agent_with(storage, token, listen, &[], env)
}

/// [`spawn_agent`] with more arguments.
pub fn spawn_agent_with(
    storage: &Path,
    token: &Path,
    listen: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> AgentProc {
    spawn_agent_in(None, storage, token, listen, args, env)
}

/// [`spawn_agent_with`] inside network namespace `netns` (when given).
pub fn spawn_agent_in(
    netns: Option<&str>,
    storage: &Path,
    token: &Path,
    listen: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> AgentProc {
    std::fs::create_dir_all(storage).expect("storage");
    let log = storage.with_extension("log");
    let stderr = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&log)
        .expect("agent log");
    let mut cmd = match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns, FERRY]);
            cmd
        }
        None => Command::new(FERRY),
    };
    let mut child = cmd
        .args(["agent", "--listen", listen, "--storage"])
        .arg(storage)
        .arg("--token-file")
        .arg(token)
        .arg("--state-dir")
        .arg(agent_state_dir(storage))
        .args(["--recover-window", "20"])
        .arg("--allow-path")
        .arg(
            guest_images()
                .kernel
                .parent()
                .expect("guest image directory"),
        )
        .args(args)
        .envs(env.iter().copied())
        .env("FERRY_LOG", "ferry=info")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn agent");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("agent prints its address");
    let addr = line.trim().rsplit(' ').next().expect("address").to_string();
    let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    assert!(addr.starts_with(host), "agent said {line:?}");
    AgentProc {
        child,
        addr,
        storage: storage.to_path_buf(),
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

/// `ferry migrate` held at a fault point (it says so on stderr, kept in a file).
pub struct HeldMigrate {
    child: Child,
    stderr: PathBuf,
}

impl HeldMigrate {
    pub fn start(qmp: &Path, to: &str, token: &Path, hold: &str, dir: &Path) -> HeldMigrate {
        let stderr = dir.join("migrate.err");
        let child = migrate_command(qmp, to, token)
            .env("FERRY_HOLD_AT", hold)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("err"))
            .spawn()
            .expect("spawn migrate");
        HeldMigrate { child, stderr }
    }

    pub fn wait_held(&self) {
        wait_for_text(&self.stderr, "holding at", Duration::from_secs(120));
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ferry recover --json`; returns (exit code, the JSON line, stderr).
pub fn recover(qmp: &Path, token: &Path) -> (i32, Value, String) {
    let out = Command::new(FERRY)
        .args(["recover", "--json", "--qmp"])
        .arg(qmp)
        .arg("--token-file")
        .arg(token)
        .env("FERRY_STATE_DIR", state_dir(token))
        .output()
        .expect("run ferry recover");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = stdout
        .lines()
        .last()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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

/// A network namespace joined to this one by a veth pair: the destination host of a test. The
/// link can be cut (`ip link set DEV down`) to partition the two. Removed when dropped.
pub struct Netns {
    /// The namespace's name.
    pub name: String,
    /// This side's end of the veth pair (where a capture listens).
    pub host_if: String,
    /// This side's address.
    pub host_ip: String,
    /// The namespace's address.
    pub dest_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// Creates namespace number `n` of this test process (addresses 10.X.n.1 and .2, X from the
    /// pid, so that concurrent test processes do not collide).
    pub fn create(n: u8) -> Netns {
        let tag = std::process::id() % 10_000;
        let name = format!("ferry-t{tag}-{n}");
        let host_if = format!("fh{tag}x{n}");
        let dest_if = format!("fd{tag}x{n}");
        let net = format!("10.{}.{n}", 200 + tag % 50);
        let (host_ip, dest_ip) = (format!("{net}.1"), format!("{net}.2"));
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
            dest_ip: dest_ip.clone(),
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &dest_if,
        ]);
        ip(&["link", "set", &dest_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("{dest_ip}/30"), "dev", &dest_if]);
        inside(&["link", "set", &dest_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }

    /// Cuts the link for `secs` seconds (in the background); returns at once.
    pub fn partition(&self, secs: u64) -> std::thread::JoinHandle<()> {
        ip(&["link", "set", &self.host_if, "down"]);
        let host_if = self.host_if.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            ip(&["link", "set", &host_if, "up"]);
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
