//! The hand-over under faults: a process killed, a destination that cannot load the state, a
//! destination QEMU that dies, at each phase around the switchover. After each, at most one
//! `ferry recover`, exactly one copy of the VM runs, every write the guest saw acknowledged is on
//! the disk of the copy that runs, and neither end keeps a leftover (NBD nodes, jobs, journals,
//! migration directories, processes).
//!
//! Faults are placed with `FERRY_HOLD_AT` (see `src/faults.rs`): the process stops at the named
//! point, says so on stderr, and the test kills it (or something else) there.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry::guest::{verify_disk, Acks, ImageFormat, RunningGuest};
use serde_json::Value;
use support::*;

const TOKEN: &str = "handover-test-token-0123456789abcdef";

/// A `ferry agent` with its stderr in a file (to see where it holds) on a given address.
fn spawn_agent(storage: &Path, token: &Path, listen: &str, env: &[(&str, &str)]) -> AgentProc {
    spawn_agent_with(storage, token, listen, &[], env)
}

/// [`spawn_agent`] with more arguments.
fn spawn_agent_with(
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
    let mut child = Command::new(FERRY)
        .args(["agent", "--listen", listen, "--storage"])
        .arg(storage)
        .arg("--token-file")
        .arg(token)
        .args(["--recover-window", "20"])
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
    assert!(addr.starts_with("127.0.0.1:"), "agent said {line:?}");
    AgentProc {
        child,
        addr,
        storage: storage.to_path_buf(),
    }
}

