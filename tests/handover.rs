//! The hand-over under faults: a process killed, a destination that cannot load the state, a
//! destination QEMU that dies, at each phase around the switchover. After each, at most one
//! `ferry recover`, exactly one copy of the VM runs, every write the guest saw acknowledged is on
//! the disk of the copy that runs, and neither end keeps a leftover (NBD nodes, jobs, journals,
//! migration directories, processes).
//!
//! Faults are placed with `FERRY_HOLD_AT` (see `src/faults.rs`): the process stops at the named
//! point, says so on stderr, and the test kills it (or something else) there.

use std::path::Path;
use std::time::Duration;

use ferry_harness::*;
use ferry_testkit::qemu::qemu_7_2;
use serde_json::Value;

const FERRY: Ferry = Ferry::new(env!("CARGO_BIN_EXE_ferry"));

const TOKEN: &str = "handover-test-token-0123456789abcdef";

/// Every fault after which the source must keep the VM, on one guest, then a migration that
/// goes through. Run with the source on QEMU 10.0 and on 7.2.
async fn source_keeps_the_vm(qemu: &Path) {
    let OneDisk {
        tmp,
        token,
        mut guest,
        ..
    } = OneDisk::boot_with(TOKEN, 128 << 20, 16, 50, qemu).await;
    let storage = tmp.path().join("storage");

    // 1. The destination cannot load the device state: with the return path the source's
    //    migration fails, QEMU resumes the source, and the agent removes everything.
    let broken = qemu_without_virtio_blk(tmp.path(), qemu);
    let broken = broken.to_str().expect("utf-8");
    let agent = FERRY.spawn_agent_with(
        &storage,
        &token,
        "127.0.0.1:0",
        &["--qemu-binary", broken],
        &[],
    );
    let run = FERRY.migrate(guest.qmp_socket(), &agent.addr, &token);
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
    let agent = FERRY.spawn_agent_with(&storage, &token, "127.0.0.1:0", &qemu_arg, &[]);
    let held = FERRY.held_migrate(
        guest.qmp_socket(),
        &agent.addr,
        &token,
        "source-pre-switchover",
        tmp.path(),
    );
    held.wait_held();
    held.kill();
    assert_eq!(journals(&token).len(), 1, "the journal outlives the driver");
    // A dry run meanwhile names the interrupted migration and what to do, and settles nothing.
    let dry = FERRY
        .command()
        .args(["migrate", "--dry-run", "--qmp"])
        .arg(guest.qmp_socket())
        .args(["--to", &agent.addr, "--token-file"])
        .arg(&token)
        .env("FERRY_STATE_DIR", state_dir(&token))
        .output()
        .expect("run ferry migrate --dry-run");
    let stderr = String::from_utf8_lossy(&dry.stderr);
    assert_eq!(dry.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("of this VM was interrupted: run `ferry recover --qmp "),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert_eq!(journals(&token).len(), 1, "the dry run left the journal");
    let (code, out, err) = FERRY.recover(guest.qmp_socket(), &token);
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out["owner"], "source", "{out}");
    assert_on_source(&mut guest, &token, &agent).await;

    // 3. The destination QEMU dies while the agent is about to start it (after the source
    //    completed): it never ran, so the agent answers `Abandoned` and the source resumes.
    drop(agent);
    let agent = FERRY.spawn_agent_with(
        &storage,
        &token,
        "127.0.0.1:0",
        &qemu_arg,
        &[("FERRY_HOLD_AT", "agent-commit:4")],
    );
    let log = storage.with_extension("log");
    let _ = std::fs::write(&log, "");
    let child = FERRY
        .migrate_command(guest.qmp_socket(), &agent.addr, &token)
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

    // 4. After all that, a migration goes through. Both ends log at info level into pipes and
    //    files (the agent's stderr is a file, the driver's a pipe): no terminal escape bytes,
    //    as journald and log files need.
    let agent = FERRY.spawn_agent_with(&storage, &token, "127.0.0.1:0", &qemu_arg, &[]);
    let out = FERRY
        .migrate_command(guest.qmp_socket(), &agent.addr, &token)
        .env("FERRY_LOG", "ferry=info")
        .output()
        .expect("run ferry migrate");
    let run = collect(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr);
    assert_eq!(run.code, 0, "{:?}\n{}", run.events.last(), run.stderr);
    assert_on_destination(&mut guest, &token, &agent).await;
    assert!(
        run.stderr.contains(" INFO "),
        "the driver logs: {}",
        run.stderr
    );
    assert!(
        !out.stderr.contains(&0x1b),
        "escape bytes in ferry migrate's stderr: {:?}",
        run.stderr
    );
    let agent_log = std::fs::read(storage.with_extension("log")).expect("agent log");
    let agent_text = String::from_utf8_lossy(&agent_log);
    assert!(
        agent_text.contains(" INFO "),
        "the agent logs: {agent_text}"
    );
    assert!(
        !agent_log.contains(&0x1b),
        "escape bytes in ferry agent's stderr: {agent_text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_keeps_the_vm_after_faults_before_the_hand_over() {
    source_keeps_the_vm(Path::new(ferry_testkit::DEFAULT_QEMU)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_keeps_the_vm_after_faults_before_the_hand_over_qemu_7_2() {
    let Some(old) = qemu_7_2() else { return };
    source_keeps_the_vm(&old).await;
}

/// The agent dies while `ferry migrate` holds at pre-switchover and is not back when the source
/// takes the VM again: the rollback cannot reach it, and a destination that had loaded the whole
/// VM would wait for that word forever. So the journal stays (the VM runs on the source and is
/// never handed over from it), the operator reads what is left to do, a new migration of the VM
/// is refused until it is done, and `ferry recover` tells the restarted agent, which empties its
/// storage at once (well inside its own 20 s window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gone_at_the_rollback_is_told_later_by_recover() {
    let OneDisk {
        tmp,
        token,
        mut guest,
        ..
    } = OneDisk::boot(TOKEN, 128 << 20, 16, 50).await;
    let storage = tmp.path().join("storage");
    let mut agent = FERRY.spawn_agent(&storage, &token, "127.0.0.1:0", &[]);
    let addr = agent.addr.clone();
    let said = tmp.path().join("migrate.err");
    let child = FERRY
        .migrate_command(guest.qmp_socket(), &addr, &token)
        .env("FERRY_HOLD_AT", "source-pre-switchover:5")
        .stderr(std::fs::File::create(&said).expect("stderr file"))
        .spawn()
        .expect("migrate");
    wait_for_text(&said, "holding at", Duration::from_secs(120));
    agent.kill();
    let out = child.wait_with_output().expect("migrate");
    let run = collect(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr);
    let last = run.last();
    let error = last["error"].as_str().unwrap_or("");
    assert_eq!(run.code, 1, "{last}");
    assert_eq!(last["source_running"], Value::Bool(true), "{last}");
    assert!(
        error.contains("could not be told to roll back") && error.contains("ferry recover"),
        "{last}"
    );
    assert_eq!(journals(&token).len(), 1, "the journal stays: {last}");
    still_acking(guest.serial_log(), "vda", 5).await;

    // Another migration of the VM first tries to tell the agent; still gone: refused, with the
    // same words, and nothing changes.
    let again = FERRY.migrate(guest.qmp_socket(), &addr, &token);
    let last = again.last();
    assert_eq!(again.code, 1, "{last}");
    assert_eq!(last["event"], "recovered", "{last}");
    assert!(
        last["message"]
            .as_str()
            .unwrap_or("")
            .contains("could not be told to roll back"),
        "{last}"
    );
    assert_eq!(journals(&token).len(), 1, "{last}");
    still_acking(guest.serial_log(), "vda", 5).await;

    let agent = FERRY.spawn_agent(&storage, &token, &addr, &[]);
    let (code, out, err) = FERRY.recover(guest.qmp_socket(), &token);
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out["owner"], "source", "{out}");
    wait_until(
        "the restarted agent rolls back when told",
        Duration::from_secs(10),
        || agent.leftovers().is_empty(),
    );
    assert_on_source(&mut guest, &token, &agent).await;
}

/// `ferry migrate` killed after the source QEMU was told to continue, the agent keeps the paused
/// destination (its incoming migration completed), and `ferry recover` hands the VM over. Two
/// ways: with `--insecure` it is killed right after `migrate-continue` and the source QEMU
/// completes on its own (the stream runs QEMU to QEMU); with TLS the stream runs through the
/// driver's relay, which dies with it, so it is killed once the source QEMU said `completed`
/// (killed earlier, either owner is right: tests/fault_matrix.rs).
async fn driver_killed_after_continue(qemu: &Path) {
    for (hold, args) in [
        ("source-continued", &["--insecure"][..]),
        ("source-completed", &[][..]),
    ] {
        let OneDisk {
            tmp,
            token,
            mut guest,
            ..
        } = OneDisk::boot_with(TOKEN, 128 << 20, 16, 50, qemu).await;
        let agent = FERRY.spawn_agent_with(
            &tmp.path().join("storage"),
            &token,
            "127.0.0.1:0",
            &["--qemu-binary", qemu.to_str().expect("utf-8")],
            &[],
        );
        let held = FERRY.held_migrate_with(
            guest.qmp_socket(),
            &agent.addr,
            &token,
            hold,
            tmp.path(),
            args,
        );
        held.wait_held();
        held.kill();
        // Neither copy runs now: the source is paused (completed or about to), the destination
        // waits for a verdict. The agent must keep it, whatever its window.
        let (code, out, err) = FERRY.recover(guest.qmp_socket(), &token);
        assert_eq!(code, 0, "{hold}: {out} {err}");
        assert_eq!(out["owner"], "destination", "{hold}: {out}");
        assert_on_destination(&mut guest, &token, &agent).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_killed_after_migrate_continue_is_recovered_on_the_destination() {
    driver_killed_after_continue(Path::new(ferry_testkit::DEFAULT_QEMU)).await;
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
        let OneDisk {
            tmp,
            token,
            mut guest,
            ..
        } = OneDisk::boot(TOKEN, 128 << 20, 16, 50).await;
        let storage = tmp.path().join("storage");
        let mut agent =
            FERRY.spawn_agent(&storage, &token, "127.0.0.1:0", &[("FERRY_HOLD_AT", point)]);
        let addr = agent.addr.clone();
        let child = FERRY
            .migrate_command(guest.qmp_socket(), &addr, &token)
            .spawn()
            .expect("migrate");
        wait_for_text(
            &storage.with_extension("log"),
            &format!("holding at {point}"),
            Duration::from_secs(120),
        );
        agent.kill();
        let agent = FERRY.spawn_agent(&storage, &token, &addr, &[]);
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

/// SIGTERM to the agent in the middle of a migration drains: no new connection is accepted, the
/// migration in progress finishes, and then the agent exits by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_agent_without_dropping_a_migration() {
    let OneDisk {
        tmp,
        token,
        mut guest,
        ..
    } = OneDisk::boot(TOKEN, 128 << 20, 48, 50).await;
    let mut agent = FERRY.spawn_agent(&tmp.path().join("storage"), &token, "127.0.0.1:0", &[]);
    let out = tmp.path().join("migrate.out");
    let mut child = FERRY
        .migrate_command(guest.qmp_socket(), &agent.addr, &token)
        .args(["--bandwidth", "8", "--ram-bandwidth", "0"])
        .stdout(std::fs::File::create(&out).expect("out"))
        .spawn()
        .expect("migrate");
    wait_for_text(&out, "\"event\":\"mirror\"", Duration::from_secs(120));
    let term = std::process::Command::new("kill")
        .args(["-TERM", &agent.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    // Draining: the listener is closed, so a new source cannot start a migration.
    wait_until("the agent stops listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect(&agent.addr).is_err()
    });
    let status = child.wait().expect("migrate");
    let stdout = std::fs::read(&out).expect("out");
    let run = collect(status.code().unwrap_or(-1), &stdout, b"");
    assert_eq!(run.code, 0, "{:?}", run.events.last());
    wait_until("the drained agent exits", Duration::from_secs(20), || {
        matches!(agent.child.try_wait(), Ok(Some(_)))
    });
    assert_on_destination(&mut guest, &token, &agent).await;
}
