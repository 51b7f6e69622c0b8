//! The fault matrix: the destination host is a network namespace joined by a veth pair, the
//! guest writes checksummed records, and for each phase (mirror, RAM, pre-switchover, device
//! state sent, destination `cont`) each single fault strikes: SIGKILL of the agent (restarted on
//! the same address, as its service manager would), of `ferry migrate` (then one `ferry
//! recover`), of the destination QEMU; a destination that cannot load the state; the link cut
//! for 5 s and for 60 s; the destination's storage full mid-mirror.
//!
//! Afterwards exactly one copy runs, every write the guest saw acknowledged is on the disk of the
//! copy that runs, and neither host keeps a leftover: no ferry node, job or capability in a
//! source QEMU that runs, no journal, no migration directory or QEMU for a VM that stayed, no
//! source QEMU for a VM that moved. `ferry recover` runs at most once, when `ferry migrate` was
//! killed or left its journal (the VM paused, undecided). The phases run concurrently, one
//! namespace and one guest each; the table of outcomes is printed at the end.
//!
//! The RAM travels over four multifd channels in every case (the default with TLS from QEMU
//! 10.0; the RAM column asks for them, its cap would otherwise make one stream): a broken
//! multifd channel is what can leave a source QEMU stuck (docs/protocol.md).
//!
//! For a failure's post-mortem: `FERRY_MATRIX_ONLY=TEXT` runs the cases whose
//! "phase/fault" contains TEXT (e.g. `pre-switchover/SIGKILL destination`),
//! `FERRY_MATRIX_ARGS="..."` adds arguments to every `ferry migrate` (e.g. `--parallel 1`), and
//! `FERRY_MATRIX_KEEP=1` keeps the cases' directories (logs, with `FERRY_LOG=debug`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_harness::*;
use ferry_testkit::{verify_disk, Acks, ImageFormat, RunningGuest};
use serde_json::Value;

const FERRY: Ferry = Ferry::new(env!("CARGO_BIN_EXE_ferry"));

const TOKEN: &str = "fault-matrix-token-0123456789abcdef";
/// How long a held process stays held when the fault strikes something else meanwhile.
const HOLD_SECS: u64 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Mirror,
    Ram,
    PreSwitchover,
    DeviceSent,
    DestinationCont,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Mirror => "mirror",
            Phase::Ram => "ram",
            Phase::PreSwitchover => "pre-switchover",
            Phase::DeviceSent => "device state sent",
            Phase::DestinationCont => "destination cont",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    KillAgent,
    KillMigrate,
    KillDestination,
    CannotLoad,
    Partition(u64),
    StorageFull,
}

