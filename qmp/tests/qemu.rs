//! The client against real QEMUs (`-M none`, TCG): every test runs against each QEMU this machine
//! has (10.x from PATH, and 7.2 when scripts/setup installed it).

use std::time::{Duration, Instant};

use qmp::{CloseReason, Error, Qmp};
use serde_json::{json, Value};

use ferry_testkit::qemu::{available_qemus, TestQemu};

const CONNECT: Duration = Duration::from_secs(5);
const EVENT_WAIT: Duration = Duration::from_secs(3);

#[tokio::test]
async fn typed_query_version_and_query_status() -> Result<(), Error> {
    for bin in available_qemus() {
        let qemu = TestQemu::start(&bin, 1);
        let qmp = Qmp::connect_unix(qemu.socket()).await?;
        assert_eq!(
            qmp.peer_pid(),
            Some(qemu.pid()),
            "SO_PEERCRED must name the QEMU process ({})",
            bin.name
        );

        let version = qmp.execute(qapi::qmp::query_version {}).await?;
        let greeted = qmp.version();
        assert_eq!(
            (version.qemu.major, version.qemu.minor, version.qemu.micro),
            (
                i64::from(greeted.major),
                i64::from(greeted.minor),
                i64::from(greeted.micro)
            ),
            "greeting and query-version disagree on {}",
            bin.name
        );
        if bin.name == "7.2" {
            assert_eq!((greeted.major, greeted.minor), (7, 2));
        }

        let status = qmp.execute(qapi::qmp::query_status {}).await?;
        assert!(status.running, "-M none without -S runs ({})", bin.name);
        assert!(matches!(status.status, qapi::qmp::RunState::running));
        // The raw reply carries what the typed schema drops (7.2 still sends `singlestep`).
        let raw = qmp.execute_raw("query-status", Value::Null).await?;
        assert_eq!(raw["status"], "running");
        assert_eq!(raw["running"], true);
    }
    Ok(())
}

#[tokio::test]
async fn hundred_concurrent_commands_from_separate_tasks_get_their_own_replies() -> Result<(), Error>
{
    for bin in available_qemus() {
        let qemu = TestQemu::start(&bin, 1);
        let qmp = Qmp::connect_unix(qemu.socket()).await?;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..100u32 {
            let qmp = qmp.clone();
            tasks.push(tokio::spawn(async move {
                match i % 3 {
                    // Each unknown command's error names the command: proof the reply is ours.
                    0 => {
                        let name = format!("no-such-command-{i}");
                        match qmp.execute_raw(&name, Value::Null).await {
                            Err(Error::Qmp { class, desc, .. }) => {
                                assert_eq!(class, "CommandNotFound");
                                assert_eq!(desc, format!("The command {name} has not been found"));
                            }
                            other => panic!("{name}: expected CommandNotFound, got {other:?}"),
                        }
                    }
                    1 => {
                        let v = qmp
                            .execute(qapi::qmp::query_version {})
                            .await
                            .expect("query-version");
                        assert_eq!(v.qemu.major, i64::from(qmp.version().major));
                    }
                    _ => {
                        let s = qmp
                            .execute_raw("query-status", json!({}))
                            .await
                            .expect("query-status");
                        assert_eq!(s["status"], "running");
                    }
                }
            }));
        }
        for task in tasks {
            task.await.expect("a command task failed");
        }
        eprintln!(
            "QEMU {}: 100 concurrent commands in {:?}",
            bin.name,
            started.elapsed()
        );
    }
    Ok(())
}