/// Waits until `path` contains `needle`.
fn wait_for_text(path: &Path, needle: &str, timeout: Duration) {
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
fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
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
struct HeldMigrate {
    child: Child,
    stderr: PathBuf,
}

impl HeldMigrate {
    fn start(qmp: &Path, to: &str, token: &Path, hold: &str, dir: &Path) -> HeldMigrate {
        let stderr = dir.join("migrate.err");
        let child = migrate_command(qmp, to, token)
            .env("FERRY_HOLD_AT", hold)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("err"))
            .spawn()
            .expect("spawn migrate");
        HeldMigrate { child, stderr }
    }

    fn wait_held(&self) {
        wait_for_text(&self.stderr, "holding at", Duration::from_secs(120));
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ferry recover --json`; returns (exit code, the JSON line, stderr).
fn recover(qmp: &Path, token: &Path) -> (i32, Value, String) {
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
async fn source_leftovers(qmp_path: &Path) -> Vec<String> {
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
            && ["events", "pause-before-switchover", "return-path"].contains(&name)
        {
            left.push(format!("capability {name}"));
        }
    }
    left
}

/// Journals left on the source.
fn journals(token: &Path) -> Vec<String> {
    std::fs::read_dir(state_dir(token).join("source"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The VM stayed on the source: it runs and acknowledges, nothing of the migration is left on
/// either end, no destination QEMU is alive.
async fn assert_on_source(guest: &mut RunningGuest, token: &Path, agent: &AgentProc) {
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
    wait_until(
        "the agent's storage empties",
        Duration::from_secs(30),
        || agent.leftovers().is_empty(),
    );
    assert_eq!(destination_qemus(&agent.storage), Vec::<String>::new());
}

/// Live QEMU processes whose command line names the agent's storage.
fn destination_qemus(storage: &Path) -> Vec<String> {
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
fn migration_dir(storage: &Path) -> PathBuf {
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
async fn assert_on_destination(guest: &mut RunningGuest, token: &Path, agent: &AgentProc) {
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
    let journal = std::fs::read_to_string(dir.join("journal.json")).expect("agent journal");
    assert!(journal.contains("\"running\""), "{journal}");
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
fn qemu_without_virtio_blk(dir: &Path, real: &Path) -> PathBuf {
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

fn which(bin: &Path) -> PathBuf {
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

fn kill9(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// Every fault after which the source must keep the VM, on one guest, then a migration that
/// goes through. Run with the source on QEMU 10.0 and on 7.2.
async fn source_keeps_the_vm(qemu: &Path) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path(), TOKEN);
    let image = tmp.path().join("vda.raw");
    raw_image(&image, 128 << 20, 16);
    let mut guest = boot_with(
        &tmp.path().join("src"),
        vec![disk(&image, ImageFormat::Raw, "vda")],
        50,
        qemu,
    )
    .await;
    let storage = tmp.path().join("storage");

    // 1. The destination cannot load the device state: with the return path the source's
    //    migration fails, QEMU resumes the source, and the agent removes everything.
    let broken = qemu_without_virtio_blk(tmp.path(), qemu);
    let broken = broken.to_str().expect("utf-8");
    let agent = spawn_agent_with(
        &storage,
        &token,
        "127.0.0.1:0",
        &["--qemu-binary", broken],
        &[],
    );
    let run = migrate(guest.qmp_socket(), &agent.addr, &token);
    assert_eq!(run.code, 1, "{:?}\n{}", run.events.last(), run.stderr);
    let last = run.last();
    assert_eq!(last["event"], "failed", "{last}");
    assert_eq!(last["source_running"], Value::Bool(true), "{last}");
    assert!(
        last["error"].as_str().unwrap_or("").contains("switchover"),
        "{last}"
    );
    assert_on_source(&mut guest, &token, &agent).await;
    drop(agent);

    // 2. `ferry migrate` killed at pre-switchover (guest paused, migration held): the source
    //    stays paused until `ferry recover`, which cancels and resumes it.
    let qemu_arg = ["--qemu-binary", qemu.to_str().expect("utf-8")];
    let agent = spawn_agent_with(&storage, &token, "127.0.0.1:0", &qemu_arg, &[]);
    let held = HeldMigrate::start(
        guest.qmp_socket(),
        &agent.addr,
        &token,
        "source-pre-switchover",
        tmp.path(),
    );
    held.wait_held();
    held.kill();
    assert_eq!(journals(&token).len(), 1, "the journal outlives the driver");
    let (code, out, err) = recover(guest.qmp_socket(), &token);
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out["owner"], "source", "{out}");
    assert_on_source(&mut guest, &token, &agent).await;

    // 3. The destination QEMU dies while the agent is about to start it (after the source
    //    completed): it never ran, so the agent answers `Abandoned` and the source resumes.
    drop(agent);
    let agent = spawn_agent_with(
        &storage,
        &token,
        "127.0.0.1:0",
        &qemu_arg,
        &[("FERRY_HOLD_AT", "agent-commit:4")],
    );
    let log = storage.with_extension("log");
    let _ = std::fs::write(&log, "");
    let child = migrate_command(guest.qmp_socket(), &agent.addr, &token)
        .spawn()
        .expect("migrate");
    wait_for_text(&log, "holding at agent-commit", Duration::from_secs(120));
    let pid: u32 = std::fs::read_to_string(migration_dir(&storage).join("qemu.pid"))
        .expect("pid")
        .trim()
        .parse()
        .expect("pid number");
    kill9(pid);
    let out = child.wait_with_output().expect("migrate");
    let run = collect(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr);
    assert_eq!(run.code, 1, "{:?}", run.events.last());
    assert_eq!(
        run.last()["source_running"],
        Value::Bool(true),
        "{}",
        run.last()
    );
    assert!(
        run.last()["error"]
            .as_str()
            .unwrap_or("")
            .contains("never ran there"),
        "{}",
        run.last()
    );
    assert_on_source(&mut guest, &token, &agent).await;
    drop(agent);

    // 4. After all that, a migration goes through.
    let agent = spawn_agent_with(&storage, &token, "127.0.0.1:0", &qemu_arg, &[]);
    let run = migrate(guest.qmp_socket(), &agent.addr, &token);
    assert_eq!(run.code, 0, "{:?}\n{}", run.events.last(), run.stderr);
    assert_on_destination(&mut guest, &token, &agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_keeps_the_vm_after_faults_before_the_hand_over() {
    source_keeps_the_vm(Path::new(ferry::guest::DEFAULT_QEMU)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_keeps_the_vm_after_faults_before_the_hand_over_qemu_7_2() {
    let Some(old) = qemu_7_2() else { return };
    source_keeps_the_vm(&old).await;
}

/// `ferry migrate` killed after the source QEMU was told to continue: the source QEMU completes
/// on its own, the agent keeps the paused destination (its incoming migration completed), and
/// `ferry recover` hands the VM over.
async fn driver_killed_after_continue(qemu: &Path) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path(), TOKEN);
    let image = tmp.path().join("vda.raw");
    raw_image(&image, 128 << 20, 16);
    let mut guest = boot_with(
        &tmp.path().join("src"),
        vec![disk(&image, ImageFormat::Raw, "vda")],
        50,
        qemu,
    )
    .await;
    let agent = spawn_agent_with(
        &tmp.path().join("storage"),
        &token,
        "127.0.0.1:0",
        &["--qemu-binary", qemu.to_str().expect("utf-8")],
        &[],
    );
    let held = HeldMigrate::start(
        guest.qmp_socket(),
        &agent.addr,
        &token,
        "source-continued",
        tmp.path(),
    );
    held.wait_held();
    held.kill();
    // Neither copy runs now: the source is paused (completed or about to), the destination
    // waits for a verdict. The agent must keep it, whatever its window.
    let (code, out, err) = recover(guest.qmp_socket(), &token);
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out["owner"], "destination", "{out}");
    assert_on_destination(&mut guest, &token, &agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_killed_after_migrate_continue_is_recovered_on_the_destination() {
    driver_killed_after_continue(Path::new(ferry::guest::DEFAULT_QEMU)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_killed_after_migrate_continue_is_recovered_on_the_destination_qemu_7_2() {
    let Some(old) = qemu_7_2() else { return };
    driver_killed_after_continue(&old).await;
}

/// The agent killed at each point of the hand-over (source completed; `Resuming` journaled): a
/// restarted agent on the same address resumes from its journal, and the still-running
/// `ferry migrate` finishes the hand-over through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_during_the_hand_over_is_resumed_by_its_successor() {
    for point in ["agent-commit", "agent-resuming"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let token = token_file(tmp.path(), TOKEN);
        let image = tmp.path().join("vda.raw");
        raw_image(&image, 128 << 20, 16);
        let mut guest = boot(
            &tmp.path().join("src"),
            vec![disk(&image, ImageFormat::Raw, "vda")],
            50,
        )
        .await;
        let storage = tmp.path().join("storage");
        let mut agent = spawn_agent(&storage, &token, "127.0.0.1:0", &[("FERRY_HOLD_AT", point)]);
        let addr = agent.addr.clone();
        let child = migrate_command(guest.qmp_socket(), &addr, &token)
            .spawn()
            .expect("migrate");
        wait_for_text(
            &storage.with_extension("log"),
            &format!("holding at {point}"),
            Duration::from_secs(120),
        );
        agent.kill();
        let agent = spawn_agent(&storage, &token, &addr, &[]);
        let out = child.wait_with_output().expect("migrate");
        let run = collect(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr);
        assert_eq!(
            run.code,
            0,
            "{point}: {:?}\n{}",
            run.events.last(),
            run.stderr
        );
        assert_eq!(run.last()["event"], "completed", "{point}");
        assert_on_destination(&mut guest, &token, &agent).await;
    }
}
