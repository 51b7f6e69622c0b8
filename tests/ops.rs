//! Operating an agent: several migrations at once, the limit beyond which it refuses, free space
//! reserved across migrations, `ferry status` (from the agent and from its storage), and the
//! Prometheus endpoint, including against hostile scrapers. Checked from outside: the refusal
//! text a source sees, what the agent's storage holds, what `ferry status` and `curl` print, and
//! for the two concurrent migrations every acknowledged write on the destination images.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ferry::migrate::control::ControlError;
use ferry_harness::ops::*;
use ferry_harness::*;
use ferry_testkit::{verify_disk, Acks, ImageFormat};
use serde_json::Value;

const FERRY: Ferry = Ferry::new(env!("CARGO_BIN_EXE_ferry"));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_migrations_a_source_is_refused_with_the_limit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path(), TOKEN);
    let (agent, metrics) = agent_with_metrics(
        FERRY,
        &tmp.path().join("storage"),
        &token,
        &["--max-migrations", "1"],
    );

    let mut first = link(&agent).await;
    let prepared = first
        .prepare(&vm(1 << 20, None), true)
        .await
        .expect("first admitted");
    let mut second = link(&agent).await;
    let refused = second.prepare(&vm(1 << 20, None), true).await;
    let Err(ControlError::Refused(reason)) = refused else {
        panic!(
            "the second migration must be refused, got {:?}",
            refused.map(|p| p.migration_id)
        );
    };
    assert_eq!(
        reason,
        "the agent is receiving 1 migrations already (--max-migrations 1): retry when one \
         finishes, or raise --max-migrations on the agent"
    );
    // A full agent still answers status (and a recovering source) and the first is untouched.
    let listed = remote_status(FERRY, &agent, &token);
    assert_eq!(ids(&listed), vec![prepared.migration_id.clone()]);
    assert_eq!(listed["migrations"][0]["phase"], "receiving");
    assert_eq!(listed["migrations"][0]["vm"], "ops-test");
    let text = scrape(&metrics);
    assert_eq!(
        sample(&text, "ferry_migrations_total{outcome=\"refused\"}"),
        1.0
    );
    assert_eq!(sample(&text, "ferry_migrations_active"), 1.0);

    // The place frees with the first migration.
    first.abort("test").await;
    wait_leftovers(&agent, 0).await;
    let mut third = link(&agent).await;
    third
        .prepare(&vm(1 << 20, None), true)
        .await
        .expect("admitted once the first ended");
    let text = scrape(&metrics);
    assert_eq!(
        sample(&text, "ferry_migrations_total{outcome=\"rolled_back\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_space_is_reserved_across_concurrent_migrations() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path(), TOKEN);
    let storage = tmp.path().join("storage");
    let (agent, _metrics) = agent_with_metrics(FERRY, &storage, &token, &[]);
    // Each fits alone; both do not fit together.
    let each = free_bytes(&storage) / 10 * 6;

    let mut first = link(&agent).await;
    let prepared = first
        .prepare(&vm(each, None), true)
        .await
        .expect("first fits alone");
    let mut second = link(&agent).await;
    let Err(ControlError::Refused(reason)) = second.prepare(&vm(each, None), true).await else {
        panic!("the second must be refused");
    };
    assert!(reason.starts_with("destination has "), "{reason}");
    assert!(reason.contains("of which"), "{reason}");
    assert!(
        reason.contains("is reserved by 1 migration(s) in progress"),
        "{reason}"
    );
    assert!(reason.contains("the disks need"), "{reason}");
    assert!(reason.contains("retry once they finish"), "{reason}");
    assert!(!reason.contains('\n'), "{reason}");
    // The first is unaffected: its directory is there, and it goes on to the next step.
    assert_eq!(agent.leftovers(), vec![prepared.migration_id.clone()]);
    let local = local_status(FERRY, &storage);
    assert_eq!(ids(&local), vec![prepared.migration_id.clone()]);
    assert_eq!(local["migrations"][0]["reserved"].as_u64(), Some(each));

    // Released with the first migration.
    first.abort("test").await;
    wait_leftovers(&agent, 0).await;
    let mut third = link(&agent).await;
    third
        .prepare(&vm(each, None), true)
        .await
        .expect("fits once the first released its reservation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn space_check_data_admits_a_sparse_disk_that_full_refuses() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path(), TOKEN);
    let full_storage = tmp.path().join("full");
    let (full, _) = agent_with_metrics(FERRY, &full_storage, &token, &[]);
    let (data, _) = agent_with_metrics(
        FERRY,
        &tmp.path().join("data"),
        &token,
        &["--space-check", "data"],
    );
    // Twice the free space in size, 1 MiB of data.
    let sparse = vm(free_bytes(&full_storage) * 2, Some(1 << 20));

    let Err(ControlError::Refused(reason)) = link(&full).await.prepare(&sparse, true).await else {
        panic!("--space-check full must refuse a disk larger than the free space");
    };
    assert!(
        reason.contains("(an agent run with --space-check data counts only the disks' data)"),
        "{reason}"
    );
    assert_eq!(full.leftovers(), Vec::<String>::new());

    let mut admitted = link(&data).await;
    let prepared = admitted
        .prepare(&sparse, true)
        .await
        .expect("--space-check data admits it");
    let listed = remote_status(FERRY, &data, &token);
    assert_eq!(ids(&listed), vec![prepared.migration_id]);
    assert_eq!(
        listed["migrations"][0]["size"].as_u64(),
        Some(sparse.disks[0].size)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_scrapers_do_not_hurt_the_agent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path(), TOKEN);
    let (agent, metrics) = agent_with_metrics(FERRY, &tmp.path().join("storage"), &token, &[]);

    // Slow loris: connections that send a byte now and then and never finish their head.
    let mut lorises: Vec<std::net::TcpStream> = (0..8)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&metrics).expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
                .expect("send");
            s
        })
        .collect();
    // An oversized request head: cut off with 431, nothing more read.
    let mut big = std::net::TcpStream::connect(&metrics).expect("connect");
    let mut head = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    head.resize(64 << 10, b'a');
    let _ = big.write_all(&head);
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // Meanwhile scrapes, status and migrations go on.
    let text = scrape(&metrics);
    assert_eq!(
        sample(&text, "ferry_migrations_total{outcome=\"completed\"}"),
        0.0
    );
    let mut source = link(&agent).await;
    source
        .prepare(&vm(1 << 20, None), true)
        .await
        .expect("a migration is admitted");
    assert_eq!(ids(&remote_status(FERRY, &agent, &token)).len(), 1);

    // The lorises are dropped by the agent (within its 5 s read timeout).
    let start = Instant::now();
    for s in &mut lorises {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let text = scrape(&metrics);
    assert_eq!(sample(&text, "ferry_migrations_active"), 1.0);
}