impl Fault {
    fn name(self) -> String {
        match self {
            Fault::KillAgent => "SIGKILL agent".into(),
            Fault::KillMigrate => "SIGKILL ferry migrate".into(),
            Fault::KillDestination => "SIGKILL destination QEMU".into(),
            Fault::CannotLoad => "destination cannot load".into(),
            Fault::Partition(s) => format!("link down {s} s"),
            Fault::StorageFull => "destination storage full".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Source,
    Destination,
}

/// The faults that apply to a phase, with the owners each may end with. A cut link may or may
/// not outlast the peers' patience (TCP keepalive, timeouts): either owner is right, as long as
/// there is exactly one.
fn cases(phase: Phase) -> Vec<(Fault, &'static [Owner])> {
    use Owner::*;
    const S: &[Owner] = &[Source];
    const D: &[Owner] = &[Destination];
    const ANY: &[Owner] = &[Source, Destination];
    let mut cases = vec![(Fault::KillAgent, S), (Fault::KillMigrate, S)];
    match phase {
        Phase::Mirror => cases.push((Fault::StorageFull, S)),
        Phase::Ram | Phase::PreSwitchover => cases.push((Fault::KillDestination, S)),
        // With TLS (the default) the RAM stream runs through `ferry migrate`'s relay and the
        // agent's, which die with their process. Killed right after `migrate-continue`, either
        // the last device state and the destination's return-path answer got through (the
        // source QEMU completed: the VM moves) or they did not (the source QEMU's migration
        // fails and it keeps the VM). Both leave exactly one copy; which one depends on how far
        // the bytes got before the kill, so either owner is right here.
        Phase::DeviceSent => {
            cases = vec![
                (Fault::KillAgent, ANY),
                (Fault::KillMigrate, ANY),
                (Fault::KillDestination, S),
                (Fault::CannotLoad, S),
            ]
        }
        Phase::DestinationCont => {
            cases = vec![
                (Fault::KillAgent, D),
                (Fault::KillMigrate, D),
                (Fault::KillDestination, S),
            ]
        }
    }
    cases.push((Fault::Partition(5), D));
    cases.push((Fault::Partition(60), ANY));
    cases
}

/// One row of the printed table.
struct Row {
    phase: Phase,
    fault: Fault,
    owner: Owner,
    migrate_exit: String,
    recovered: bool,
    secs: u64,
    /// What the processes said, for a failure message.
    log: String,
}

/// One phase's column of the matrix: a namespace, a guest (rebooted after each case that moved
/// it), a case directory per fault.
struct Rig {
    dir: PathBuf,
    ns: Netns,
    token: PathBuf,
    image: PathBuf,
    guest: Option<RunningGuest>,
    wrapper: PathBuf,
    case: usize,
}

impl Rig {
    async fn guest(&mut self) -> &mut RunningGuest {
        if self.guest.is_none() {
            raw_image(&self.image, 256 << 20, 64);
            let guest = boot(
                &self.dir.join(format!("src-{}", self.case)),
                vec![disk(&self.image, ImageFormat::Raw, "vda")],
                50,
            )
            .await;
            self.guest = Some(guest);
        }
        self.guest.as_mut().expect("guest")
    }
}

/// A mounted tmpfs, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn spawn_migrate(rig: &Rig, qmp: &Path, to: &str, hold: Option<String>, args: &[&str]) -> Child {
    let case = rig.dir.join(format!("case-{}", rig.case));
    let mut cmd = FERRY.migrate_command(qmp, to, &rig.token);
    cmd.args(args)
        .args(
            std::env::var("FERRY_MATRIX_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .stdout(std::fs::File::create(case.join("migrate.out")).expect("out"))
        .stderr(std::fs::File::create(case.join("migrate.err")).expect("err"));
    if let Some(hold) = hold {
        cmd.env("FERRY_HOLD_AT", hold);
    }
    cmd.spawn().expect("spawn ferry migrate")
}

fn destination_pid(storage: &Path) -> Option<u32> {
    let dirs: Vec<PathBuf> = std::fs::read_dir(storage)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.iter().find_map(|d| {
        std::fs::read_to_string(d.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
}

async fn run_case(rig: &mut Rig, phase: Phase, fault: Fault) -> Row {
    let started = Instant::now();
    rig.case += 1;
    let case_dir = rig.dir.join(format!("case-{}", rig.case));
    std::fs::create_dir_all(&case_dir).expect("case dir");
    let storage = case_dir.join("storage");
    std::fs::create_dir_all(&storage).expect("storage");
    let _tmpfs = (fault == Fault::StorageFull).then(|| {
        // Room for the disk and the agent's headroom, so the preflight passes; filled later.
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=400m", "tmpfs"])
            .arg(&storage)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "mount tmpfs");
        Tmpfs(storage.clone())
    });

    let qmp_path = rig.guest().await.qmp_socket().to_path_buf();

    let listen = format!("{}:0", rig.ns.dest_ip);
    let mut agent_args = vec!["--qemu-binary".to_string()];
    agent_args.push(if fault == Fault::CannotLoad {
        rig.wrapper.display().to_string()
    } else {
        ferry_testkit::DEFAULT_QEMU.to_string()
    });
    let agent_args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let agent_hold = format!("agent-resuming:{HOLD_SECS}");
    let agent_env: Vec<(&str, &str)> = if phase == Phase::DestinationCont {
        vec![("FERRY_HOLD_AT", agent_hold.as_str())]
    } else {
        vec![]
    };
    let mut agent = FERRY.spawn_agent_in(
        Some(&rig.ns.name),
        &storage,
        &rig.token,
        &listen,
        &agent_args,
        &agent_env,
    );
    let addr = agent.addr.clone();

    let forever = fault == Fault::KillMigrate;
    let hold = |point: &str| {
        Some(if forever {
            point.to_string()
        } else {
            format!("{point}:{HOLD_SECS}")
        })
    };
    let (hold, args): (Option<String>, &[&str]) = match phase {
        Phase::Mirror => (None, &["--bandwidth", "8", "--ram-bandwidth", "0"]),
        // A slow RAM stream, so that the fault strikes while it flows; over the four multifd
        // channels of the default (a cap alone would make it one stream).
        Phase::Ram => (None, &["--ram-bandwidth", "2", "--parallel", "4"]),
        Phase::PreSwitchover => (hold("source-pre-switchover"), &[]),
        Phase::DeviceSent => (hold("source-continued"), &[]),
        Phase::DestinationCont => (None, &[]),
    };
    let mut migrate = spawn_migrate(rig, &qmp_path, &addr, hold, args);
    let (out, err) = (case_dir.join("migrate.out"), case_dir.join("migrate.err"));
    let agent_log = storage.with_extension("log");
    let reach = Duration::from_secs(180);
    match phase {
        Phase::Mirror => wait_for_text(&out, "\"event\":\"mirror\"", reach),
        Phase::Ram => wait_for_text(&out, "\"event\":\"ram\"", reach),
        Phase::PreSwitchover | Phase::DeviceSent => wait_for_text(&err, "holding at", reach),
        Phase::DestinationCont => wait_for_text(&agent_log, "holding at agent-resuming", reach),
    }

    let mut partition = None;
    let mut killed_migrate = false;
    match fault {
        Fault::KillAgent => {
            agent.kill();
            std::thread::sleep(Duration::from_millis(500));
            agent = FERRY.spawn_agent_in(
                Some(&rig.ns.name),
                &storage,
                &rig.token,
                &addr,
                &agent_args,
                &[],
            );
        }
        Fault::KillMigrate => {
            let _ = migrate.kill();
            let _ = migrate.wait();
            killed_migrate = true;
        }
        Fault::KillDestination => {
            let pid = destination_pid(&storage).expect("a destination QEMU to kill");
            kill9(pid);
        }
        Fault::CannotLoad => {}
        Fault::Partition(secs) => partition = Some(rig.ns.partition(secs)),
        Fault::StorageFull => {
            // dd stops at ENOSPC: exactly what the fault is.
            let _ = Command::new("dd")
                .args(["if=/dev/zero", "bs=1M", "status=none"])
                .arg(format!("of={}", storage.join("filler").display()))
                .stderr(Stdio::null())
                .status()
                .expect("dd");
        }
    }

    let migrate_exit = if killed_migrate {
        "killed".to_string()
    } else {
        let deadline = Instant::now() + Duration::from_secs(400);
        loop {
            if let Some(status) = migrate.try_wait().expect("wait") {
                break status.code().map_or("signal".into(), |c| c.to_string());
            }
            assert!(
                Instant::now() < deadline,
                "{} / {}: ferry migrate still running",
                phase.name(),
                fault.name()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    if let Some(p) = partition {
        p.join().expect("partition thread");
    }
    // One `ferry recover` where the driver was killed or left its journal (undecided).
    let recovered = !journals(&rig.token).is_empty();
    let mut recover_said = String::new();
    if recovered {
        let (code, json, stderr) = FERRY.recover(&qmp_path, &rig.token);
        recover_said = format!("{json} {stderr}");
        // Kept with the case's other logs, for a post-mortem (`FERRY_MATRIX_KEEP`).
        let _ = std::fs::write(case_dir.join("recover.log"), &recover_said);
        assert_eq!(
            code,
            0,
            "{} / {}: recover: {json} {stderr}",
            phase.name(),
            fault.name()
        );
    }

    let owner = settled_owner(rig.guest.as_mut().expect("guest")).await;
    let context = format!(
        "{} / {}: migrate exit {migrate_exit}\n{}",
        phase.name(),
        fault.name(),
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    match owner {
        Owner::Source => check_source(rig, &agent, &context).await,
        Owner::Destination => {
            check_destination(rig, &agent, &context).await;
            rig.guest = None;
        }
    }
    drop(agent);
    let agent_said = std::fs::read_to_string(&agent_log).unwrap_or_default();
    let tail: Vec<&str> = agent_said.lines().rev().take(15).collect();
    let log = format!(
        "ferry migrate: {}\nferry recover: {recover_said}\nagent (last lines, newest first):\n{}",
        std::fs::read_to_string(&err).unwrap_or_default(),
        tail.join("\n")
    );
    Row {
        phase,
        fault,
        owner,
        migrate_exit,
        recovered,
        secs: started.elapsed().as_secs(),
        log,
    }
}

/// Who has the VM: the source QEMU exited (the VM moved) or runs its guest. A source that stays
/// paused, neither running nor gone, is the failure this matrix exists to find.
async fn settled_owner(guest: &mut RunningGuest) -> Owner {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        if matches!(guest.try_wait(), Ok(Some(_))) {
            return Owner::Destination;
        }
        if let Ok(Ok(q)) = tokio::time::timeout(
            Duration::from_secs(2),
            qmp::Qmp::connect_unix(guest.qmp_socket()),
        )
        .await
        {
            if let Ok(status) = q.execute_raw("query-status", Value::Null).await {
                if status["running"] == Value::Bool(true) {
                    return Owner::Source;
                }
                last = status.to_string();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the source QEMU neither runs its guest nor exited: {last}");
}

/// The VM stayed: the source runs and acknowledges, holds every acknowledged record, has nothing
/// of ferry left; the destination has no directory and no QEMU (within the recover window).
async fn check_source(rig: &mut Rig, agent: &AgentProc, context: &str) {
    let guest = rig.guest.as_mut().expect("guest");
    still_acking(guest.serial_log(), "vda", 5).await;
    assert_eq!(
        source_leftovers(guest.qmp_socket()).await,
        Vec::<String>::new(),
        "{context}"
    );
    assert_eq!(journals(&rig.token), Vec::<String>::new(), "{context}");
    // A destination whose link dropped is kept for the window (20 s), longer when the stream
    // stalled behind a cut link: give it that.
    let deadline = Instant::now() + Duration::from_secs(150);
    while !agent.leftovers().iter().all(|e| e == "filler") {
        if Instant::now() > deadline {
            // What the agent did with it is the post-mortem.
            let log =
                std::fs::read_to_string(agent.storage.with_extension("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            panic!(
                "{context}: the agent's storage did not empty within 150 s: {:?}\nagent (last lines, newest first):\n{}",
                agent.leftovers(),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        destination_qemus(&agent.storage),
        Vec::<String>::new(),
        "{context}"
    );
    // Stop the guest so that no record is half-written while the image is read, then go on.
    let q = qmp::Qmp::connect_unix(guest.qmp_socket())
        .await
        .expect("qmp");
    q.execute_raw("stop", Value::Null).await.expect("stop");
    let acks = Acks::parse(&std::fs::read_to_string(guest.serial_log()).expect("serial"));
    let report = verify_disk(&rig.image, ImageFormat::Raw, "vda", acks.seqs("vda"))
        .unwrap_or_else(|e| panic!("{context}: {e}"));
    assert!(report.acked >= 10, "{context}: {} records", report.acked);
    q.execute_raw("cont", Value::Null).await.expect("cont");
}

/// The VM moved: verified on the destination, then stopped there.
async fn check_destination(rig: &mut Rig, agent: &AgentProc, context: &str) {
    let guest = rig.guest.as_mut().expect("guest");
    eprintln!("checking destination: {context}");
    assert_on_destination(guest, &rig.token, agent).await;
}

async fn column(phase: Phase, n: u8) -> Vec<Row> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().to_path_buf();
    if std::env::var_os("FERRY_MATRIX_KEEP").is_some() {
        std::mem::forget(tmp);
    }
    let token = token_file(&base, TOKEN);
    let wrapper = qemu_without_virtio_blk(&base, Path::new(ferry_testkit::DEFAULT_QEMU));
    let mut rig = Rig {
        dir: base.clone(),
        ns: Netns::create(n),
        image: base.join("vda.raw"),
        token,
        guest: None,
        wrapper,
        case: 0,
    };
    let mut rows = Vec::new();
    for (fault, allowed) in cases(phase) {
        if let Ok(only) = std::env::var("FERRY_MATRIX_ONLY") {
            if !format!("{}/{}", phase.name(), fault.name()).contains(&only) {
                continue;
            }
        }
        let row = run_case(&mut rig, phase, fault).await;
        assert!(
            allowed.contains(&row.owner),
            "{} / {}: the VM ended on the {:?}, expected {allowed:?}\n{}",
            phase.name(),
            fault.name(),
            row.owner,
            row.log
        );
        eprintln!(
            "matrix: {} / {} -> {:?} ({} s)",
            phase.name(),
            fault.name(),
            row.owner,
            row.secs
        );
        rows.push(row);
    }
    rows
}

#[test]
fn every_single_fault_at_every_phase_leaves_exactly_one_copy() {
    let phases = [
        Phase::Mirror,
        Phase::Ram,
        Phase::PreSwitchover,
        Phase::DeviceSent,
        Phase::DestinationCont,
    ];
    let columns: Vec<_> = phases
        .iter()
        .enumerate()
        .map(|(i, &phase)| {
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(column(phase, i as u8 + 1))
            })
        })
        .collect();
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (phase, column) in phases.iter().zip(columns) {
        match column.join() {
            Ok(mut r) => rows.append(&mut r),
            Err(e) => failures.push(format!(
                "{}: {}",
                phase.name(),
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        }
    }
    println!("| phase | fault | VM ends on | ferry migrate exit | ferry recover | seconds |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:?} | {} | {} | {} |",
            r.phase.name(),
            r.fault.name(),
            r.owner,
            r.migrate_exit,
            if r.recovered { "once" } else { "no" },
            r.secs
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Whatever a failed case left running (daemonized destination QEMUs outlive agents).
        let needle = format!("{}/", self.dir.display());
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(&needle) {
                if let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() {
                    kill9(pid);
                }
            }
        }
    }
}
