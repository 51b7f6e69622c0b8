//! End-to-end migrations of the test guest between a source QEMU and `ferry agent` on localhost,
//! driven by the real `ferry migrate` binary. Every test proves its outcome from outside: the
//! acknowledged records on the destination image, the guest acknowledging on the side that owns
//! it, the source QEMU's fate, the agent's storage directory, the error text a user sees.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_harness::*;
use ferry_testkit::qemu::qemu_7_2;
use ferry_testkit::{verify_disk, Acks, ImageFormat};
use serde_json::Value;

const FERRY: Ferry = Ferry::new(env!("CARGO_BIN_EXE_ferry"));

const TOKEN: &str = "e2e-test-token-0123456789abcdef";

/// Checks a completed migration: the source exited, the destination guest keeps acknowledging,
/// and after stopping it every acknowledged record is on the destination images.
async fn check_completed(
    run: &MigrateRun,
    source: &mut ferry_testkit::RunningGuest,
    storage: &Path,
    disks: &[(&str, &str)],
) -> PidGuard {
    assert_eq!(
        run.code,
        0,
        "migrate failed: {:?}\nstderr: {}",
        run.events.last(),
        run.stderr
    );
    let done = run.last();
    assert_eq!(done["event"], "completed", "{done}");
    let guard = PidGuard(done["destination"]["pid"].as_u64().map(|p| p as u32));
    assert!(
        done["downtime_ms"].as_u64().is_some(),
        "QEMU reports downtime: {done}"
    );
    assert!(
        wait_exit(source, Duration::from_secs(10)),
        "source QEMU must exit after the switchover"
    );

    let dir = migration_dir(storage);
    // Encrypted by default, and the per-migration keys are gone from the destination once
    // the VM runs there.
    assert_eq!(done["encrypted"], true, "{done}");
    assert!(
        !dir.join("tls").exists(),
        "the destination's key files must be removed"
    );
    let dest_serial = dir.join("serial.log");
    for (disk, _) in disks {
        still_acking(&dest_serial, disk, 5).await;
    }
    let qmp_path = PathBuf::from(done["destination"]["qmp"].as_str().expect("qmp path"));
    quit(&qmp_path).await;

    let mut acks =
        Acks::parse(&std::fs::read_to_string(source.serial_log()).expect("source serial"));
    acks.merge(&Acks::parse(
        &std::fs::read_to_string(&dest_serial).expect("destination serial"),
    ));
    for (disk, image) in disks {
        let report = verify_disk(&dir.join(image), ImageFormat::Raw, disk, acks.seqs(disk))
            .unwrap_or_else(|e| panic!("disk {disk}: {e}"));
        assert!(
            report.acked >= 15,
            "disk {disk}: only {} acknowledged records checked",
            report.acked
        );
    }
    guard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_disk_migrates_while_the_guest_writes() {
    let OneDisk {
        tmp,
        token,
        image,
        mut guest,
    } = OneDisk::boot(TOKEN, 256 << 20, 32, 50).await;
    let mut agent = FERRY.agent(&tmp.path().join("storage"), &token, &[]);

    let run = FERRY.migrate(guest.qmp_socket(), &agent.addr, &token);
    assert!(!run.of("mirror").is_empty(), "mirror progress is reported");
    assert_eq!(run.of("mirror_ready").len(), 1);
    assert!(!run.of("ram").is_empty(), "RAM progress is reported");
    // The destination VM does not depend on the agent: it keeps running when the agent is gone.
    agent.kill();
    let _dest = check_completed(&run, &mut guest, &agent.storage, &[("vda", "disk-vda.raw")]).await;

    // Sparse: the destination allocates what the source does (within 1%), not the disk's size.
    let src = allocated(&image);
    let dst = run.last()["destination_allocated_bytes"]
        .as_u64()
        .expect("allocation reported");
    assert!(src > 32 << 20, "source holds its data ({src} bytes)");
    assert!(
        dst <= src + src / 100 && dst + dst / 100 >= src,
        "destination allocates {dst}, source {src}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_disks_raw_and_qcow2_arrive_intact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path(), TOKEN);
    let vda = tmp.path().join("vda.raw");
    let vdb = tmp.path().join("vdb.qcow2");
    raw_image(&vda, 128 << 20, 16);
    qcow2_image(&vdb, 96 << 20);
    let mut guest = boot(
        &tmp.path().join("src"),
        vec![
            disk(&vda, ImageFormat::Raw, "vda"),
            disk(&vdb, ImageFormat::Qcow2, "vdb"),
        ],
        50,
    )
    .await;
    let agent = FERRY.agent(&tmp.path().join("storage"), &token, &[]);
    let run = FERRY.migrate(guest.qmp_socket(), &agent.addr, &token);
    let _dest = check_completed(
        &run,
        &mut guest,
        &agent.storage,
        &[("vda", "disk-vda.raw"), ("vdb", "disk-vdb.raw")],
    )
    .await;
    let dir = migration_dir(&agent.storage);
    assert_eq!(
        std::fs::metadata(dir.join("disk-vdb.raw"))
            .expect("vdb image")
            .len(),
        96 << 20,
        "exact size"
    );
}

/// Asserts that a refused migration changed nothing: exit 1 with the expected words, the guest
/// still acknowledging on the source, nothing in the agent's storage.
async fn assert_refused(
    run: &MigrateRun,
    phase: &str,
    words: &str,
    serial: &Path,
    storage: Option<&AgentProc>,
) {
    assert_eq!(run.code, 1, "must fail: {:?}", run.events);
    let last = run.last();
    assert_eq!(last["event"], "failed", "{last}");
    assert_eq!(last["phase"], phase, "{last}");
    let error = last["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(words),
        "error {error:?} should say {words:?}"
    );
    assert!(!error.contains('\n'), "one line: {error:?}");
    assert_eq!(last["source_running"], Value::Bool(true), "{last}");
    still_acking(serial, "vda", 5).await;
    if let Some(agent) = storage {
        assert_eq!(
            agent.leftovers(),
            Vec::<String>::new(),
            "nothing left in the agent's storage"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_leave_the_vm_untouched_and_nothing_behind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path(), TOKEN);
    let wrong = token_file(tmp.path(), "a-different-token-of-some-length");
    let image = tmp.path().join("vda.raw");
    raw_image(&image, 64 << 20, 0);
    // A 20 TiB disk the guest has no driver for (IDE): no host has room for it.
    let big = tmp.path().join("big.qcow2");
    qcow2_image(&big, 20 << 40);
    let images = guest_images();
    let mut spec =
        ferry_testkit::GuestSpec::new(images.clone()).disk(disk(&image, ImageFormat::Raw, "vda"));
    spec.extra_qemu_args = [
        "-drive",
        &format!("if=none,id=big,format=qcow2,file={}", big.display()),
        "-device",
        "ide-hd,drive=big",
    ]
    .iter()
    .map(Into::into)
    .collect();
    let guest = boot_spec(
        &tmp.path().join("src"),
        &spec,
        Path::new(ferry_testkit::DEFAULT_QEMU),
    )
    .await;
    let serial = guest.serial_log().to_path_buf();
    let agent = FERRY.agent(&tmp.path().join("storage"), &token, &[]);

    let run = FERRY.migrate(guest.qmp_socket(), &agent.addr, &wrong);
    assert_refused(&run, "negotiate", "token", &serial, Some(&agent)).await;

    let run = FERRY.migrate(guest.qmp_socket(), &agent.addr, &token);
    assert_refused(&run, "negotiate", "destination has ", &serial, Some(&agent)).await;
    assert!(
        run.last()["error"]
            .as_str()
            .unwrap_or_default()
            .contains("20.0 TiB"),
        "{}",
        run.last()
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let run = FERRY.migrate(guest.qmp_socket(), &closed.to_string(), &token);
    assert_refused(&run, "negotiate", "cannot reach the agent", &serial, None).await;

    // A VM with an option that would share a host directory with the source.
    let share = tmp.path().join("share");
    std::fs::create_dir_all(&share).expect("share dir");
    let image2 = tmp.path().join("vda2.raw");
    raw_image(&image2, 64 << 20, 0);
    let mut spec2 =
        ferry_testkit::GuestSpec::new(images).disk(disk(&image2, ImageFormat::Raw, "vda"));
    spec2.extra_qemu_args = [
        "-virtfs",
        &format!(
            "local,path={},mount_tag=share,security_model=none,id=fs0",
            share.display()
        ),
    ]
    .iter()
    .map(Into::into)
    .collect();
    let guest2 = boot_spec(
        &tmp.path().join("src2"),
        &spec2,
        Path::new(ferry_testkit::DEFAULT_QEMU),
    )
    .await;
    let run = FERRY.migrate(guest2.qmp_socket(), &agent.addr, &token);
    assert_refused(
        &run,
        "negotiate",
        "cannot relocate `-virtfs",
        guest2.serial_log(),
        Some(&agent),
    )
    .await;
}

/// Starts `ferry migrate`, waits for the first mirror progress event, then calls `fault`;
/// returns the run's outcome.
fn migrate_with_fault(qmp: &Path, to: &str, token: &Path, fault: impl FnOnce(u32)) -> MigrateRun {
    use std::io::{BufRead, BufReader, Read};
    let mut child = FERRY
        .migrate_command(qmp, to, token)
        .spawn()
        .expect("spawn migrate");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    let mut out = Vec::new();
    let mut line = String::new();
    let mut fault = Some(fault);
    while reader.read_line(&mut line).expect("read") > 0 {
        out.extend_from_slice(line.as_bytes());
        if line.contains("\"event\":\"mirror\"") {
            if let Some(f) = fault.take() {
                f(pid);
            }
        }
        line.clear();
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let code = child.wait().expect("wait").code().unwrap_or(-1);
    collect(code, &out, stderr.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_roll_back_and_a_later_migration_succeeds() {
    // Enough data that the mirror is still running when the fault hits.
    let OneDisk {
        tmp,
        token,
        mut guest,
        ..
    } = OneDisk::boot(TOKEN, 1 << 30, 384, 50).await;
    let serial = guest.serial_log().to_path_buf();
    let storage = tmp.path().join("storage");
    let pre_switchover = ["mirror", "start-destination", "ram"];

    // 1. The agent dies during the mirror.
    let mut agent = FERRY.agent(&storage, &token, &[]);
    let agent_pid = agent.child.id();
    let run = migrate_with_fault(guest.qmp_socket(), &agent.addr, &token, |_| {
        let _ = std::process::Command::new("kill")
            .args(["-9", &agent_pid.to_string()])
            .status();
    });
    agent.kill();
    assert_eq!(run.code, 1, "{:?}", run.events.last());
    assert_eq!(run.last()["event"], "failed");
    assert!(
        pre_switchover.contains(&run.last()["phase"].as_str().unwrap_or("")),
        "{}",
        run.last()
    );
    assert_eq!(run.last()["source_running"], Value::Bool(true));
    still_acking(&serial, "vda", 5).await;
    // A restarted agent cleans up what the killed one left.
    let agent = FERRY.agent(&storage, &token, &[]);
    assert_eq!(agent.leftovers(), Vec::<String>::new());
    drop(agent);

    // 2. The destination QEMU fails to start. (The agent runs only binaries named like the
    // source's, so the fake one carries QEMU's name.)
    let fake_dir = tmp.path().join("broken");
    std::fs::create_dir_all(&fake_dir).expect("fake dir");
    let fake = fake_dir.join("qemu-system-x86_64");
    std::fs::write(
        &fake,
        // It answers the agent's sandbox probe (`-version`) like QEMU, then fails to start.
        "#!/bin/sh\ncase \" $* \" in *\" -version \"*) echo 'QEMU emulator version 0 (fake)'; exit 0;; esac\necho 'qemu: simulated start failure' >&2\nexit 1\n",
    )
    .expect("script");
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&fake)
        .status()
        .expect("chmod");
    let agent = FERRY.agent(
        &storage,
        &token,
        &["--qemu-binary", fake.to_str().expect("utf-8")],
    );
    let run = FERRY.migrate(guest.qmp_socket(), &agent.addr, &token);
    assert_refused(
        &run,
        "start-destination",
        "simulated start failure",
        &serial,
        Some(&agent),
    )
    .await;
    drop(agent);

    // 3. SIGINT to ferry migrate during the mirror.
    let agent = FERRY.agent(&storage, &token, &[]);
    let run = migrate_with_fault(guest.qmp_socket(), &agent.addr, &token, |pid| {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
    });
    assert_eq!(run.code, 1, "{:?}", run.events.last());
    assert!(
        run.last()["error"]
            .as_str()
            .unwrap_or("")
            .contains("interrupted"),
        "{}",
        run.last()
    );
    assert_eq!(run.last()["source_running"], Value::Bool(true));
    still_acking(&serial, "vda", 5).await;
    wait_until(
        "the agent's storage empties",
        Duration::from_secs(15),
        || agent.leftovers().is_empty(),
    );

    // 4. After all that, a migration goes through.
    let run = FERRY.migrate(guest.qmp_socket(), &agent.addr, &token);
    let _dest = check_completed(&run, &mut guest, &agent.storage, &[("vda", "disk-vda.raw")]).await;
}

/// Debian 12's own QEMU 7.2 as the source: to a 7.2 destination, and to 10.0 (an upgrade path,
/// the machine type pinned to the source's `pc-i440fx-7.2`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_7_2_source_migrates_to_7_2_and_to_10_0() {
    let Some(old) = qemu_7_2() else { return };
    for (label, agent_args) in [
        (
            "7.2",
            vec!["--qemu-binary".to_string(), old.display().to_string()],
        ),
        (
            "10.0",
            vec![
                "--qemu-binary".to_string(),
                ferry_testkit::DEFAULT_QEMU.to_string(),
            ],
        ),
    ] {
        let mut setup = OneDisk::boot_with(TOKEN, 128 << 20, 16, 50, &old).await;
        let args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
        let agent = setup.agent(FERRY, &args);
        if label == "7.2" {
            // 7.2 under TCG corrupts guest memory with a downtime limit below 300 ms (see
            // src/migrate/hazards.rs): refused before anything is created.
            let run = FERRY.migrate_with(
                setup.guest.qmp_socket(),
                &agent.addr,
                &setup.token,
                &["--max-downtime", "50"],
            );
            let serial = setup.guest.serial_log().to_path_buf();
            assert_refused(
                &run,
                "discover",
                "QEMU before 10.0 under TCG",
                &serial,
                Some(&agent),
            )
            .await;
            assert!(
                run.last()["error"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("--max-downtime 50: the source QEMU 7.2."),
                "{}",
                run.last()
            );
        }
        let run = FERRY.migrate(setup.guest.qmp_socket(), &agent.addr, &setup.token);
        let guest = &mut setup.guest;
        eprintln!("7.2 -> {label}: {}", run.last());
        let _dest = check_completed(&run, guest, &agent.storage, &[("vda", "disk-vda.raw")]).await;
        let argv =
            std::fs::read_to_string(migration_dir(&agent.storage).join("argv")).expect("argv");
        assert!(
            argv.contains("pc-i440fx-7.2"),
            "machine type pinned: {argv}"
        );
    }
}

/// The RAM over several encrypted connections (QEMU multifd, each its own TLS connection
/// through ferry's relays, in QEMU's order), with a downtime limit: from QEMU 10.0 with 2
/// channels and from Debian 12's 7.2 with 3, both to 10.0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_ram_streams_with_tls_from_10_0_and_7_2() {
    // 7.2 keeps QEMU's own downtime limit: a lower one corrupts its TCG guests (and is
    // refused, see src/migrate/hazards.rs).
    let mut sources = vec![(PathBuf::from(ferry_testkit::DEFAULT_QEMU), "2", "200")];
    sources.extend(qemu_7_2().map(|q| (q, "3", "300")));
    for (qemu, parallel, downtime) in sources {
        let mut setup = OneDisk::boot_with(TOKEN, 64 << 20, 8, 50, &qemu).await;
        let agent = setup.agent(FERRY, &["--qemu-binary", ferry_testkit::DEFAULT_QEMU]);
        let run = FERRY.migrate_with(
            setup.guest.qmp_socket(),
            &agent.addr,
            &setup.token,
            &["--parallel", parallel, "--max-downtime", downtime],
        );
        eprintln!("{} --parallel {parallel}: {}", qemu.display(), run.last());
        let _dest = check_completed(
            &run,
            &mut setup.guest,
            &agent.storage,
            &[("vda", "disk-vda.raw")],
        )
        .await;
    }
}

/// A paused VM arrives paused: ferry does not start a guest its operator stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_vm_arrives_paused() {
    let setup = OneDisk::boot(TOKEN, 64 << 20, 4, 50).await;
    let (token, mut guest) = (setup.token.clone(), setup.guest);
    let tmp = setup.tmp;
    {
        let q = qmp::Qmp::connect_unix(guest.qmp_socket())
            .await
            .expect("qmp");
        q.execute_raw("stop", Value::Null).await.expect("stop");
    }
    let agent = FERRY.agent(&tmp.path().join("storage"), &token, &[]);
    let run = FERRY.migrate(guest.qmp_socket(), &agent.addr, &token);
    assert_eq!(run.code, 0, "{:?}", run.events.last());
    let done = run.last();
    let _dest = PidGuard(done["destination"]["pid"].as_u64().map(|p| p as u32));
    assert!(
        wait_exit(&mut guest, Duration::from_secs(10)),
        "source quits"
    );
    let q = qmp::Qmp::connect_unix(done["destination"]["qmp"].as_str().expect("qmp"))
        .await
        .expect("destination qmp");
    let status = q
        .execute_raw("query-status", Value::Null)
        .await
        .expect("status");
    assert_eq!(status["status"], "paused", "{status}");
    q.execute_raw("cont", Value::Null).await.expect("cont");
    still_acking(&migration_dir(&agent.storage).join("serial.log"), "vda", 5).await;
}

/// A guest that dirties its disk faster than the mirror may copy (the copy capped at 256 KiB/s,
/// the guest writing flat out): the background mirror cannot converge, ferry switches it to
/// write-blocking, and the migration completes with every acknowledged write on the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_outpacing_the_mirror_still_converges() {
    let OneDisk {
        tmp,
        token,
        mut guest,
        ..
    } = OneDisk::boot(TOKEN, 16 << 20, 0, 0).await;
    let agent = FERRY.agent(&tmp.path().join("storage"), &token, &[]);
    let run = FERRY.migrate_with(
        guest.qmp_socket(),
        &agent.addr,
        &token,
        &[
            "--bandwidth",
            "0.25",
            // Only the disks are slow: the RAM goes at link speed.
            "--ram-bandwidth",
            "0",
            "--converge-after",
            "2",
            "--mirror-timeout",
            "120",
        ],
    );
    // Whatever the assertions below say, the destination QEMU does not outlive the test.
    let _guard = PidGuard(run.last()["destination"]["pid"].as_u64().map(|p| p as u32));
    assert_eq!(
        run.of("mirror_write_blocking").len(),
        1,
        "switched to write-blocking: {:?}",
        run.events.last()
    );
    let _dest = check_completed(&run, &mut guest, &agent.storage, &[("vda", "disk-vda.raw")]).await;
}

/// What the source QEMU holds that a migration would change: block nodes, block jobs, QOM
/// objects, the migration's status and capabilities.
async fn source_state(qmp_path: &Path) -> Value {
    let q = qmp::Qmp::connect_unix(qmp_path).await.expect("qmp");
    let nodes = q
        .execute_raw("query-named-block-nodes", serde_json::json!({"flat": true}))
        .await
        .expect("nodes");
    let mut names: Vec<&str> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node-name"].as_str())
        .collect();
    names.sort_unstable();
    let jobs = q
        .execute_raw("query-block-jobs", Value::Null)
        .await
        .expect("jobs");
    let objects = q
        .execute_raw("qom-list", serde_json::json!({"path": "/objects"}))
        .await
        .expect("qom-list");
    let migration = q
        .execute_raw("query-migrate", Value::Null)
        .await
        .expect("query-migrate");
    let capabilities = q
        .execute_raw("query-migrate-capabilities", Value::Null)
        .await
        .expect("capabilities");
    let status = q
        .execute_raw("query-status", Value::Null)
        .await
        .expect("status");
    serde_json::json!({
        "nodes": names, "jobs": jobs, "objects": objects, "migration": migration,
        "capabilities": capabilities, "status": status["status"],
    })
}

/// `ferry migrate --dry-run`: exit 0 with the disks and the destination command line, and
/// neither host changed (no node, job or object in the source QEMU, no journal, nothing in the
/// agent's storage); the same as JSON; and a refusal is reported as the real run would, still
/// changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prints_the_plan_and_changes_nothing() {
    let OneDisk {
        tmp, token, guest, ..
    } = OneDisk::boot(TOKEN, 64 << 20, 4, 50).await;
    let agent = FERRY.agent(&tmp.path().join("storage"), &token, &[]);
    let qmp_path = guest.qmp_socket().to_path_buf();
    let before = source_state(&qmp_path).await;
    assert_eq!(before["jobs"], serde_json::json!([]), "{before}");
    let dry_run = |extra: &[&str]| {
        FERRY
            .migrate_command(&qmp_path, &agent.addr, &token)
            .args(["--dry-run"])
            .args(extra)
            .output()
            .expect("run ferry migrate --dry-run")
    };

    // The human form (migrate_command asks for --json).
    let out = FERRY
        .command()
        .args(["migrate", "--dry-run", "--qmp"])
        .arg(&qmp_path)
        .args(["--to", &agent.addr, "--token-file"])
        .arg(&token)
        .env("FERRY_STATE_DIR", state_dir(&token))
        .output()
        .expect("run ferry migrate --dry-run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
    let storage = agent.storage.display().to_string();
    for words in [
        "dry run: nothing was changed on either host",
        "VM: running",
        "  vda: 64.0 MiB raw, ",
        " allocated on the source",
        &format!("-> {storage}/<migration-id>/disk-vda.raw"),
        "destination command line:",
        "    -incoming defer",
        "    -sandbox ",
        &format!("{storage}/<migration-id>/qmp.sock"),
        // Encrypted from QEMU 10.0: four RAM connections unless --parallel says otherwise.
        "(encrypted (TLS), 4 connections,",
    ] {
        assert!(
            stdout.contains(words),
            "dry run output lacks {words:?}:\n{stdout}"
        );
    }

    // migrate_command asks for --json.
    let out = dry_run(&[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(plan["event"], "dry_run", "{plan}");
    assert_eq!(plan["disks"][0]["disk"], "vda", "{plan}");
    assert_eq!(plan["disks"][0]["size"], 64 << 20, "{plan}");
    let allocated = plan["disks"][0]["allocated_bytes"]
        .as_u64()
        .expect("allocation");
    assert!((4 << 20..64 << 20).contains(&allocated), "{plan}");
    assert!(plan["ram_bytes"].as_u64().is_some_and(|r| r > 0), "{plan}");
    assert_eq!(plan["parallel"], 4, "{plan}");
    let parallel = |args: &[&str]| {
        let out = dry_run(args);
        let plan: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        (
            plan["parallel"].clone(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert_eq!(parallel(&["--parallel", "1"]).0, 1);
    // One stream by default where multifd is not guarded or overshoots: --insecure, a RAM cap.
    assert_eq!(parallel(&["--insecure"]).0, 1);
    assert_eq!(parallel(&["--bandwidth", "100"]).0, 1);
    let (insecure, warned) = parallel(&["--insecure", "--parallel", "2"]);
    assert_eq!(insecure, 2);
    assert!(
        warned.contains(
            "ferry: warning: --parallel 2 with --insecure: QEMU's multifd channels go straight \
             to the destination"
        ),
        "{warned}"
    );
    // multifd asked for with a RAM cap: said, and done as asked.
    let out = dry_run(&["--bandwidth", "100", "--parallel", "4"]);
    let both: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(both["parallel"], 4, "{both}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "ferry: warning: --parallel 4 with the RAM capped at 100.0 MiB/s: QEMU's multifd \
             channels overshoot the cap"
        ),
        "{stderr}"
    );
    assert!(
        plan["destination_argv"]
            .as_array()
            .is_some_and(|a| a.iter().any(|w| w == "-incoming")),
        "{plan}"
    );

    // Refused by the agent (it requires TLS, the run asks for --insecure): exit 1, the agent's
    // reason, nothing changed either.
    let strict = FERRY.agent(&tmp.path().join("strict"), &token, &["--require-tls"]);
    let out = FERRY
        .migrate_command(&qmp_path, &strict.addr, &token)
        .args(["--dry-run", "--insecure"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let failed: Value = serde_json::from_slice(&out.stdout).expect("the failed event");
    assert_eq!(failed["event"], "failed", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("--require-tls")),
        "{failed}"
    );

    // Neither host changed.
    assert_eq!(
        source_state(&qmp_path).await,
        before,
        "the source QEMU changed"
    );
    assert_eq!(agent.leftovers(), Vec::<String>::new(), "agent storage");
    assert_eq!(strict.leftovers(), Vec::<String>::new(), "agent storage");
    let journals = std::fs::read_dir(state_dir(&token))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(journals, 0, "no journal on the source");
    still_acking(guest.serial_log(), "vda", 3).await;
}

/// When ferry's NBD relay cannot reach the agent's NBD port (here `--to` names a forwarder of
/// the control port alone, so the data port is closed at that address), the operator hears the
/// relay's reason instead of QEMU's end-of-file; the VM keeps running on the source and the
/// agent keeps nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nbd_port_out_of_reach_is_named_in_the_error_line() {
    let OneDisk {
        tmp, token, guest, ..
    } = OneDisk::boot(TOKEN, 64 << 20, 8, 50).await;
    let serial = guest.serial_log().to_path_buf();
    let agent = FERRY.agent(&tmp.path().join("storage"), &token, &[]);
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0")
        .await
        .expect("the forwarder listens");
    let to = listener.local_addr().expect("its address").to_string();
    let agent_addr = agent.addr.clone();
    let forwarder = tokio::spawn(async move {
        while let Ok((mut source, _)) = listener.accept().await {
            let agent_addr = agent_addr.clone();
            tokio::spawn(async move {
                if let Ok(mut agent) = tokio::net::TcpStream::connect(&agent_addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut source, &mut agent).await;
                }
            });
        }
    });
    let run = FERRY.migrate(guest.qmp_socket(), &to, &token);
    forwarder.abort();
    assert_refused(
        &run,
        "mirror",
        "the disks' NBD connection failed because ferry's encrypted relay could not carry it: \
         cannot connect to the agent at 127.0.0.2:",
        &serial,
        None,
    )
    .await;
    // The agent rolls its side back once the source hangs up.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !agent.leftovers().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(agent.leftovers(), Vec::<String>::new());
}