/// A guest of its own (own directory, token file, source state) migrating to a shared agent.
async fn guest() -> OneDisk {
    OneDisk::boot(TOKEN, 128 << 20, 32, 50).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_guests_migrate_to_one_agent_at_the_same_time() {
    let (mut a, mut b) = tokio::join!(guest(), guest());
    let storage = a.tmp.path().join("storage");
    // Thin: each reserves its data plus the margin, which the source must have reported.
    let (agent, metrics) =
        agent_with_metrics(FERRY, &storage, &a.token, &["--space-check", "data"]);

    // Both at once, the copy slowed so that status sees both mid-mirror.
    let spawn = |g: &OneDisk| {
        FERRY
            .migrate_command(g.guest.qmp_socket(), &agent.addr, &g.token)
            .args(["--bandwidth", "3"])
            .spawn()
            .expect("spawn ferry migrate")
    };
    let runs = [spawn(&a), spawn(&b)];

    let start = Instant::now();
    let (remote, local) = loop {
        let remote = remote_status(FERRY, &agent, &a.token);
        let local = local_status(FERRY, &storage);
        let copying = |s: &Value| {
            s["migrations"].as_array().is_some_and(|list| {
                list.len() == 2
                    && list
                        .iter()
                        .all(|m| m["phase"] == "receiving" || m["phase"] == "started")
            })
        };
        if copying(&remote) && copying(&local) {
            break (remote, local);
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "status never showed both migrations copying: {remote} / {local}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ids(&remote), ids(&local), "the agent and its storage agree");
    for m in remote["migrations"].as_array().into_iter().flatten() {
        assert_eq!(m["disks"][0]["name"], "vda", "{m}");
        assert_eq!(m["size"].as_u64(), Some(128 << 20), "{m}");
        // 32 MiB of data and what the guest wrote since, plus 1 GiB and a tenth: not the
        // 128 MiB disk's full size.
        let reserved = m["reserved"].as_u64().expect("reserved");
        assert!(
            reserved > (1 << 30) + (32 << 20) && reserved < (1 << 30) + (64 << 20),
            "{m}"
        );
    }

    let outs: Vec<_> = runs
        .into_iter()
        .map(|c| c.wait_with_output().expect("ferry migrate ends"))
        .collect();
    let mut guards = Vec::new();
    let mut dirs = Vec::new();
    for (out, g) in outs.iter().zip([&mut a, &mut b]) {
        let run = collect(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr);
        assert_eq!(
            run.code,
            0,
            "migrate failed: {:?}\n{}",
            run.events.last(),
            run.stderr
        );
        let done = run.last();
        assert_eq!(done["event"], "completed", "{done}");
        guards.push(PidGuard(
            done["destination"]["pid"].as_u64().map(|p| p as u32),
        ));
        let qmp = PathBuf::from(done["destination"]["qmp"].as_str().expect("qmp path"));
        assert!(
            wait_exit(&mut g.guest, Duration::from_secs(10)),
            "source QEMU exits"
        );
        dirs.push((qmp.parent().expect("migration dir").to_path_buf(), qmp));
    }
    assert_ne!(dirs[0].0, dirs[1].0, "each migration has its own directory");

    let text = scrape(&metrics);
    assert_eq!(
        sample(&text, "ferry_migrations_total{outcome=\"completed\"}"),
        2.0
    );
    assert_eq!(
        sample(&text, "ferry_migrations_total{outcome=\"rolled_back\"}"),
        0.0
    );
    assert_eq!(sample(&text, "ferry_migrations_active"), 0.0);
    assert!(
        sample(&text, "ferry_received_bytes_total") >= (64 << 20) as f64,
        "{text}"
    );
    assert!(sample(&text, "ferry_nbd_requests_total") > 0.0, "{text}");
    assert_eq!(
        sample(
            &text,
            "ferry_migration_phase_seconds_count{phase=\"receiving\"}"
        ),
        2.0
    );
    // One line per phase change for each migration, no escape bytes in a file.
    let log = std::fs::read_to_string(agent_log(&storage)).expect("agent log");
    assert!(
        !log.contains('\u{1b}'),
        "escape bytes in the agent's log:\n{log}"
    );
    for (dir, _) in &dirs {
        let id = dir.file_name().expect("id").to_string_lossy().into_owned();
        let phases: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("migration={id} ")) && l.contains(" phase "))
            .filter_map(|l| l.split("phase=").nth(1)?.split_whitespace().next())
            .collect();
        assert_eq!(
            phases,
            [
                "\"receiving\"",
                "\"started\"",
                "\"resuming\"",
                "\"running\""
            ],
            "phase lines of {id} in\n{log}"
        );
    }
    let listed = local_status(FERRY, &storage);
    assert!(
        listed["migrations"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|m| m["phase"] == "running" && m["pid"].is_u64()),
        "{listed}"
    );

    // Every acknowledged write is on each destination image.
    for ((dir, qmp), g) in dirs.iter().zip([&a, &b]) {
        let serial = dir.join("serial.log");
        still_acking(&serial, "vda", 5).await;
        quit(qmp).await;
        let mut acks =
            Acks::parse(&std::fs::read_to_string(g.guest.serial_log()).expect("source serial"));
        acks.merge(&Acks::parse(
            &std::fs::read_to_string(&serial).expect("destination serial"),
        ));
        let report = verify_disk(
            &dir.join("disk-vda.raw"),
            ImageFormat::Raw,
            "vda",
            acks.seqs("vda"),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(
            report.acked >= 15,
            "only {} acknowledged records checked",
            report.acked
        );
    }
}

/// The source's driver dies after the switchover and the agent is restarted: the new agent
/// resumes the paused destination from its journal, and with it that migration's reservation,
/// until `ferry recover` settles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_keeps_the_reservation_of_a_migration_it_resumes() {
    let OneDisk {
        tmp,
        token,
        mut guest,
        ..
    } = OneDisk::boot(TOKEN, 128 << 20, 16, 50).await;
    let storage = tmp.path().join("storage");
    let _tmpfs = Tmpfs::mount(&storage, "512m");
    let mut agent = FERRY.spawn_agent(
        &storage,
        &token,
        "127.0.0.1:0",
        &[("FERRY_HOLD_AT", "agent-commit")],
    );
    let addr = agent.addr.clone();
    let mut driver = FERRY
        .migrate_command(guest.qmp_socket(), &addr, &token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ferry migrate");
    wait_for_text(
        &storage.with_extension("log"),
        "holding at agent-commit",
        Duration::from_secs(120),
    );
    let _ = driver.kill();
    let _ = driver.wait();
    agent.kill();
    let agent = FERRY.spawn_agent(&storage, &token, &addr, &[]);

    let listed = local_status(FERRY, &storage);
    let resumed = &listed["migrations"][0];
    assert_eq!(resumed["phase"], "started", "{listed}");
    assert_eq!(resumed["reserved"].as_u64(), Some(128 << 20), "{listed}");
    assert!(
        resumed["pid"].is_u64(),
        "the paused destination runs: {listed}"
    );
    let _dest = PidGuard(resumed["pid"].as_u64().map(|p| p as u32));

    // A VM that fits beside what the resumed migration's images hold, but not beside its
    // reservation, is refused, naming the reservation.
    let outstanding = (128u64 << 20).saturating_sub(resumed["received"].as_u64().unwrap_or(0));
    assert!(outstanding > 64 << 20, "{listed}");
    let size = free_bytes(&storage) - (64 << 20) - outstanding / 2;
    let Err(ControlError::Refused(reason)) =
        link(&agent).await.prepare(&vm(size, None), true).await
    else {
        panic!("must be refused while the resumed migration holds its reservation");
    };
    assert!(
        reason.contains("reserved by 1 migration(s) in progress"),
        "{reason}"
    );

    // Settled from the source: the VM runs on the destination and the reservation is released.
    let (code, json, stderr) = FERRY.recover(guest.qmp_socket(), &token);
    assert_eq!(code, 0, "{json} {stderr}");
    let mut after = link(&agent).await;
    let prepared = after
        .prepare(&vm(size, None), true)
        .await
        .expect("admitted once the resumed migration is settled");
    after.abort("test").await;
    let gone = storage.join(&prepared.migration_id);
    let start = Instant::now();
    while gone.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} not rolled back",
            gone.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_on_destination(&mut guest, &token, &agent).await;
}

/// `ferry status`'s errors: one line each, exit 2 for bad input, 1 when the agent cannot be
/// asked; a wrong token reads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_errors_are_one_line_and_a_wrong_token_reads_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path(), TOKEN);
    let wrong = token_file(tmp.path(), "a-different-token-of-some-length");
    let (agent, _) = agent_with_metrics(FERRY, &tmp.path().join("storage"), &token, &[]);
    let mut source = link(&agent).await;
    source
        .prepare(&vm(1 << 20, None), true)
        .await
        .expect("admitted");

    let run = |args: &[&std::ffi::OsStr]| {
        let out = FERRY
            .command()
            .arg("status")
            .args(args)
            .output()
            .expect("run ferry status");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        )
    };
    let (code, _, stderr) = run(&[]);
    assert_eq!(code, Some(2), "{stderr}");

    let missing = tmp.path().join("nowhere");
    let (code, _, stderr) = run(&["--storage".as_ref(), missing.as_os_str()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.starts_with("ferry: storage directory "), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let (code, stdout, stderr) = run(&[
        "--agent".as_ref(),
        agent.addr.as_ref(),
        "--token-file".as_ref(),
        wrong.as_os_str(),
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("authentication failed"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(stdout, "", "nothing listed without the token");

    // The human listing of the same agent, with the right token.
    let (code, stdout, stderr) = run(&[
        "--agent".as_ref(),
        agent.addr.as_ref(),
        "--token-file".as_ref(),
        token.as_os_str(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].starts_with("ID "), "{stdout}");
    assert!(lines[1].contains(" receiving  ops-test  vda "), "{stdout}");
}