#[tokio::test]
async fn stop_and_cont_show_up_as_events_on_a_second_connection() -> Result<(), Error> {
    for bin in available_qemus() {
        let qemu = TestQemu::start(&bin, 2);
        let watcher = Qmp::connect_unix(&qemu.sockets[0]).await?;
        let actor = Qmp::connect_unix(&qemu.sockets[1]).await?;
        let mut events = watcher.events();

        actor.execute(qapi::qmp::stop {}).await?;
        let stop = events.wait_for(|e| e.name == "STOP", EVENT_WAIT).await?;
        let status = watcher.execute(qapi::qmp::query_status {}).await?;
        assert!(
            !status.running,
            "QEMU {} still running after stop",
            bin.name
        );

        actor.execute(qapi::qmp::cont {}).await?;
        let resume = events.wait_for(|e| e.name == "RESUME", EVENT_WAIT).await?;
        assert!(
            resume.timestamp >= stop.timestamp,
            "{resume:?} before {stop:?}"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        assert!(
            stop.timestamp.seconds.abs_diff(now as i64) < 60,
            "QEMU timestamp is wall-clock time: {stop:?}"
        );
        assert!(watcher.execute(qapi::qmp::query_status {}).await?.running);
    }
    Ok(())
}

#[tokio::test]
async fn unknown_command_is_a_typed_command_not_found_error() -> Result<(), Error> {
    for bin in available_qemus() {
        let qemu = TestQemu::start(&bin, 1);
        let qmp = Qmp::connect_unix(qemu.socket()).await?;
        let err = qmp
            .execute_raw("no-such-command", Value::Null)
            .await
            .expect_err("unknown command");
        assert_eq!(err.class(), Some("CommandNotFound"), "{bin:?}");
        assert_eq!(
            err.to_string(),
            "CommandNotFound: The command no-such-command has not been found"
        );
        // A bad argument is QEMU's GenericError, and the connection stays usable.
        let err = qmp
            .execute_raw("query-status", json!({"bogus": 1}))
            .await
            .expect_err("bad argument");
        assert_eq!(err.class(), Some("GenericError"), "{err}");
        assert!(qmp.execute(qapi::qmp::query_status {}).await?.running);
    }
    Ok(())
}

#[tokio::test]
async fn killing_qemu_ends_pending_calls_and_event_streams_within_a_second() -> Result<(), Error> {
    for bin in available_qemus() {
        let mut qemu = TestQemu::start(&bin, 1);
        let qmp = Qmp::connect_unix(qemu.socket()).await?;
        let mut waiter = qmp.events();
        let mut reader = qmp.events();
        // Frozen, QEMU cannot answer: the call below is surely pending when QEMU dies.
        qemu.freeze();
        let call = tokio::spawn({
            let qmp = qmp.clone();
            async move { qmp.execute(qapi::qmp::query_status {}).await }
        });
        let wait = tokio::spawn(async move {
            waiter
                .wait_for(|e| e.name == "NEVER", Duration::from_secs(30))
                .await
        });
        let next = tokio::spawn(async move { reader.next().await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !call.is_finished(),
            "the call must be pending while QEMU is frozen"
        );

        let killed = Instant::now();
        qemu.kill();
        let within = Duration::from_secs(1);
        let call = tokio::time::timeout(within, call)
            .await
            .expect("pending call ended in time")
            .expect("task");
        let wait = tokio::time::timeout(within, wait)
            .await
            .expect("wait_for ended in time")
            .expect("task");
        let next = tokio::time::timeout(within, next)
            .await
            .expect("next ended in time")
            .expect("task");
        eprintln!(
            "QEMU {}: everything woke {:?} after the kill",
            bin.name,
            killed.elapsed()
        );
        assert!(matches!(call, Err(Error::Disconnected)), "{call:?}");
        assert!(matches!(wait, Err(Error::Disconnected)), "{wait:?}");
        assert!(matches!(next, Err(Error::Disconnected)), "{next:?}");
        assert!(qmp.is_closed());
        assert_eq!(qmp.close_reason(), Some(CloseReason::Eof));
        assert!(matches!(
            qmp.execute_raw("query-status", Value::Null).await,
            Err(Error::Disconnected)
        ));
    }
    Ok(())
}

#[tokio::test]
async fn quit_delivers_shutdown_then_ends_the_stream_cleanly() -> Result<(), Error> {
    for bin in available_qemus() {
        let mut qemu = TestQemu::start(&bin, 1);
        let qmp = Qmp::connect_unix(qemu.socket()).await?;
        let mut events = qmp.events();
        qmp.execute(qapi::qmp::quit {}).await?;
        let shutdown = events.next().await?;
        assert_eq!(shutdown.name, "SHUTDOWN");
        assert_eq!(shutdown.data["reason"], "host-qmp-quit", "{bin:?}");
        assert!(matches!(events.next().await, Err(Error::Disconnected)));
        assert!(
            qemu.wait_exit(Duration::from_secs(2)),
            "QEMU {} did not exit after quit",
            bin.name
        );
        assert_eq!(qmp.close_reason(), Some(CloseReason::Eof));
    }
    Ok(())
}

#[tokio::test]
async fn connect_unix_timeout_waits_for_a_starting_qemu_and_for_a_busy_monitor() -> Result<(), Error>
{
    for bin in available_qemus() {
        let qemu = TestQemu::spawn(&bin, 1);
        // Right after spawn the socket does not exist yet.
        let qmp = Qmp::connect_unix_timeout(qemu.socket(), CONNECT).await?;
        assert_eq!(qmp.peer_pid(), Some(qemu.pid()));

        // QEMU serves one client per socket; a second one gets no greeting until the first leaves.
        let err = Qmp::connect_unix_timeout(qemu.socket(), Duration::from_millis(300))
            .await
            .expect_err("busy");
        match &err {
            Error::Timeout { what, .. } => assert!(what.contains("another client"), "{what}"),
            other => panic!("expected a timeout, got {other:?}"),
        }
        drop(qmp);
        let again = Qmp::connect_unix_timeout(qemu.socket(), CONNECT).await?;
        assert!(again.execute(qapi::qmp::query_status {}).await?.running);
    }
    Ok(())
}
